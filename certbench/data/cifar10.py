"""CIFAR-10 from its python batches (Krizhevsky 2009), read by an unpickler that builds only numpy
arrays, so a tampered batch file cannot run code."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from certbench.data.loaders import missing, tensors
from certbench.data.specs import DatasetSpec, register_dataset

if TYPE_CHECKING:
    from certbench.data.specs import Split

CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of bytes, lists and numpy arrays) and nothing else.

    ``_codecs.encode`` is how Python 3 pickles bytes at protocol 2; it only encodes a string.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch → (uint8 images (N, 3, 32, 32), labels)."""
    with path.open("rb") as handle:
        batch = NumpyOnlyUnpickler(io.BufferedReader(handle), encoding="latin1").load()
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch["labels"], dtype=np.int64)


@register_dataset(
    DatasetSpec(
        "cifar10",
        (3, 32, 32),
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        (2 / 255, 8 / 255),
        (36 / 255, 0.5),
        "python batches in <data.dir>/cifar-10-batches-py",
    )
)
def load(data_dir: Path, download: bool) -> Split:
    folder = data_dir / "cifar-10-batches-py"
    if download and not all((folder / f).is_file() for f in CIFAR_TRAIN + CIFAR_TEST):
        from torchvision.datasets import CIFAR10

        CIFAR10(str(data_dir), download=True)
    if not all((folder / f).is_file() for f in CIFAR_TRAIN + CIFAR_TEST):
        raise missing(
            "cifar10",
            CIFAR_TRAIN + CIFAR_TEST,
            [folder],
            "set data.dir to the folder holding cifar-10-batches-py, or data.download: true",
        )
    parts = []
    for names in (CIFAR_TRAIN, CIFAR_TEST):
        images, labels = zip(*(read_cifar_batch(folder / n) for n in names))
        parts.append(tensors(np.concatenate(images), np.concatenate(labels)))
    return parts[0], parts[1]
