"""Warnings that change a node's result reach the UI, not only the server log.

A node function decorated with :func:`shows_warnings` returns, when the pack logged warnings while it ran
(a face passed through unchanged, an identity left out, a reference image without a face ...), ComfyUI's
``{"ui": {"text": [...]}, "result": (...)}`` with one text entry per warning: the history and the
``executed`` event carry them, and they are also drawn on the node in the web frontend
(:func:`..host.messages.show_on_running_node`). Without warnings the node's return value is unchanged.

The warnings are the pack's own log records (logger ``"likeness"``, level WARNING and above) emitted by the
thread running the node, so the technique code keeps logging as it does and nothing has to pass notes up.
"""
from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Callable

logger = logging.getLogger("likeness")


class _ThreadWarnings(logging.Handler):
    """Collects the messages of WARNING+ records logged by one thread."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


def with_ui_text(output: Any, messages: list[str]) -> Any:
    """``output`` (a node's tuple or ``{"ui": ..., "result": ...}`` dict) with ``messages`` added to ui text."""
    if not messages:
        return output
    if isinstance(output, dict):
        ui = dict(output.get("ui") or {})
        ui["text"] = list(ui.get("text") or []) + messages
        return {**output, "ui": ui}
    return {"ui": {"text": list(messages)}, "result": output}


def shows_warnings(function: Callable) -> Callable:
    """Decorate a node's FUNCTION so the warnings logged while it runs are returned as its UI text."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        collector = _ThreadWarnings()
        logger.addHandler(collector)
        try:
            output = function(*args, **kwargs)
        finally:
            logger.removeHandler(collector)
        if collector.messages:
            from ..host.messages import show_on_running_node

            show_on_running_node("\n".join(collector.messages))
        return with_ui_text(output, collector.messages)

    return run
