"""Progress of a long loop: a live bar on a terminal; in logs (CI, `dvc repro` piped) a plain line every
few percent or 30 s, so that no stage is silent for minutes and a log still reads line by line.

    with Progress("omniglot maml 5w1s", total=300, start=resumed) as bar:
        for i in ...: bar.update(i + 1, status="meta_val/query_acc=0.81")
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """`update(done, status)` after each step; `close()` (or the `with` block's end) prints the last line.

    Plain lines come at every `every_pct` mark and, between marks, every `every_s` seconds; each names
    done/total, the percentage, the rate of this process, the ETA and `status`.
    """

    def __init__(self, label: str, total: int, *, start: int = 0, enabled: bool = True, stream: TextIO | None = None,
                 every_pct: float = 5.0, every_s: float = 30.0):
        self.label, self.total, self.start, self.enabled = label, total, start, enabled
        self.stream = stream or sys.stderr
        self.every_pct, self.every_s = every_pct, every_s
        self.done, self.status, self._bar = start, "", None
        self._began = self._printed_at = time.monotonic()
        self._printed_pct, self._mark = -1.0, -1   # the last line's percentage and `every_pct` mark
        if enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=Console(file=self.stream))
            self._task = self._bar.add_task(label, total=total, completed=start, status="")
            self._bar.start()
        elif enabled:
            self._line(start=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rate(self) -> float:
        """Steps per second in this process (resumed steps excluded)."""
        elapsed = time.monotonic() - self._began
        return (self.done - self.start) / elapsed if elapsed > 0 else 0.0

    def _line(self, start: bool = False) -> None:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.label}: {self.done}/{self.total} ({pct:.0f}%)"
        if start:
            text += f", resuming at {self.start}" if self.start else ", starting"
        else:
            rate = self.rate()
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            text += f" {rate:.3g} it/s, elapsed {_clock(time.monotonic() - self._began)}"
            text += f", ETA {_clock(eta)}" if eta == eta else ""
        if self.status:
            text += f", {self.status}"
        print(text, file=self.stream, flush=True)
        self._printed_at, self._printed_pct, self._mark = time.monotonic(), pct, int(pct // self.every_pct)

    def update(self, done: int, status: str | None = None) -> None:
        self.done = done
        if status is not None:
            self.status = status
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=done, status=self.status)
            return
        pct = 100.0 * done / self.total if self.total else 100.0
        if int(pct // self.every_pct) > self._mark or time.monotonic() - self._printed_at >= self.every_s:
            self._line()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self._printed_pct < 100.0 * self.done / max(self.total, 1):
            self._line()
        self.enabled = False
