"""scikit-learn's bundled 8×8 digits (1,797 images), a deterministic stratified 80/20 split."""

from __future__ import annotations

import os
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from certbench.data.loaders import tensors
from certbench.data.specs import DatasetSpec, register_dataset

if TYPE_CHECKING:
    from certbench.data.specs import Split


@register_dataset(
    DatasetSpec(
        "digits",
        (1, 8, 8),
        10,
        (0.3051,),
        (0.3783,),
        (0.05, 0.1),
        (0.25, 0.5),
        "scikit-learn's bundled load_digits (1,797 images)",
    )
)
def load(data_dir: Path, download: bool) -> Split:
    """The 1,797 digits scaled to [0, 1], split 80/20 stratified by class with a fixed seed.

    The split is scikit-learn's (``train_test_split``), saved once under ``data_dir`` as
    ``digits-split-<scikit-learn version>.npz`` and read from there afterwards: importing
    scikit-learn takes about a second, which every train, certify and attack job of the DAG
    would otherwise pay. A new scikit-learn version makes a new file; the saved arrays are the
    ones scikit-learn returned, byte for byte.
    """
    cache = data_dir / f"digits-split-{version('scikit-learn')}.npz"
    try:
        with np.load(cache) as saved:
            arrays = [saved[key] for key in _ARRAYS]
    except (OSError, KeyError, ValueError):  # absent, unreadable or partial: split again
        arrays = _split()
        _save(cache, arrays)
    x_tr, x_te, y_tr, y_te = arrays
    return tensors(x_tr, y_tr), tensors(x_te, y_te)


_ARRAYS = ("x_train", "x_test", "y_train", "y_test")


def _split() -> list[np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(images, bunch.target, test_size=0.2, stratify=bunch.target, random_state=0)


def _save(cache: Path, arrays: list[np.ndarray]) -> None:
    """Write atomically (jobs running side by side may write it at once); a data directory that
    cannot be written only means the split is computed again next time."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".npz", delete=False) as handle:
            np.savez(handle, **dict(zip(_ARRAYS, arrays, strict=True)))
        os.replace(handle.name, cache)
    except OSError:
        pass
