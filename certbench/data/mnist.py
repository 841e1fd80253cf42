"""MNIST from its IDX files (LeCun et al. 1998)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from certbench.data.loaders import idx_split
from certbench.data.specs import DatasetSpec, register_dataset

if TYPE_CHECKING:
    from certbench.data.specs import Split


@register_dataset(
    DatasetSpec(
        "mnist",
        (1, 28, 28),
        10,
        (0.1307,),
        (0.3081,),
        (0.1, 0.3),
        (1.0, 1.58),
        "IDX files in <data.dir>/mnist or <data.dir>/MNIST/raw (torchvision)",
    )
)
def load(data_dir: Path, download: bool) -> Split:
    def fetch() -> None:
        from torchvision.datasets import MNIST

        MNIST(str(data_dir), download=True)

    return idx_split(
        "mnist",
        [data_dir / "mnist", data_dir / "MNIST" / "raw"],
        "set data.dir to the folder that holds them, or data.download: true",
        fetch if download else None,
    )
