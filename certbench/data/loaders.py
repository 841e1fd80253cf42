"""What the data set modules share: loading by name, the not-found error, tensors, the IDX format.

Real on-disk formats are read directly; torchvision downloads only when the config says
``download: true``. Importable without torch: torch is imported when data is loaded.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from certbench.data.specs import DATASETS, DatasetSpec

if TYPE_CHECKING:
    from torch.utils.data import TensorDataset

    from certbench.data.specs import Split


class DatasetNotFoundError(FileNotFoundError):
    """A data set whose files are missing; the message says what, where and how to get them."""

    def __str__(self) -> str:
        return str(self.args[0])


def missing(name: str, files: list[str], searched: list[Path], remedy: str) -> DatasetNotFoundError:
    """The error for data set ``name`` whose ``files`` are in none of the ``searched`` folders."""
    return DatasetNotFoundError(
        f"data set '{name}' not found: expected {', '.join(files)} in one of "
        f"{', '.join(str(p) for p in searched)}; {remedy}"
    )


def tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """uint8 or float images (N, C, H, W) → float32 in [0, 1]; labels → int64."""
    import torch
    from torch.utils.data import TensorDataset

    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def load_split(name: str, data_dir: str | Path = "data", download: bool = False) -> tuple[DatasetSpec, Split]:
    """The spec and the (train, test) data sets of ``name``."""
    spec = DATASETS.get(name)
    assert spec.loader is not None, "register_dataset always sets the loader"
    return spec, spec.loader(Path(data_dir), download)


# --- IDX (LeCun's format: MNIST, Fashion-MNIST) ---------------------------------------------

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (LeCun's format), gzip-compressed or raw."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims).copy()


def _find(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                return candidate
    return None


def idx_split(name: str, folders: list[Path], remedy: str, fetch: Callable[[], None] | None) -> Split:
    """The train and test sets of an IDX data set in the first of ``folders`` that holds each file;
    ``fetch`` (a download) runs once when a file is missing."""

    def locate() -> dict[str, Path | None]:
        return {stem: _find(folders, stem) for pair in IDX_FILES.values() for stem in pair}

    found = locate()
    if None in found.values() and fetch is not None:
        fetch()
        found = locate()
    if None in found.values():
        raise missing(name, [f"{s}[.gz]" for s in found], folders, remedy)
    parts = []
    for images_stem, labels_stem in IDX_FILES.values():
        images = read_idx(found[images_stem])  # type: ignore[arg-type]
        parts.append(tensors(images[:, None], read_idx(found[labels_stem])))  # type: ignore[arg-type]
    return parts[0], parts[1]
