"""The training loop: resume after SIGKILL, refused checkpoints, divergence, the time budget."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from certbench import config as cfg
from certbench.method import METHODS, LossOutput, Method, register_method
from certbench.records import load_tensors, save_tensors
from certbench.storage import CorruptFileError, read_json, read_verified, write_json
from certbench.train import train

REPO = Path(__file__).resolve().parents[1]


def run_config(smoke_config: dict, **training) -> dict:
    smoke_config["training"].update(training)
    filled = cfg.validate_schema(smoke_config)
    return cfg.resolve_run(filled, cfg.runs(filled)[0])


def train_subprocess(config_path: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "certbench.cli",
            "train",
            "--run-config",
            str(config_path),
            "--out-dir",
            str(out),
            "--threads",
            "1",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def verifies(path: Path) -> bool:
    """Whether a complete checkpoint (file and matching hash) is in place: a kill after this loses no
    epoch."""
    try:
        read_verified(path)
    except (FileNotFoundError, CorruptFileError):
        return False
    return True


def test_sigkill_mid_training_resumes_to_the_same_model(tmp_path: Path, smoke_config: dict) -> None:
    smoke_config["experiments"] = [{"method": "standard", "arch": "cnn-small"}]
    smoke_config["datasets"]["digits"]["train_size"] = None
    config = run_config(smoke_config, epochs=6)
    write_json(tmp_path / "run.json", config)
    reference = train_subprocess(tmp_path / "run.json", tmp_path / "reference")
    killed = train_subprocess(tmp_path / "run.json", tmp_path / "killed")
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not verifies(checkpoint) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (tmp_path / "killed" / "train.json").exists()
    assert train_subprocess(tmp_path / "run.json", tmp_path / "killed").wait() == 0
    assert reference.wait() == 0
    resumed, uninterrupted = (read_json(tmp_path / d / "train.json") for d in ("killed", "reference"))
    assert 1 <= resumed["resumed_from_epoch"] < 6
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in uninterrupted["history"]]
    a, b = (load_tensors(tmp_path / d / "model.pt") for d in ("killed", "reference"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["truncate", "flip", "pickle"])
def test_damaged_or_foreign_checkpoint_is_refused_and_training_restarts(
    tmp_path: Path, smoke_config: dict, damage: str, caplog
) -> None:
    config = run_config(smoke_config, epochs=2)
    train(config, tmp_path)
    checkpoint = tmp_path / "checkpoint.pt"
    if damage == "truncate":
        checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(checkpoint.read_bytes())
        data[len(data) // 2] ^= 0xFF
        checkpoint.write_bytes(bytes(data))
    else:  # a checkpoint that needs pickle to load, with a valid hash beside it

        class Payload:
            def __reduce__(self):
                return (exec, ("import os; os.environ['CERTBENCH_PWNED'] = '1'",))

        save_tensors(checkpoint, {"config_hash": cfg.config_hash(config), "payload": Payload()})
        with pytest.raises(CorruptFileError, match="does not load with weights_only=True"):
            load_tensors(checkpoint)
    with caplog.at_level("WARNING"):
        record = train(config, tmp_path)
    assert record["resumed_from_epoch"] == 0 and record["epochs_completed"] == 2
    assert "not resuming" in caplog.text
    import os

    assert "CERTBENCH_PWNED" not in os.environ


def test_checkpoint_of_another_configuration_is_not_used(tmp_path: Path, smoke_config: dict) -> None:
    train(run_config(smoke_config, epochs=2), tmp_path)
    record = train(run_config(smoke_config, epochs=2, lr=0.01), tmp_path)
    assert record["resumed_from_epoch"] == 0


def test_nan_loss_stops_with_status_diverged(tmp_path: Path, smoke_config: dict) -> None:
    @register_method("test-diverges")
    class Diverges(Method):
        def loss(self, model, x, y, progress):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            return LossOutput(loss * (float("nan") if progress > 0.5 else 1.0))

    try:
        smoke_config["experiments"] = [{"method": "test-diverges", "arch": "mlp"}]
        record = train(run_config(smoke_config, epochs=3), tmp_path)
    finally:
        METHODS._entries.pop("test-diverges")
    assert record["status"] == "diverged"
    assert "loss is nan" in record["message"]
    assert record["epochs_completed"] == 1
    assert (tmp_path / "model.pt").exists() and read_json(tmp_path / "train.json")["status"] == "diverged"


def test_wall_clock_budget_derives_the_epoch_count(tmp_path: Path, smoke_config: dict) -> None:
    record = train(run_config(smoke_config, epochs=1000, budget_seconds=1.5), tmp_path)
    assert 1 <= record["epochs"] < 1000
    assert record["epochs_completed"] == record["epochs"]
    assert record["cost"]["train_seconds"] < 30


def test_record_holds_cost_and_provenance(tmp_path: Path, smoke_config: dict) -> None:
    record = train(run_config(smoke_config, epochs=2), tmp_path)
    assert record["cost"]["seconds_per_epoch"] > 0 and record["cost"]["peak_memory_mb"] > 0
    provenance = record["provenance"]
    assert provenance["versions"]["torch"].startswith("2.14.1")
    assert provenance["config_hash"] == cfg.config_hash(record["config"])
    assert len(provenance["git_sha"].split("-")[0]) in (40, 7) or provenance["git_sha"] == "unknown"
    assert {"loss", "train_accuracy", "seconds", "lr"} <= set(record["history"][0])
    assert json.loads((tmp_path / "train.json").read_text())["status"] == "ok"


def test_cosine_schedule_holds_the_rate_until_its_start_then_decays_to_zero(
    tmp_path: Path, smoke_config: dict
) -> None:
    record = train(
        run_config(smoke_config, epochs=5, lr=0.1, lr_schedule={"type": "cosine", "start_epoch": 2}), tmp_path
    )
    # the rate each epoch leaves for the next one: constant through epoch 2, then 0.5·(1 + cos(π·k/3))
    assert [h["lr"] for h in record["history"]] == pytest.approx([0.1, 0.1, 0.075, 0.025, 0.0], abs=1e-12)


def test_cosine_start_after_the_last_epoch_is_refused(smoke_config: dict) -> None:
    with pytest.raises(
        cfg.ConfigError, match=r"lr_schedule\.start_epoch: 3 leaves no epoch of the 3 to decay over"
    ):
        run_config(smoke_config, epochs=3, lr_schedule={"type": "cosine", "start_epoch": 3})
