"""Data sets: one module per data set (its spec and its loader), found by :data:`DATASETS`."""

from certbench.data.specs import DATASETS, DatasetSpec, register_dataset

__all__ = ["DATASETS", "DatasetSpec", "register_dataset"]
