"""Shared fixtures: a small real data set and quick models."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

# One thread per test process: with several processes on two cores, more threads only contend.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.fixture()
def smoke_config() -> dict:
    return copy.deepcopy(yaml.safe_load((REPO / "config" / "smoke.yaml").read_text()))
