"""Test bootstrap: the pack is importable as ``likeness``; ``host`` tests need COMFYUI_PATH.

Fixtures live in plugin modules (``pytest_plugins`` below): ``tests/host_support.py`` (tiny ComfyUI
models, the in-process executor; they need COMFYUI_PATH) and ``tests/face_fixtures.py`` (model folders,
tiny insightface packs). ComfyUI is configured (:func:`host_support.prepare_comfy`) before the pack loads.
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


# Fixture modules, registered as plugins below: their fixtures reach every test without being imported.
FIXTURE_MODULES = ["host_support", "face_fixtures"]
pytest.register_assert_rewrite(*FIXTURE_MODULES)  # host_support is imported before it is registered

if host_ready():
    # Put ComfyUI on the path and fix its CPU/attention arguments before anything imports comfy.
    import host_support

    host_support.prepare_comfy(COMFYUI_PATH)

from _bootstrap import load_pack  # noqa: E402  (after the path set-up above)

load_pack()

pytest_plugins = FIXTURE_MODULES
