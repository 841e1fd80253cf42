"""TinyImageNet (200 classes of 64×64 images) in the ImageFolder layout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from certbench.data.loaders import missing
from certbench.data.specs import DatasetSpec, register_dataset

if TYPE_CHECKING:
    from certbench.data.specs import Split


@register_dataset(
    DatasetSpec(
        "tinyimagenet",
        (3, 64, 64),
        200,
        (0.4802, 0.4481, 0.3975),
        (0.2302, 0.2265, 0.2262),
        (1 / 255,),
        (36 / 255,),
        "ImageFolder layout in <data.dir>/tiny-imagenet-200/{train,val}",
    )
)
def load(data_dir: Path, download: bool) -> Split:
    """``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` under ``<data_dir>/tiny-imagenet-200``."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = data_dir / "tiny-imagenet-200"
    folders = [root / "train", root / "val"]
    if not all(f.is_dir() for f in folders):
        raise missing(
            "tinyimagenet",
            ["train/<class>/*", "val/<class>/*"],
            [root],
            "arrange TinyImageNet as ImageFolder trees under <data.dir>/tiny-imagenet-200 "
            "(torchvision cannot download it)",
        )
    to_tensor = transforms.ToTensor()
    train, test = (ImageFolder(str(f), transform=to_tensor) for f in folders)
    return train, test
