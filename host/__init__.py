"""Host adapters: the only modules of the pack that import ComfyUI (``comfy.*``, ``folder_paths``, ...).

Everything else takes plain tensors and dataclasses, so it runs and is tested without ComfyUI
(``tests/test_import_boundary.py`` checks every import). Functions that act on ComfyUI objects (weight
patches, ControlNets, sampling) need the host; the others degrade to a sensible stand-alone behaviour when
ComfyUI is not importable.
"""
from __future__ import annotations

import importlib.util


def comfy_available() -> bool:
    """True inside a ComfyUI process (or a test that put ComfyUI on ``sys.path``)."""
    try:
        return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None
    except (ImportError, ValueError):
        return False
