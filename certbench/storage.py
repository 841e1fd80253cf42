"""Files on disk: atomic writes, a hash beside every file, verified reads. Torch-free.

Every file is written to a temporary name in the same folder, flushed, fsynced and
renamed over the target, so a crash or a full disk leaves the previous file intact.
Each artefact gets a ``<file>.sha256`` beside it; a reader that finds a missing or
mismatching hash refuses the file (:class:`CorruptFileError`) instead of using it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class CorruptFileError(RuntimeError):
    """A file whose content does not match the hash stored beside it, or that cannot be loaded safely."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def atomic_write_bytes(path: str | Path, data: bytes, with_hash: bool = True) -> None:
    """Write ``data`` to ``path`` atomically, and its hash beside it.

    Both temporary files are written and synced before either is renamed into place, so a process
    killed mid-write leaves the old pair, or (in the microseconds between the two renames) a pair
    whose mismatch :func:`read_verified` refuses, never a half-written file that passes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    targets = [(path, data)] + (
        [(_hash_path(path), sha256_bytes(data).encode() + b"\n")] if with_hash else []
    )
    staged: list[tuple[str, Path]] = []
    try:
        for target, payload in targets:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            staged.append((tmp, target))
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
        for tmp, target in staged:
            os.replace(tmp, target)
    except BaseException as error:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"could not write {path}: {error.strerror}") from error
        raise


def read_verified(path: str | Path) -> bytes:
    """The bytes of ``path`` after checking them against ``path.sha256``."""
    path = Path(path)
    hash_file = _hash_path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    if not hash_file.is_file():
        raise CorruptFileError(f"{path}: no hash file {hash_file.name} beside it")
    data = path.read_bytes()
    if sha256_bytes(data) != hash_file.read_text().strip():
        raise CorruptFileError(f"{path}: content does not match its stored hash (truncated or modified)")
    return data


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a record")


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: store them as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | Path, obj: Mapping[str, Any]) -> None:
    text = json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), indent=1, sort_keys=True)
    atomic_write_bytes(path, text.encode() + b"\n")


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(read_verified(path))


def remove_damaged(downstream: Mapping[str | Path, Sequence[str | Path]]) -> list[Path]:
    """Delete every existing file whose hash is missing or wrong, and the files made from it.

    ``downstream`` maps each checked file to the files derived from it. The Snakefile calls
    this while it builds the DAG: Snakemake re-makes a missing file only when something that
    needs it is missing too, so the derived files go as well, and the jobs run again instead
    of a damaged artefact being used. Returns the damaged files.
    """
    damaged = []
    for path, derived in downstream.items():
        path = Path(path)
        if not path.exists():
            continue
        try:
            read_verified(path)
        except CorruptFileError:
            damaged.append(path)
            for victim in (path, *map(Path, derived)):
                victim.unlink(missing_ok=True)
                _hash_path(victim).unlink(missing_ok=True)
    return damaged
