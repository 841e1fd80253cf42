"""Fashion-MNIST from its IDX files (Xiao et al. 2017), also as the Debian package dataset-fashion-mnist."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from certbench.data.loaders import idx_split
from certbench.data.specs import DatasetSpec, register_dataset

if TYPE_CHECKING:
    from certbench.data.specs import Split

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@register_dataset(
    DatasetSpec(
        "fashion-mnist",
        (1, 28, 28),
        10,
        (0.2860,),
        (0.3530,),
        (0.1,),
        (0.5, 1.0),
        "IDX files: Debian package dataset-fashion-mnist or <data.dir>/fashion-mnist",
    )
)
def load(data_dir: Path, download: bool) -> Split:
    def fetch() -> None:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(data_dir), download=True)

    return idx_split(
        "fashion-mnist",
        [data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST],
        "install the Debian package dataset-fashion-mnist, set data.dir, or data.download: true",
        fetch if download else None,
    )
