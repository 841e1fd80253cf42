"""GPU slots on a CPU machine with a simulated GPU count: distinct slots, freed by a kill, waits, gpu=0.

Jobs are subprocesses that claim their GPUs, print ``CUDA_VISIBLE_DEVICES`` and hold their slots until
their stdin closes; the tests order them by the lines they print (no sleeps).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import IO

import pytest

from certbench import cli, gpu_slots
from certbench.gpu_slots import (
    GPU_COUNT_ENV,
    LOCK_DIR_ENV,
    VISIBLE_DEVICES,
    GpuRequestError,
    claim_gpus,
    gpu_count,
)

REPO = Path(__file__).resolve().parents[1]
LINE_TIMEOUT = 120  # seconds: only a safety net against a hung test, never what orders the jobs

JOB = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from certbench.gpu_slots import claim_gpus
claim_gpus(int(sys.argv[1]))
print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
sys.stdin.readline()
"""


class Job:
    """A subprocess that claims ``gpus`` GPUs and holds them until :meth:`release` or a kill."""

    def __init__(self, gpus: int, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", JOB, str(gpus)],
            cwd=REPO,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.stdout = _lines(self.process.stdout)
        self.stderr = _lines(self.process.stderr)

    def devices(self) -> set[str]:
        """The GPUs it holds, once it holds them."""
        return set(self.stdout.get(timeout=LINE_TIMEOUT).strip().split(","))

    def wait_for_log(self, text: str) -> None:
        while text not in self.stderr.get(timeout=LINE_TIMEOUT):
            pass

    def release(self) -> None:
        self.process.communicate(timeout=LINE_TIMEOUT)


def _lines(stream: IO[str]) -> queue.Queue[str]:
    """The stream's lines as they come, read by a thread, so a test waits for one with a timeout."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.fixture
def locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh lock directory, no scheduler assignment, and this process's slots freed after the test."""
    directory = tmp_path / "locks"
    monkeypatch.setenv(LOCK_DIR_ENV, str(directory))
    monkeypatch.delenv(VISIBLE_DEVICES, raising=False)
    held: list[int] = []
    monkeypatch.setattr(gpu_slots, "_held", held)
    yield directory
    for handle in held:
        os.close(handle)


def job_env(gpu_count: int) -> dict[str, str]:
    return {**os.environ, GPU_COUNT_ENV: str(gpu_count)}


@pytest.mark.parametrize(("count", "requests"), [(3, [1, 1, 1]), (4, [2, 2]), (3, [2, 1])])
def test_concurrent_jobs_never_share_a_slot(locks: Path, count: int, requests: list[int]) -> None:
    jobs = [Job(gpus, job_env(count)) for gpus in requests]  # all started before any is read
    held = [job.devices() for job in jobs]
    for job in jobs:
        job.release()
    assert [len(devices) for devices in held] == requests
    assert set().union(*held) <= {str(index) for index in range(count)}
    assert sum(map(len, held)) == len(set().union(*held))


def test_a_job_waits_for_a_full_machine_and_takes_the_slot_of_a_killed_job(locks: Path) -> None:
    first, second = Job(1, job_env(2)), Job(1, job_env(2))
    first_devices, second_devices = first.devices(), second.devices()
    waiting = Job(1, job_env(2))
    waiting.wait_for_log("waiting for 1 free GPU slot(s): GPUs 0,1 are held by other jobs")
    first.process.send_signal(signal.SIGKILL)
    assert waiting.devices() == first_devices != second_devices
    assert second.process.poll() is None
    for job in (first, second, waiting):
        job.release()


def test_a_job_without_gpus_sees_none_and_locks_nothing(locks: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GPU_COUNT_ENV, "2")
    monkeypatch.setenv(VISIBLE_DEVICES, "0,1")
    claim_gpus(0)
    assert os.environ[VISIBLE_DEVICES] == ""  # CUDA starts with no device: the job cannot touch a GPU
    assert not locks.exists()


def test_nothing_requested_leaves_the_environment_alone(locks: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VISIBLE_DEVICES, "1")
    claim_gpus(None)
    assert os.environ[VISIBLE_DEVICES] == "1" and not locks.exists()


def test_a_matching_scheduler_assignment_is_kept(locks: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GPU_COUNT_ENV, "8")
    monkeypatch.setenv(VISIBLE_DEVICES, "5,3")
    claim_gpus(2)
    assert os.environ[VISIBLE_DEVICES] == "5,3" and not locks.exists()


def test_slots_are_taken_among_assigned_devices(locks: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GPU_COUNT_ENV, "8")
    chosen = []
    for _ in range(2):  # a second claim in the same process conflicts with the first one's lock, too
        monkeypatch.setenv(VISIBLE_DEVICES, "6, 2,GPU-0a1b")
        claim_gpus(1)
        chosen.append(os.environ[VISIBLE_DEVICES])
    assert chosen == ["6", "2"]


@pytest.mark.parametrize(
    ("count", "assigned", "requested", "message"),
    [
        ("1", None, 2, "requested 2 GPU(s) but this machine has 1"),
        ("0", None, 1, "requested 1 GPU(s) but this machine has 0"),
        ("4", "", 1, "requested 1 GPU(s) but CUDA_VISIBLE_DEVICES='' lists 0"),
        ("4", "0,1", 3, "requested 3 GPU(s) but CUDA_VISIBLE_DEVICES='0,1' lists 2"),
        ("two", None, 1, "CERTBENCH_GPU_COUNT='two': expected a count of GPUs"),
        ("1", None, -1, "requested -1 GPUs: expected 0 or more"),
    ],
)
def test_requests_that_cannot_be_met_fail(
    locks: Path,
    monkeypatch: pytest.MonkeyPatch,
    count: str,
    assigned: str | None,
    requested: int,
    message: str,
) -> None:
    monkeypatch.setenv(GPU_COUNT_ENV, count)
    if assigned is not None:
        monkeypatch.setenv(VISIBLE_DEVICES, assigned)
    with pytest.raises(GpuRequestError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        claim_gpus(requested)


def test_claiming_after_cuda_started_is_refused(locks: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = SimpleNamespace(cuda=SimpleNamespace(is_initialized=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", started)
    with pytest.raises(RuntimeError, match="CUDA already started"):
        claim_gpus(0)


def test_gpu_count_from_nvidia_smi_then_the_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GPU_COUNT_ENV, raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    proc = tmp_path / "gpus"
    for address in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
        (proc / address).mkdir(parents=True)
    monkeypatch.setattr(gpu_slots, "NVIDIA_PROC_GPUS", proc)
    assert gpu_count() == 3  # no nvidia-smi on PATH: the driver's entries
    nvidia_smi = bin_dir / "nvidia-smi"
    nvidia_smi.write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-a)'\n"
        "echo '  MIG 1g.18gb Device 0: (UUID: MIG-b)'\n"
        "echo 'GPU 1: NVIDIA H200 (UUID: GPU-c)'\n"
    )
    nvidia_smi.chmod(0o755)
    assert gpu_count() == 2
    monkeypatch.setenv(GPU_COUNT_ENV, "5")
    assert gpu_count() == 5


class FirstTorchUse(Exception):
    pass


@pytest.mark.parametrize(("gpus", "expected"), [([], "7"), (["--gpus", "0"], ""), (["--gpus", "1"], "0")])
def test_the_cli_claims_gpus_before_torch(
    locks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: list[str], expected: str
) -> None:
    monkeypatch.setenv(GPU_COUNT_ENV, "8")
    if not gpus:
        monkeypatch.setenv(VISIBLE_DEVICES, "7")
    seen = []

    def first_torch_use(threads: int) -> None:
        seen.append(os.environ.get(VISIBLE_DEVICES))
        raise FirstTorchUse

    monkeypatch.setattr(cli, "_threads", first_torch_use)
    run_config = tmp_path / "run.json"
    run_config.write_text("{}")
    with pytest.raises(FirstTorchUse):
        cli.main(["train", "--run-config", str(run_config), "--out-dir", str(tmp_path / "run"), *gpus])
    assert seen == [expected]


def test_the_cli_reports_an_impossible_request_in_one_line(
    locks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv(GPU_COUNT_ENV, "1")
    run_config = tmp_path / "run.json"
    run_config.write_text("{}")
    code = cli.main(
        ["train", "--run-config", str(run_config), "--out-dir", str(tmp_path / "run"), "--gpus", "2"]
    )
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "certbench: requested 2 GPU(s) but this machine has 1 (nvidia-smi -L; CERTBENCH_GPU_COUNT overrides "
        "it)"
    ]
