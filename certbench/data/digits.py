"""scikit-learn's bundled 8×8 digits (1,797 images), a deterministic stratified 80/20 split."""

from __future__ import annotations

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
    """The 1,797 digits scaled to [0, 1], split 80/20 stratified by class with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, bunch.target, test_size=0.2, stratify=bunch.target, random_state=0
    )
    return tensors(x_tr, y_tr), tensors(x_te, y_te)
