"""Progress: whole log lines in a file (no carriage returns), a bar on a terminal."""

from __future__ import annotations

import io
import logging

import pytest

from certbench.progress import Progress, duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="progress-test")
    return caplog


def test_log_file_gets_one_line_per_epoch_and_no_bar(records: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    with Progress(total=3, initial=1, desc="train", unit="epoch", log=logging.getLogger("progress-test"),
                  stream=stream, log_on_terminal=True) as progress:
        for _ in range(2):
            progress.note(batch="1/5")
            progress.update(loss=0.25, train_accuracy=0.5)
    lines = [r.getMessage() for r in records.records]
    assert len(lines) == 2 and stream.getvalue() == ""
    assert lines[0].startswith("train: epoch 2/3 (67 %), loss 0.25, train accuracy 0.5; ") and "left" in lines[0]
    assert lines[1].startswith("train: epoch 3/3 (100 %)") and "left" not in lines[1]


def test_fine_steps_are_throttled_but_the_last_is_logged(records: pytest.LogCaptureFixture) -> None:
    with Progress(total=100, desc="pgd-linf", unit="batch", log=logging.getLogger("progress-test"),
                  every_seconds=3600, stream=io.StringIO()) as progress:
        for _ in range(100):
            progress.update()
    assert [r.getMessage().split(";")[0] for r in records.records] == ["pgd-linf: batch 100/100 (100 %)"]


def test_terminal_gets_a_bar(records: pytest.LogCaptureFixture) -> None:
    terminal = Terminal()
    with Progress(total=2, desc="train", unit="epoch", log=logging.getLogger("progress-test"),
                  stream=terminal) as progress:
        progress.update(loss=1.0)
        progress.update(loss=0.5)
    assert "train" in terminal.getvalue() and "2/2" in terminal.getvalue()
    assert not records.records  # the bar, not log lines, unless log_on_terminal


def test_durations() -> None:
    assert [duration(s) for s in (2.34, 42, 185, 7620)] == ["2.3 s", "42 s", "3 min 05 s", "2 h 07 min"]
