"""A GPU of its own for each job: one file lock per GPU slot, exposed as ``CUDA_VISIBLE_DEVICES``.

Snakemake's ``--resources gpu=N`` caps how many GPU jobs run at once but tells none of them which
GPU is its own, so without help they all use ``cuda:0``. A job that requested ``n`` GPUs calls
:func:`claim_gpus` before anything starts CUDA (CUDA reads ``CUDA_VISIBLE_DEVICES`` once, when it
starts), and this module

- takes ``n`` free slots among the machine's GPUs, each with an exclusive ``flock`` on its own lock
  file, and sets ``CUDA_VISIBLE_DEVICES`` to them. The lock files stay open until the process ends,
  so the kernel frees the slots of a job that ends in any way, ``SIGKILL`` included (a forked child,
  such as a data loader worker, shares them until it exits too). When every slot is held the job
  waits, with one log line, until enough are free: Snakemake's ``--resources gpu=N`` already bounds how
  many GPU jobs run, so a wait means it was not given, or another DAG holds GPUs;
- respects a scheduler's assignment: when ``CUDA_VISIBLE_DEVICES`` is already set (SLURM sets it for
  ``--gpus``), it chooses only among the devices listed there, and leaves the variable as it is when
  they are exactly as many as requested (no lock: the scheduler already made them the job's own);
- hides every GPU from a job that requested none (``CUDA_VISIBLE_DEVICES=""``): it never touches CUDA.

The GPU count comes from ``nvidia-smi -L``, else the driver's ``/proc/driver/nvidia/gpus/`` entries,
never from torch (asking torch would start CUDA); ``CERTBENCH_GPU_COUNT`` overrides it. The lock
files live in ``CERTBENCH_GPU_LOCK_DIR``, else in ``certbench-gpu-slots-<uid>`` in the system's
temporary directory: a local directory that every job of the user on this machine shares, whatever
its results directory, since the GPUs belong to the machine and not to one DAG.
This module imports no torch.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
GPU_COUNT_ENV = "CERTBENCH_GPU_COUNT"
LOCK_DIR_ENV = "CERTBENCH_GPU_LOCK_DIR"
NVIDIA_PROC_GPUS = Path("/proc/driver/nvidia/gpus")
POLL_SECONDS = 0.5

# Open lock files of the slots this process holds: never closed, so the locks last as long as it does.
_held: list[int] = []


class GpuRequestError(Exception):
    """A job asks for GPUs it can never get here (more than the machine or the scheduler gives)."""


def gpu_count() -> int:
    """GPUs on this machine, found without starting CUDA (see the module docstring)."""
    override = os.environ.get(GPU_COUNT_ENV)
    if override is not None:
        if not override.strip().isdigit():
            raise GpuRequestError(f"{GPU_COUNT_ENV}={override!r}: expected a count of GPUs (0, 1, 2, ...)")
        return int(override)
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi:
        try:
            listing = subprocess.run(
                [nvidia_smi, "-L"], capture_output=True, text=True, check=False, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired):
            listing = None
        if listing is not None and listing.returncode == 0:
            return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())
    if NVIDIA_PROC_GPUS.is_dir():
        return sum(1 for _ in NVIDIA_PROC_GPUS.iterdir())
    return 0


def lock_dir() -> Path:
    """Where the slots' lock files live: ``$CERTBENCH_GPU_LOCK_DIR``, else a per-user temporary directory."""
    configured = os.environ.get(LOCK_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"certbench-gpu-slots-{os.getuid()}"


def claim_gpus(requested: int | None) -> None:
    """Make ``requested`` GPUs this process's own through ``CUDA_VISIBLE_DEVICES``, waiting for free ones.

    ``None`` (nothing was requested, e.g. a command run by hand) leaves the environment as it is;
    ``0`` hides every GPU. Call it before anything in the process starts CUDA.
    """
    if requested is None:
        return
    if requested < 0:
        raise GpuRequestError(f"requested {requested} GPUs: expected 0 or more")
    _check_cuda_not_started()
    if requested == 0:
        os.environ[VISIBLE_DEVICES] = ""
        return
    assigned = os.environ.get(VISIBLE_DEVICES)
    if assigned is None:
        devices = [str(index) for index in range(gpu_count())]
        source = f"this machine has {len(devices)} (nvidia-smi -L; {GPU_COUNT_ENV} overrides it)"
    else:
        devices = [device.strip() for device in assigned.split(",") if device.strip()]
        source = f"{VISIBLE_DEVICES}={assigned!r} lists {len(devices)}"
        if len(devices) == requested:
            log.info("using the GPUs assigned by the scheduler: %s=%s", VISIBLE_DEVICES, assigned)
            return
    if len(devices) < requested:
        raise GpuRequestError(f"requested {requested} GPU(s) but {source}")
    chosen = _lock_free_slots(devices, requested, lock_dir())
    os.environ[VISIBLE_DEVICES] = ",".join(chosen)
    log.info(
        "%s=%s: this job holds these GPU slots of %s",
        VISIBLE_DEVICES,
        os.environ[VISIBLE_DEVICES],
        ",".join(devices),
    )


def _check_cuda_not_started() -> None:
    torch = sys.modules.get("torch")  # never imported here: only looked at when someone else imported it
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError(f"CUDA already started in this process; {VISIBLE_DEVICES} must be set before")


def _lock_free_slots(devices: list[str], requested: int, directory: Path) -> list[str]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    waiting = False
    while True:
        taken = _try_lock(devices, requested, directory)
        if taken is not None:
            _held.extend(handle for _, handle in taken)
            return [device for device, _ in taken]
        if not waiting:
            log.warning(
                "waiting for %d free GPU slot(s): GPUs %s are held by other jobs (lock files in %s)",
                requested,
                ",".join(devices),
                directory,
            )
            waiting = True
        time.sleep(POLL_SECONDS)


def _try_lock(devices: list[str], requested: int, directory: Path) -> list[tuple[str, int]] | None:
    """``requested`` newly locked slots, or ``None`` with nothing held (never some while waiting for more)."""
    taken: list[tuple[str, int]] = []
    for device in devices:
        path = directory / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.lock"
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            continue
        taken.append((device, handle))
        if len(taken) == requested:
            return taken
    for _, handle in taken:
        os.close(handle)
    return None
