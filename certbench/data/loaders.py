"""Loading data sets from disk (or a package) into tensors in [0, 1].

Real on-disk formats are read directly: MNIST-style IDX (gzip or raw), CIFAR-10
python batches (through a restricted unpickler that builds only numpy arrays, so a
tampered batch file cannot run code), SVHN ``.mat`` (scipy), TinyImageNet as an
ImageFolder tree (torchvision). torchvision downloads only when the config says
``download: true``.
"""

from __future__ import annotations

import gzip
import io
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from certbench.data.specs import DATASETS, DatasetSpec

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
Split = tuple[Dataset, Dataset]


class DatasetNotFoundError(FileNotFoundError):
    """A data set whose files are missing; the message says what, where and how to get them."""

    def __str__(self) -> str:
        return str(self.args[0])


def _missing(name: str, files: list[str], searched: list[Path], remedy: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"data set '{name}' not found: expected {', '.join(files)} in one of "
        f"{', '.join(str(p) for p in searched)}; {remedy}")


def _tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """uint8 or float images (N, C, H, W) → float32 in [0, 1]; labels → int64."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


# --- digits -----------------------------------------------------------------------

def load_digits_split(data_dir: Path, download: bool) -> Split:
    """scikit-learn's 1,797 8×8 digits, a deterministic stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(images, bunch.target, test_size=0.2,
                                              stratify=bunch.target, random_state=0)
    return _tensors(x_tr, y_tr), _tensors(x_te, y_te)


# --- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (LeCun's format), gzip-compressed or raw."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
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


def _idx_split(name: str, folders: list[Path], remedy: str,
               fetch: Callable[[], None] | None) -> Split:
    def locate() -> dict[str, Path | None]:
        return {stem: _find(folders, stem) for pair in IDX_FILES.values() for stem in pair}

    found = locate()
    if None in found.values() and fetch is not None:
        fetch()
        found = locate()
    if None in found.values():
        raise _missing(name, [f"{s}[.gz]" for s in found], folders, remedy)
    parts = []
    for images_stem, labels_stem in IDX_FILES.values():
        images = read_idx(found[images_stem])  # type: ignore[arg-type]
        parts.append(_tensors(images[:, None], read_idx(found[labels_stem])))  # type: ignore[arg-type]
    return parts[0], parts[1]


def load_mnist_split(data_dir: Path, download: bool) -> Split:
    def fetch() -> None:
        from torchvision.datasets import MNIST
        MNIST(str(data_dir), download=True)

    return _idx_split("mnist", [data_dir / "mnist", data_dir / "MNIST" / "raw"],
                      "set data.dir to the folder that holds them, or data.download: true",
                      fetch if download else None)


def load_fashion_mnist_split(data_dir: Path, download: bool) -> Split:
    def fetch() -> None:
        from torchvision.datasets import FashionMNIST
        FashionMNIST(str(data_dir), download=True)

    return _idx_split("fashion-mnist",
                      [data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST],
                      "install the Debian package dataset-fashion-mnist, set data.dir, or data.download: true",
                      fetch if download else None)


# --- CIFAR-10 -----------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of bytes, lists and numpy arrays) and nothing else.

    ``_codecs.encode`` is how Python 3 pickles bytes at protocol 2; it only encodes a string.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch → (uint8 images (N, 3, 32, 32), labels)."""
    with path.open("rb") as handle:
        batch = _NumpyOnlyUnpickler(io.BufferedReader(handle), encoding="latin1").load()
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch["labels"], dtype=np.int64)


CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]


def load_cifar10_split(data_dir: Path, download: bool) -> Split:
    folder = data_dir / "cifar-10-batches-py"
    if download and not all((folder / f).is_file() for f in CIFAR_TRAIN + CIFAR_TEST):
        from torchvision.datasets import CIFAR10
        CIFAR10(str(data_dir), download=True)
    missing = [f for f in CIFAR_TRAIN + CIFAR_TEST if not (folder / f).is_file()]
    if missing:
        raise _missing("cifar10", CIFAR_TRAIN + CIFAR_TEST, [folder],
                       "set data.dir to the folder holding cifar-10-batches-py, or data.download: true")
    parts = []
    for names in (CIFAR_TRAIN, CIFAR_TEST):
        images, labels = zip(*(read_cifar_batch(folder / n) for n in names))
        parts.append(_tensors(np.concatenate(images), np.concatenate(labels)))
    return parts[0], parts[1]


# --- SVHN ---------------------------------------------------------------------------

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped digits: X (32, 32, 3, N), y (N, 1) with label 10 meaning digit 0."""
    from scipy.io import loadmat

    mat = loadmat(str(path))
    images = np.transpose(mat["X"], (3, 2, 0, 1))
    labels = mat["y"].astype(np.int64).reshape(-1) % 10
    return images, labels


def load_svhn_split(data_dir: Path, download: bool) -> Split:
    folders = [data_dir / "svhn", data_dir]
    parts = []
    for split, filename in SVHN_FILES.items():
        path = next((f / filename for f in folders if (f / filename).is_file()), None)
        if path is None and download:
            from torchvision.datasets import SVHN
            SVHN(str(data_dir / "svhn"), split=split, download=True)
            path = data_dir / "svhn" / filename
        if path is None:
            raise _missing("svhn", list(SVHN_FILES.values()), folders,
                           "set data.dir to the folder holding them, or data.download: true")
        parts.append(_tensors(*read_svhn_mat(path)))
    return parts[0], parts[1]


# --- TinyImageNet -------------------------------------------------------------------

def load_tinyimagenet_split(data_dir: Path, download: bool) -> Split:
    """TinyImageNet in the ImageFolder layout: ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = data_dir / "tiny-imagenet-200"
    folders = [root / "train", root / "val"]
    if not all(f.is_dir() for f in folders):
        raise _missing("tinyimagenet", ["train/<class>/*", "val/<class>/*"], [root],
                       "arrange TinyImageNet as ImageFolder trees under <data.dir>/tiny-imagenet-200 "
                       "(torchvision cannot download it)")
    to_tensor = transforms.ToTensor()
    train, test = (ImageFolder(str(f), transform=to_tensor) for f in folders)
    return train, test


# --- rings2d --------------------------------------------------------------------------

def load_rings2d_split(data_dir: Path, download: bool) -> Split:
    """The three-ring 2-D toy problem of Pauli et al. (2021), generated with fixed seeds."""
    from certbench.data.rings2d import make_rings2d

    parts = []
    for n, seed in ((2000, 0), (1000, 1)):
        points, labels = make_rings2d(n, seed)
        parts.append(_tensors(points.reshape(-1, 1, 1, 2), labels))
    return parts[0], parts[1]


LOADERS: dict[str, Callable[[Path, bool], Split]] = {
    "digits": load_digits_split,
    "fashion-mnist": load_fashion_mnist_split,
    "mnist": load_mnist_split,
    "cifar10": load_cifar10_split,
    "svhn": load_svhn_split,
    "tinyimagenet": load_tinyimagenet_split,
    "rings2d": load_rings2d_split,
}


def load_split(name: str, data_dir: str | Path = "data", download: bool = False) -> tuple[DatasetSpec, Split]:
    """The spec and the (train, test) data sets of ``name``."""
    spec = DATASETS.get(name)
    return spec, LOADERS[name](Path(data_dir), download)
