"""Terminal output of the command line (the only place the pack writes to stdout/stderr directly)."""
from __future__ import annotations

import sys
from typing import TextIO


def say(*parts: object, sep: str = " ", end: str = "\n", file: TextIO | None = None, flush: bool = False) -> None:
    """Write a line for the user, like ``print`` (the stream is looked up at call time, so capture works)."""
    stream = file if file is not None else sys.stdout
    stream.write(sep.join(str(p) for p in parts) + end)
    if flush:
        stream.flush()


class ProgressBar:
    """``[#####.....] 5/10  cell-name`` rewritten in place on a terminal, one line per step in a log file."""

    WIDTH = 24

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self, text: str) -> str:
        filled = self.WIDTH * self.done // max(self.total, 1)
        return f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total}  {text}"

    def show(self, text: str) -> None:
        """Show ``text`` as what is happening now, without advancing."""
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line(text))
            self.stream.flush()

    def advance(self, text: str) -> None:
        """One step done; ``text`` says which and how it ended."""
        self.done += 1
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line(text) + ("\n" if self.done >= self.total else ""))
        else:
            self.stream.write(self.line(text) + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own above the bar (a failure, a warning)."""
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()
