"""The three-ring 2-D toy problem of Pauli et al. (2021, Sec. V-A), generated on the fly.

Three classes of points in the unit square, each uniform (by area) on one annulus around the
centre (0.5, 0.5): class 0 on radii [0, 0.1], class 1 on [0.2, 0.3], class 2 on [0.4, 0.5]. The gaps
of 0.1 between rings leave every point an ℓ2 margin of at least 0.05 to the other classes' supports,
so certified radii up to 0.05 are attainable. (The paper shows the data only as a figure; the ring
radii here are our choice.)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from certbench.data.loaders import tensors
from certbench.data.specs import DatasetSpec, register_dataset

if TYPE_CHECKING:
    from certbench.data.specs import Split

CENTRE = (0.5, 0.5)
RINGS = ((0.0, 0.1), (0.2, 0.3), (0.4, 0.5))


def make_rings2d(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points ``X`` (float32, shape (n, 2), in [0, 1]) with labels ``y`` (int64, 0 … 2).

    Classes are balanced (sizes differ by at most one) and shuffled; the same (n, seed) always
    gives the same data.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(RINGS))
    inner = np.array([RINGS[c][0] for c in labels])
    outer = np.array([RINGS[c][1] for c in labels])
    radius = np.sqrt(rng.uniform(inner**2, outer**2))
    angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
    points = np.stack([CENTRE[0] + radius * np.cos(angle), CENTRE[1] + radius * np.sin(angle)], axis=1)
    return np.clip(points, 0.0, 1.0).astype(np.float32), labels.astype(np.int64)


@register_dataset(
    DatasetSpec(
        "rings2d",
        (1, 1, 2),
        3,
        (0.5,),
        (0.25,),
        (0.02, 0.05),
        (0.02, 0.05),
        "generated: the three-ring 2-D toy problem of Pauli et al. 2021",
    )
)
def load(data_dir: Path, download: bool) -> Split:
    """2,000 training points (seed 0) and 1,000 test points (seed 1), as (N, 1, 1, 2) images."""
    parts = []
    for n, seed in ((2000, 0), (1000, 1)):
        points, labels = make_rings2d(n, seed)
        parts.append(tensors(points.reshape(-1, 1, 1, 2), labels))
    return parts[0], parts[1]
