"""The data set registry: each data set is one module ``certbench/data/<name>.py`` that registers
its spec together with its loader (:func:`register_dataset`).

Importable without torch (the Snakefile checks data set names while it builds the DAG): a data set
module imports torch and its file readers inside its loader only. Every data set yields images in
[0, 1] with shape (C, H, W); channel mean and std feed the model's own normalisation layer, so ε and
radii are in pixel units.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from certbench.registry import Registry

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    #: The (train, test) pair a loader returns.
    Split = tuple[Dataset, Dataset]
    #: ``loader(data_dir, download)``: the train and test sets, images float32 in [0, 1] of the spec's shape.
    Loader = Callable[[Path, bool], Split]


@dataclass(frozen=True)
class DatasetSpec:
    """Shape, classes and normalisation of one data set, its customary ε values, and its loader."""

    name: str
    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eps_linf: tuple[float, ...]
    eps_l2: tuple[float, ...]
    source: str
    loader: Loader | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def input_dim(self) -> int:
        return math.prod(self.shape)


DATASETS: Registry[DatasetSpec] = Registry("data set", "certbench.data")


def register_dataset(spec: DatasetSpec) -> Callable[[Loader], Loader]:
    """Register ``spec`` with the decorated function as its loader: a data set is one registration."""

    def decorate(loader: Loader) -> Loader:
        DATASETS.register(spec.name)(dataclasses.replace(spec, loader=loader))
        return loader

    return decorate
