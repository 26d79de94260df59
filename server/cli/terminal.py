"""Terminal rendering for the command line: a progress bar on stderr and plain tables.

DashScope reports no percentage, so the bar shows how much of the wait budget has passed, next to
the task's current status; on a pipe (not a terminal) it writes one line per update instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

BAR_WIDTH = 30


class ProgressBar:
    def __init__(self, stream: TextIO, label: str, *, bounded: bool = True, width: int = BAR_WIDTH) -> None:
        self._stream = stream
        self._label = label
        self._bounded = bounded
        self._width = width
        self._interactive = stream.isatty()
        self._drawn = False
        self._ticks = 0

    def render(self, done: float, total: float, message: str) -> str:
        if not self._bounded:
            # Waiting until the task ends: a moving marker shows the wait is alive.
            at = self._ticks % self._width
            return f"{self._label} [{'-' * at}#{'-' * (self._width - at - 1)}] {message}"
        fraction = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
        filled = round(fraction * self._width)
        return f"{self._label} [{'#' * filled}{'-' * (self._width - filled)}] {message} (of up to {total:.0f}s)"

    async def update(self, done: float, total: float, message: str) -> None:
        line = self.render(done, total, message)
        self._ticks += 1
        if self._interactive:
            self._stream.write("\r\033[K" + line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn and self._interactive:
            self._stream.write("\n")
            self._stream.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned columns; None shows as '-'."""
    cells = [[("-" if value is None else str(value)) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return lines
