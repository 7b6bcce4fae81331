"""ComfyUI node classes (classic V1 API), collected from every module of this package.

Each module lists its node classes in ``NODE_CLASSES``; a class has ``NODE_ID`` and ``DISPLAY_NAME``.
Nodes are thin: they validate inputs, call one core function and return.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil

logger = logging.getLogger("likeness")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
FAILED_NODE_MODULES: dict[str, str] = {}


def _collect() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as exc:  # a bug in one node module must not take the whole pack down
            logger.exception("Likeness: node module %s failed to import", info.name)
            FAILED_NODE_MODULES[info.name] = repr(exc)
            continue
        for cls in getattr(module, "NODE_CLASSES", ()):
            if cls.NODE_ID in NODE_CLASS_MAPPINGS:
                raise RuntimeError(f"duplicate node id {cls.NODE_ID}")
            NODE_CLASS_MAPPINGS[cls.NODE_ID] = cls
            NODE_DISPLAY_NAME_MAPPINGS[cls.NODE_ID] = cls.DISPLAY_NAME


_collect()
