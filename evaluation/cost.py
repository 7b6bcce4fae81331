"""Time and peak memory of one ``eval`` cell (one workflow run), as the papers' speed columns.

Why: a method that keeps the face slightly better at three times the cost is a different answer. On a
CUDA device the peak is torch's peak allocated memory during the cell (``memory_kind = "cuda"``,
reset before each cell). On the CPU torch keeps no such counter: on Linux the kernel's own high-water mark
of the process's resident memory (``VmHWM``) is reset when the cell starts (``/proc/self/clear_refs``) and
read when it ends, so a short spike is never missed; where that cannot be done a background thread samples
the resident memory every 20 ms. Either way (``memory_kind = "rss"``) it is the peak of what the whole
process held while the cell ran, models included.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

SAMPLE_SECONDS = 0.02
MB = 1 << 20


@dataclass
class CellCost:
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    memory_kind: str = "rss"


def resident_bytes() -> int:
    """The process's resident set size (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _reset_resident_peak() -> bool:
    """Reset the kernel's resident high-water mark of this process (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def resident_peak_bytes() -> int:
    """The kernel's resident high-water mark (``VmHWM``) since the last reset; 0 where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cuda(wanted: bool):
    if not wanted:
        return None
    import torch

    return torch.cuda if torch.cuda.is_available() else None


class measure_cell:
    """``with measure_cell(cuda) as cost: ...``; ``cost`` holds the seconds and the peak after the block.

    ``cuda``: the workflow runs on a CUDA device (the command line's ``--device``), so its peak is read there.
    """

    def __init__(self, cuda: bool = False):
        self._wanted_cuda = cuda
        self.cost = CellCost()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0
        self._started = 0.0
        self._cuda = None

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._peak = max(self._peak, resident_bytes())

    def __enter__(self) -> CellCost:
        self._cuda = _cuda(self._wanted_cuda)
        if self._cuda is not None:
            self._cuda.reset_peak_memory_stats()
        elif not _reset_resident_peak():
            self._peak = resident_bytes()
            self._thread = threading.Thread(target=self._sample, name="likeness-eval-memory", daemon=True)
            self._thread.start()
        self._started = time.perf_counter()
        return self.cost

    def __exit__(self, *exc) -> None:
        self.cost.seconds = time.perf_counter() - self._started
        if self._cuda is not None:
            self.cost.peak_memory_mb = self._cuda.max_memory_allocated() / MB
            self.cost.memory_kind = "cuda"
            return
        if self._thread is None:  # the kernel kept the peak
            self._peak = max(resident_peak_bytes(), resident_bytes())
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, resident_bytes())
        self.cost.peak_memory_mb = self._peak / MB
        self.cost.memory_kind = "rss"
