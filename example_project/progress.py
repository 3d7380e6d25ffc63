"""A tiny progress bar for the data generator: bar, counts, rate and ETA on one line."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s"


class ProgressBar:
    """Draw ``label [####....] 42% done/total unit  N rows  R rows/s  ETA Xs`` on ``stream``.

    On a terminal the line is redrawn in place a few times a second; elsewhere
    (logs, CI, tests) a line is printed every tenth of the way, so output stays short.
    """

    def __init__(self, label: str, total: int, unit: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done = 0
        self.rows = 0
        self.started = time.perf_counter()
        self._drawn_at = 0.0
        self._tenth = -1

    def update(self, done: int, rows: int) -> None:
        """Record that ``done`` units and ``rows`` rows are finished, redrawing when due."""
        self.done, self.rows = done, rows
        now = time.perf_counter()
        if self.tty:
            if now - self._drawn_at >= 0.1:
                self._drawn_at = now
                self.stream.write("\r" + self.line())
                self.stream.flush()
        else:
            tenth = done * 10 // self.total
            if tenth > self._tenth and done < self.total:
                self._tenth = tenth
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def finish(self) -> float:
        """Draw the final line and return the elapsed seconds."""
        elapsed = time.perf_counter() - self.started
        self.done = self.total
        self.stream.write(("\r" if self.tty else "") + self.line(final=True) + "\n")
        self.stream.flush()
        return elapsed

    def line(self, final: bool = False) -> str:
        """The current progress line, without a line ending."""
        elapsed = time.perf_counter() - self.started
        frac = min(self.done / self.total, 1.0)
        width = 30
        filled = int(frac * width)
        bar = "#" * filled + "." * (width - filled)
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        tail = (
            f"in {_duration(elapsed)}"
            if final
            else f"ETA {_duration(elapsed / frac - elapsed) if frac > 0 else '?'}"
        )
        return (
            f"{self.label} [{bar}] {frac:4.0%} {self.done:,}/{self.total:,} {self.unit}"
            f"  {self.rows:,} rows  {rate:,.0f} rows/s  {tail}"
        )
