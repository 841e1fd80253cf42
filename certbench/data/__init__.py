"""Data sets: specifications (torch-free) and loaders."""

from certbench.data.specs import DATASETS, DatasetSpec

__all__ = ["DATASETS", "DatasetSpec"]
