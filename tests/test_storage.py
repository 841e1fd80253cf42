"""Files on disk: atomic replacement, hashes beside files, a failed write leaves the old file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from certbench import storage
from certbench.storage import CorruptFileError, read_json, read_verified, write_json


def test_roundtrip_keeps_infinities(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"radius": [1.0, float("inf")], "x": float("nan")})
    data = read_json(tmp_path / "a.json")
    assert data["radius"] == [1.0, "inf"] and data["x"] == "nan"


def test_modified_or_unhashed_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    write_json(path, {"a": 1})
    path.write_text(path.read_text().replace("1", "2"))
    with pytest.raises(CorruptFileError, match="does not match its stored hash"):
        read_json(path)
    (tmp_path / "a.json.sha256").unlink()
    with pytest.raises(CorruptFileError, match="no hash file"):
        read_verified(path)


def test_disk_full_midway_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "record.json"
    write_json(path, {"version": 1})
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", full_disk)
    with pytest.raises(OSError, match=f"could not write {path}: No space left on device"):
        write_json(path, {"version": 2})
    monkeypatch.setattr(storage.os, "fsync", real_fsync)
    assert read_json(path) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json", "record.json.sha256"]
