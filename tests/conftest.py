"""Test bootstrap: the pack is importable as ``likeness``; ``host`` tests need COMFYUI_PATH.

Host fixtures (tiny ComfyUI models, the in-process executor, a headless server) live in
``tests/host_support.py`` and are only imported when a host test runs.
"""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (ROOT, TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
HOST_SKIP_REASON = ("host test: set COMFYUI_PATH to a ComfyUI checkout (v0.3.64+) and run with a Python that has "
                    "its requirements, e.g. COMFYUI_PATH=../ComfyUI ../.venv-host/bin/python -m pytest -m host")


def host_ready() -> bool:
    return bool(COMFYUI_PATH) and os.path.isfile(os.path.join(COMFYUI_PATH, "comfy", "model_patcher.py"))


def pytest_collection_modifyitems(config, items):
    if host_ready():
        return
    skip = pytest.mark.skip(reason=HOST_SKIP_REASON)
    for item in items:
        if "host" in item.keywords:
            item.add_marker(skip)


if host_ready():
    # Put ComfyUI on the path and fix its CPU/attention arguments before anything imports comfy.
    import host_support  # noqa: E402

    host_support.prepare_comfy(COMFYUI_PATH)
    from host_support import *  # noqa: E402,F401,F403  (fixtures)

from _bootstrap import load_pack  # noqa: E402

load_pack()
