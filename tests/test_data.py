"""Data sets: the real loading code on small files written in the real on-disk formats."""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from certbench.data import DATASETS
from certbench.data.cifar10 import NumpyOnlyUnpickler, read_cifar_batch
from certbench.data.fashion_mnist import DEBIAN_FASHION_MNIST
from certbench.data.loaders import DatasetNotFoundError, load_split

RNG = np.random.default_rng(0)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def write_mnist_like(folder: Path, n_train: int, n_test: int, compress: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", RNG.integers(0, 256, (n, 28, 28)), compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", RNG.integers(0, 10, n), compress)


def check_split(name: str, split: tuple, n_train: int, n_test: int) -> None:
    spec = DATASETS.get(name)
    train, test = split
    assert (len(train), len(test)) == (n_train, n_test)
    for dataset in (train, test):
        x, y = dataset[0]
        assert tuple(x.shape) == spec.shape and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert 0 <= int(y) < spec.num_classes


def test_digits_is_real_and_split_deterministically() -> None:
    spec, (train, test) = load_split("digits")
    check_split("digits", (train, test), 1437, 360)
    _, (_, again) = load_split("digits")
    assert torch.equal(test.tensors[0], again.tensors[0])
    counts = torch.bincount(test.tensors[1], minlength=10)
    assert int(counts.min()) >= 35  # stratified: every class about 36 times
    mean = float(train.tensors[0].mean())
    assert abs(mean - spec.mean[0]) < 0.01


def test_digits_split_is_saved_once_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first load saves scikit-learn's split; later loads read the same arrays back without
    splitting again; a damaged file is split and saved again."""
    from certbench.data import digits

    splits = []
    split = digits._split
    monkeypatch.setattr(digits, "_split", lambda: splits.append(1) or split())
    _, (train, test) = load_split("digits", tmp_path)
    (saved,) = tmp_path.glob("digits-split-*.npz")
    _, (train_again, test_again) = load_split("digits", tmp_path)
    assert len(splits) == 1
    for first, again in ((train, train_again), (test, test_again)):
        assert all(torch.equal(a, b) for a, b in zip(first.tensors, again.tensors, strict=True))
    saved.write_bytes(b"not an npz file")
    _, (_, repaired) = load_split("digits", tmp_path)
    _, (_, read_back) = load_split("digits", tmp_path)
    assert len(splits) == 2
    assert torch.equal(repaired.tensors[0], test.tensors[0]) and torch.equal(
        read_back.tensors[0], test.tensors[0]
    )


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_files(tmp_path: Path, compress: bool) -> None:
    write_mnist_like(tmp_path / "MNIST" / "raw", 12, 5, compress)
    _, split = load_split("mnist", tmp_path)
    check_split("mnist", split, 12, 5)
    raw = (
        gzip.decompress((tmp_path / "MNIST/raw/t10k-images-idx3-ubyte.gz").read_bytes())
        if compress
        else (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte").read_bytes()
    )
    assert torch.equal(
        split[1].tensors[0][0, 0],
        torch.tensor(np.frombuffer(raw[16 : 16 + 784], np.uint8).reshape(28, 28)).float() / 255,
    )


def test_fashion_mnist_from_data_dir(tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "fashion-mnist", 7, 3)
    _, split = load_split("fashion-mnist", tmp_path)
    check_split("fashion-mnist", split, 7, 3)


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist(tmp_path: Path) -> None:
    spec, split = load_split("fashion-mnist", tmp_path)
    check_split("fashion-mnist", split, 60000, 10000)
    assert abs(float(split[0].tensors[0].mean()) - spec.mean[0]) < 1e-3
    assert torch.bincount(split[1].tensors[1]).tolist() == [1000] * 10


def write_cifar(folder: Path, per_batch: int) -> None:
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "batch_label": "x",
            "labels": RNG.integers(0, 10, per_batch).tolist(),
            "data": RNG.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
            "filenames": ["a"] * per_batch,
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_python_batches(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py", 4)
    _, split = load_split("cifar10", tmp_path)
    check_split("cifar10", split, 20, 4)


class _Exploit:
    def __reduce__(self):  # pragma: no cover - never executed by the loader
        return (print, ("owned",))


def test_cifar_loader_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({"data": _Exploit(), "labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        read_cifar_batch(path)
    assert NumpyOnlyUnpickler.ALLOWED  # the allow-list is explicit


def write_svhn(folder: Path) -> None:
    from scipy.io import savemat

    folder.mkdir(parents=True)
    for split, n in (("train", 6), ("test", 2)):
        labels = np.array([[10], [3]] * (n // 2), dtype=np.uint8)
        savemat(
            folder / f"{split}_32x32.mat",
            {"X": RNG.integers(0, 256, (32, 32, 3, n)).astype(np.uint8), "y": labels},
        )


def test_svhn_mat_files(tmp_path: Path) -> None:
    write_svhn(tmp_path / "svhn")
    _, split = load_split("svhn", tmp_path)
    check_split("svhn", split, 6, 2)
    assert split[1].tensors[1].tolist() == [0, 3]  # label 10 means digit 0


def write_tinyimagenet(root: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            Image.fromarray(RNG.integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(folder / "a.JPEG")


def test_tinyimagenet_imagefolder(tmp_path: Path) -> None:
    write_tinyimagenet(tmp_path / "tiny-imagenet-200")
    _, (train, test) = load_split("tinyimagenet", tmp_path)
    assert len(train) == len(test) == 2
    x, y = train[0]
    assert tuple(x.shape) == (3, 64, 64) and 0 <= float(x.min()) <= float(x.max()) <= 1


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "mnist",
            r"data set 'mnist' not found: expected train-images-idx3-ubyte\[\.gz\].* in one of .*/mnist, "
            r".*/MNIST/raw; set data\.dir .* or data\.download: true",
        ),
        (
            "cifar10",
            r"data set 'cifar10' not found: expected data_batch_1, .*test_batch in one of "
            r".*cifar-10-batches-py",
        ),
        ("svhn", r"data set 'svhn' not found: expected train_32x32\.mat, test_32x32\.mat"),
        ("tinyimagenet", r"data set 'tinyimagenet' not found"),
    ],
)
def test_missing_data_set_says_what_where_and_how(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DatasetNotFoundError, match=expected):
        load_split(name, tmp_path / "empty")


def test_missing_fashion_mnist_names_the_debian_package(tmp_path: Path, monkeypatch) -> None:
    import certbench.data.fashion_mnist as fashion_mnist

    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match="install the Debian package dataset-fashion-mnist"):
        load_split("fashion-mnist", tmp_path)


#: Small files in each file-based data set's real on-disk format, written under a data.dir; data
#: sets that are generated or bundled with a package need none.
SMALL_FILES = {
    "mnist": lambda root: write_mnist_like(root / "mnist", 6, 4),
    "fashion-mnist": lambda root: write_mnist_like(root / "fashion-mnist", 6, 4),
    "cifar10": lambda root: write_cifar(root / "cifar-10-batches-py", 2),
    "svhn": lambda root: write_svhn(root / "svhn"),
    "tinyimagenet": lambda root: write_tinyimagenet(root / "tiny-imagenet-200"),
}


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_loader_returns_data_matching_its_spec(tmp_path: Path, name: str) -> None:
    """Every registered data set (spec and loader are one registration) loads data of its spec's
    shape, in [0, 1], with labels among its classes."""
    SMALL_FILES.get(name, lambda root: None)(tmp_path)
    try:
        spec, split = load_split(name, tmp_path)
    except DatasetNotFoundError as error:
        pytest.fail(f"{error} — add a writer of small files in its format to SMALL_FILES")
    assert spec is DATASETS.get(name) and spec.loader is not None
    for dataset in split:
        assert len(dataset) > 0
        for index in sorted({0, len(dataset) - 1}):
            x, y = dataset[index]
            assert tuple(x.shape) == spec.shape and x.dtype == torch.float32
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
            assert 0 <= int(y) < spec.num_classes


def test_every_data_set_module_registers_one_data_set() -> None:
    """A data set is one module of certbench/data named after it (``-`` → ``_``)."""
    import pkgutil

    import certbench.data

    shared = {"loaders", "specs"}
    modules = {info.name for info in pkgutil.iter_modules(certbench.data.__path__)} - shared
    assert modules == {name.replace("-", "_") for name in DATASETS.names()}
    for name in DATASETS.names():
        assert DATASETS.get(name).loader.__module__ == f"certbench.data.{name.replace('-', '_')}"


def test_data_set_names_are_known_without_torch() -> None:
    """The DAG checks data set names: looking into the registry imports every data set module, never torch."""
    import subprocess

    code = (
        "import sys; from certbench.data import DATASETS; names = DATASETS.names(); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print(len(names))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(DATASETS.names())
