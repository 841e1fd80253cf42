"""Data set specifications: pure metadata, importable without torch.

Every data set yields images in [0, 1] with shape (C, H, W); channel mean and std
feed the model's own normalisation layer, so ε and radii are in pixel units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from certbench.registry import Registry


@dataclass(frozen=True)
class DatasetSpec:
    """Shape, classes and normalisation of one data set, plus its customary ε values."""

    name: str
    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eps_linf: tuple[float, ...]
    eps_l2: tuple[float, ...]
    source: str

    @property
    def input_dim(self) -> int:
        return math.prod(self.shape)


DATASETS: Registry[DatasetSpec] = Registry("data set")


def _add(spec: DatasetSpec) -> None:
    DATASETS.register(spec.name)(spec)


_add(DatasetSpec("digits", (1, 8, 8), 10, (0.3051,), (0.3783,), (0.05, 0.1), (0.25, 0.5),
                 "scikit-learn's bundled load_digits (1,797 images)"))
_add(DatasetSpec("fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), (0.1,), (0.5, 1.0),
                 "IDX files: Debian package dataset-fashion-mnist or <data.dir>/fashion-mnist"))
_add(DatasetSpec("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), (0.1, 0.3), (1.0, 1.58),
                 "IDX files in <data.dir>/mnist or <data.dir>/MNIST/raw (torchvision)"))
_add(DatasetSpec("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                 (2 / 255, 8 / 255), (36 / 255, 0.5), "python batches in <data.dir>/cifar-10-batches-py"))
_add(DatasetSpec("svhn", (3, 32, 32), 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                 (2 / 255, 8 / 255), (36 / 255, 0.5), "train_32x32.mat and test_32x32.mat in <data.dir>/svhn"))
_add(DatasetSpec("tinyimagenet", (3, 64, 64), 200, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262),
                 (1 / 255,), (36 / 255,), "ImageFolder layout in <data.dir>/tiny-imagenet-200/{train,val}"))
_add(DatasetSpec("rings2d", (1, 1, 2), 3, (0.5,), (0.25,), (0.02, 0.05), (0.02, 0.05),
                 "generated: the three-ring 2-D toy problem of Pauli et al. 2021"))
