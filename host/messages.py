"""Text shown on the node that is running, in ComfyUI's web frontend.

A node's ``{"ui": {"text": [...]}}`` reaches the history and the ``executed`` event, but the frontend only draws
it for nodes with their own web extension. ``PromptServer.send_progress_text`` (the binary TEXT event) is drawn
on any node, so warnings that change a result are sent this way too. Outside ComfyUI, or when no prompt is
running (a node called directly), nothing is sent.
"""
from __future__ import annotations

import logging

from . import comfy_available

logger = logging.getLogger("likeness")


def show_on_running_node(text: str) -> bool:
    """Show ``text`` on the node now executing; returns whether it was sent."""
    if not text or not comfy_available():
        return False
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:   # the web server's packages (aiohttp ...) are optional for the executor
        return False
    context = get_executing_context()
    server = getattr(PromptServer, "instance", None)
    send = getattr(server, "send_progress_text", None)
    if context is None or send is None:
        return False
    try:
        send(text, context.node_id)
    except Exception:  # noqa: BLE001 - a display failure must never fail the node
        logger.debug("Likeness: could not show a message on node %s", context.node_id, exc_info=True)
        return False
    return True
