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
