"""SVHN cropped digits (Netzer et al. 2011) from ``train_32x32.mat`` and ``test_32x32.mat``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from certbench.data.loaders import missing, tensors
from certbench.data.specs import DatasetSpec, register_dataset

if TYPE_CHECKING:
    from certbench.data.specs import Split

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped digits: X (32, 32, 3, N), y (N, 1) with label 10 meaning digit 0."""
    from scipy.io import loadmat

    mat = loadmat(str(path))
    images = np.transpose(mat["X"], (3, 2, 0, 1))
    labels = mat["y"].astype(np.int64).reshape(-1) % 10
    return images, labels


@register_dataset(
    DatasetSpec(
        "svhn",
        (3, 32, 32),
        10,
        (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970),
        (2 / 255, 8 / 255),
        (36 / 255, 0.5),
        "train_32x32.mat and test_32x32.mat in <data.dir>/svhn",
    )
)
def load(data_dir: Path, download: bool) -> Split:
    folders = [data_dir / "svhn", data_dir]
    parts = []
    for split, filename in SVHN_FILES.items():
        path = next((f / filename for f in folders if (f / filename).is_file()), None)
        if path is None and download:
            from torchvision.datasets import SVHN

            SVHN(str(data_dir / "svhn"), split=split, download=True)
            path = data_dir / "svhn" / filename
        if path is None:
            raise missing(
                "svhn",
                list(SVHN_FILES.values()),
                folders,
                "set data.dir to the folder holding them, or data.download: true",
            )
        parts.append(tensors(*read_svhn_mat(path)))
    return parts[0], parts[1]
