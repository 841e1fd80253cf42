"""Progress that reads well in a terminal and in a log file.

On a terminal, :class:`Progress` draws a tqdm bar, and log lines are printed above it
(tqdm's logging redirection) instead of through it. In a file (a Snakemake job's log, where
a bar would be one growing line of carriage returns that shows 0 % until the end), it writes
whole log lines instead: one per step, or at most one every ``every_seconds`` for fine-grained
steps (batches), always one for the last step, each with the elapsed time and an estimate of
the time left.

    with Progress(total=epochs, desc="train", log=log, initial=done) as progress:
        for epoch in ...:
            ...
            progress.update(loss=0.31, train_accuracy=0.9)
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from types import TracebackType
from typing import Self, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def is_terminal(stream: TextIO | None) -> bool:
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


class Progress:
    """A counted loop's progress: a bar on a terminal, log lines in a file (see the module)."""

    def __init__(
        self,
        total: int,
        desc: str,
        log: logging.Logger,
        initial: int = 0,
        every_seconds: float = 0.0,
        unit: str = "step",
        log_on_terminal: bool = False,
        stream: TextIO | None = None,
        heartbeat_seconds: float = 60.0,
    ) -> None:
        self.total, self.desc, self.log, self.unit = total, desc, log, unit
        self.done = initial
        self.every_seconds = every_seconds
        self.log_on_terminal = log_on_terminal
        self.heartbeat_seconds = heartbeat_seconds
        self._last_note = time.perf_counter()
        self.stream = sys.stderr if stream is None else stream
        self.terminal = is_terminal(self.stream)
        self.started = self.last_line = time.perf_counter()
        self.initial = initial
        self._bar: tqdm | None = None
        self._redirect = contextlib.ExitStack()

    def __enter__(self) -> Self:
        if self.terminal:
            self._redirect.enter_context(logging_redirect_tqdm())
            self._bar = tqdm(
                total=self.total,
                initial=self.done,
                desc=self.desc,
                unit=self.unit,
                file=self.stream,
                dynamic_ncols=True,
                mininterval=0.5,
            )
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()

    def line(self, **stats: object) -> str:
        """``train: epoch 3/15 (20 %), loss 0.31; 6.2 s elapsed, ~25 s left``."""
        elapsed = time.perf_counter() - self.started
        steps = self.done - self.initial
        left = elapsed / steps * (self.total - self.done) if steps else float("nan")
        parts = [
            f"{self.desc}: {self.unit} {self.done}/{self.total} "
            f"({100 * self.done / max(self.total, 1):.0f} %)"
        ]
        parts += [f"{key.replace('_', ' ')} {_value(value)}" for key, value in stats.items()]
        timing = f"{duration(elapsed)} elapsed" + (
            f", ~{duration(left)} left" if self.done < self.total and steps else ""
        )
        return ", ".join(parts) + "; " + timing

    def update(self, count: int = 1, **stats: object) -> None:
        """``count`` more steps done; ``stats`` shown in the bar's postfix or the log line."""
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            if stats:
                self._bar.set_postfix({k: _value(v) for k, v in stats.items()}, refresh=False)
            if not self.log_on_terminal:
                return
        now = time.perf_counter()
        if self.done >= self.total or now - self.last_line >= self.every_seconds:
            self.last_line = now
            self.log.info("%s", self.line(**stats))

    def note(self, **stats: object) -> None:
        """Progress inside the current step (``batch="120/469"``): the bar's postfix on a terminal
        (at most twice a second), a log line at most every ``heartbeat_seconds`` in a file, so
        that a long step still shows it is moving."""
        now = time.perf_counter()
        if self._bar is not None:
            if now - self._last_note >= 0.5:
                self._last_note = now
                self._bar.set_postfix({k: _value(v) for k, v in stats.items()})
            return
        if now - max(self.last_line, self._last_note) >= self.heartbeat_seconds:
            self._last_note = now
            within = ", ".join(f"{key.replace('_', ' ')} {_value(value)}" for key, value in stats.items())
            self.log.info(
                "%s: %s %d/%d in progress, %s; %s elapsed",
                self.desc,
                self.unit,
                self.done + 1,
                self.total,
                within,
                duration(now - self.started),
            )
