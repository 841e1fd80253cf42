"""Tensor files and provenance of records.

Tensors are loaded with ``weights_only=True`` only, after their hash is verified: a
file that needs pickle, or that was truncated or modified, is refused.
"""

from __future__ import annotations

import io
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from certbench.config import REPO_ROOT
from certbench.storage import CorruptFileError, atomic_write_bytes, read_verified


def save_tensors(path: str | Path, obj: Mapping[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(dict(obj), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_tensors(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint or state dict: hash verified, ``weights_only=True``; anything else is refused."""
    data = read_verified(path)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:
        raise CorruptFileError(
            f"{path}: refused, it does not load with weights_only=True "
            f"({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from None


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    sha = out.stdout.strip() or "unknown"
    return sha + ("-dirty" if dirty.stdout.strip() else "")


PACKAGES = (
    "certbench",
    "torch",
    "torchvision",
    "numpy",
    "scikit-learn",
    "auto_LiRPA",
    "foolbox",
    "torchattacks",
    "cvxpy",
    "scs",
    "snakemake",
    "onnx",
    "onnxruntime",
    "onnx2torch",
)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance(device: torch.device, config_hash: str) -> dict[str, Any]:
    return {
        "git_sha": git_sha(),
        "versions": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "config_hash": config_hash,
    }
