"""Import this pack as the package ``likeness`` from any folder name (tests, CLI, benchmarks).

ComfyUI imports the pack under a path-derived module name; scripts and tests need a stable one.
"""
from __future__ import annotations

import importlib.util
import os
import sys

PACK_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "likeness"


def load_pack(name: str = PACKAGE, run_init: bool = True):
    """Return the pack imported as ``name`` (idempotent).

    ``run_init=False`` makes the package importable without running its ``__init__`` (which registers
    every node and imports torch): the command line uses it to stay fast.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(PACK_DIR, "__init__.py"), submodule_search_locations=[PACK_DIR])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if not run_init:
        return module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
