"""Test bootstrap: the pack is importable as ``likeness``; ``host`` tests need a ComfyUI checkout.

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


def _find_comfyui() -> tuple[str, str]:
    """The ComfyUI folder host tests run against, and how it was found (for the skip reason).

    ``COMFYUI_PATH`` when set; otherwise the ComfyUI this pack is installed in (``<ComfyUI>/custom_nodes/<pack>``),
    so ``python -m pytest`` run from an installed pack with ComfyUI's Python runs the host tests too.
    """
    explicit = os.environ.get("COMFYUI_PATH", "")
    if explicit:
        return os.path.abspath(explicit), f"COMFYUI_PATH={explicit}"
    custom_nodes = os.path.dirname(ROOT)
    if os.path.basename(custom_nodes) == "custom_nodes":
        return os.path.dirname(custom_nodes), f"the ComfyUI this pack is installed in ({os.path.dirname(custom_nodes)})"
    return "", f"COMFYUI_PATH (not set; the pack at {ROOT} is not inside a ComfyUI custom_nodes folder)"


COMFYUI_PATH, COMFYUI_TRIED = _find_comfyui()


def host_ready() -> bool:
    return bool(COMFYUI_PATH) and os.path.isfile(os.path.join(COMFYUI_PATH, "comfy", "model_patcher.py"))


if host_ready():
    os.environ["COMFYUI_PATH"] = COMFYUI_PATH  # subprocess tests (runner, server, torchrun) use the same ComfyUI
HOST_SKIP_REASON = (f"host test: no ComfyUI checkout found at {COMFYUI_TRIED} (looked for comfy/model_patcher.py). "
                    "Run from the pack installed in ComfyUI/custom_nodes with ComfyUI's Python, or set COMFYUI_PATH "
                    "to a ComfyUI checkout (v0.3.64+) whose requirements the running Python has")


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
