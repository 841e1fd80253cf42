"""Shared fixtures: a small real data set and quick models."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import settings

# One thread per test process: with several processes on two cores, more threads only contend.
torch.set_num_threads(1)

# Property tests draw the same examples on every run, so a CI result can be reproduced;
# `pytest --hypothesis-profile=explore` draws new ones. No deadlines: a first example may
# compile the ℓ∞-dist kernel or parse a model, and timing on a shared CPU is noise.
settings.register_profile("reproducible", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile("reproducible")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Training runs on one thread: much faster than a thread pool on a busy 2-core machine (a test
    that ran the CLI with more threads in the same process may have raised it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded_rngs() -> None:
    """Every test starts from the same random state, whichever worker runs it and whatever ran
    before: a failure reproduces with ``pytest path::test`` alone."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.fixture()
def smoke_config() -> dict:
    return copy.deepcopy(yaml.safe_load((REPO / "config" / "smoke.yaml").read_text()))
