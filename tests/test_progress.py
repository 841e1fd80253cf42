"""Progress: whole log lines in a file (no carriage returns), a bar on a terminal."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from certbench import config as cfg
from certbench.catalogue import check_config
from certbench.progress import Progress, duration
from certbench.storage import read_json, write_json
from certbench.train import train


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="progress-test")
    return caplog


def test_log_file_gets_one_line_per_epoch_and_no_bar(records: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    with Progress(
        total=3,
        initial=1,
        desc="train",
        unit="epoch",
        log=logging.getLogger("progress-test"),
        stream=stream,
        log_on_terminal=True,
    ) as progress:
        for _ in range(2):
            progress.note(batch="1/5")
            progress.update(loss=0.25, train_accuracy=0.5)
    lines = [r.getMessage() for r in records.records]
    assert len(lines) == 2 and stream.getvalue() == ""
    assert (
        lines[0].startswith("train: epoch 2/3 (67 %), loss 0.25, train accuracy 0.5; ") and "left" in lines[0]
    )
    assert lines[1].startswith("train: epoch 3/3 (100 %)") and "left" not in lines[1]


def test_fine_steps_are_throttled_but_the_last_is_logged(records: pytest.LogCaptureFixture) -> None:
    with Progress(
        total=100,
        desc="pgd-linf",
        unit="batch",
        log=logging.getLogger("progress-test"),
        every_seconds=3600,
        stream=io.StringIO(),
    ) as progress:
        for _ in range(100):
            progress.update()
    assert [r.getMessage().split(";")[0] for r in records.records] == ["pgd-linf: batch 100/100 (100 %)"]


def test_terminal_gets_a_bar(records: pytest.LogCaptureFixture) -> None:
    terminal = Terminal()
    with Progress(
        total=2, desc="train", unit="epoch", log=logging.getLogger("progress-test"), stream=terminal
    ) as progress:
        progress.update(loss=1.0)
        progress.update(loss=0.5)
    assert "train" in terminal.getvalue() and "2/2" in terminal.getvalue()
    assert not records.records  # the bar, not log lines, unless log_on_terminal


def test_durations() -> None:
    assert [duration(s) for s in (2.34, 42, 185, 7620)] == ["2.3 s", "42 s", "3 min 05 s", "2 h 07 min"]


def test_certify_and_attack_in_a_log_file_write_whole_progress_lines(
    tmp_path: Path, smoke_config: dict
) -> None:
    """`certbench certify` and `attack` with stderr in a file, as in a Snakemake job's log: one line per
    certificate (its name and seconds), batch lines of the LiRPA certificates and of the attacks, and
    no carriage return (no tqdm bar)."""
    smoke_config["training"]["epochs"] = 1
    checked = check_config(smoke_config)
    run_config = cfg.resolve_run(checked, cfg.runs(checked)[0])
    assert train(run_config, tmp_path)["status"] == "ok"
    write_json(tmp_path / "run.json", run_config)
    for command in ("certify", "attack"):
        log_path = tmp_path / f"{command}.log"
        with log_path.open("w") as log_file:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "certbench",
                    command,
                    "--run-config",
                    str(tmp_path / "run.json"),
                    "--run-dir",
                    str(tmp_path),
                    "--out",
                    str(tmp_path / f"{command}.json"),
                ],
                stdout=log_file,
                stderr=log_file,
                check=True,
                timeout=600,
            )
        text = log_path.read_text()
        assert "\r" not in text, text
        if command == "certify":
            names = read_json(tmp_path / "certify.json")["certificates"]
            lines = [line for line in text.splitlines() if "certify: certificate " in line]
            assert len(lines) == len(names) >= 2, text
            assert f"certify: certificate {len(names)}/{len(names)} (100 %)" in lines[-1]
            assert all(f"certificate {name}" in line for name, line in zip(names, lines)), lines
            for (_name, entry), line in zip(names.items(), lines):
                assert ("seconds " if entry["applicable"] else "applicable no") in line, line
            assert names["ibp"]["applicable"] and "ibp: batch 1/1 (100 %)" in text, text
        else:
            assert "attacks: batch 2/2 (100 %)" in text and "attack seconds: deepfool-l2 " in text, text
