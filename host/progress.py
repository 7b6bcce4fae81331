"""Progress and cancel for long node work (training, batches), through ComfyUI when it is there."""
from __future__ import annotations

import logging

from . import comfy_available

logger = logging.getLogger("likeness")


class Progress:
    """A progress bar that reports to the UI and raises when the user pressed cancel.

    Outside ComfyUI it only logs every ``log_every`` steps.
    """

    def __init__(self, total: int, label: str = "", log_every: int = 0):
        self.total = int(total)
        self.label = label
        self.log_every = log_every
        self.value = 0
        self._bar = None
        if comfy_available():
            import comfy.utils
            self._bar = comfy.utils.ProgressBar(self.total)

    def update_absolute(self, value: int, preview=None) -> None:
        self.value = int(value)
        if self._bar is not None:
            # The host's hook raises InterruptProcessingException here when cancel was pressed.
            self._bar.update_absolute(self.value, self.total, preview)
        if self.log_every and self.value % self.log_every == 0:
            logger.info("%s %d/%d", self.label, self.value, self.total)

    def update(self, steps: int = 1) -> None:
        self.update_absolute(self.value + steps)


def check_interrupted() -> None:
    """Raise the host's interrupt exception if the user pressed cancel (no-op outside ComfyUI)."""
    if comfy_available():
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()


def is_interrupt(exc: BaseException) -> bool:
    """True for the host's cancel exception."""
    if not comfy_available():
        return False
    import comfy.model_management
    return isinstance(exc, comfy.model_management.InterruptProcessingException)
