"""Optional third-party packages: which are importable, and a clear error when one is missing.

Importing the pack never imports these packages. A node that needs one calls :func:`require` when it
runs, so a missing package disables only that node, with a message that says what to install.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from types import ModuleType

logger = logging.getLogger("likeness")

# import name -> (what it is for, the command that installs it)
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "insightface": ("insightface face analysis backend (antelopev2, buffalo_l)",
                    "pip install --no-deps insightface"),
    "onnxruntime": ("ONNX Runtime for insightface models",
                    "pip install onnxruntime   (or onnxruntime-gpu on NVIDIA machines, never both)"),
    "dlib": ("dlib face analysis backend", "pip install dlib-bin face-recognition-models 'setuptools<81'"),
    "face_recognition_models": ("dlib model files (detector, 5/68 landmarks, ResNet embedding)",
                                "pip install face-recognition-models 'setuptools<81'"),
    "kornia": ("batched face alignment warps", "pip install kornia"),
    "cv2": ("OpenCV image operations", "pip install opencv-python-headless"),
    "skimage": ("scikit-image transforms", "pip install scikit-image"),
    "yaml": ("PyYAML (reads extra_model_paths.yaml; a ComfyUI requirement)", "pip install pyyaml"),
    "diffusers": ("M3Face's Muse (aMUSEd) condition generator", "pip install 'diffusers>=0.32,<0.43'"),
}


class MissingDependencyError(ImportError):
    """An optional package a node needs is not installed. The message says how to install it."""


def is_available(name: str) -> bool:
    """True when ``name`` can be imported. Does not import it (some are slow to import)."""
    if name in sys.modules:
        return sys.modules[name] is not None  # None marks a blocked import (also how tests simulate absence)
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(name: str, feature: str | None = None) -> ModuleType:
    """Import and return optional package ``name`` or raise :class:`MissingDependencyError`."""
    purpose, install = OPTIONAL_PACKAGES.get(name, (name, f"pip install {name}"))
    try:
        if not is_available(name):
            raise ImportError(name)
        return importlib.import_module(name)
    except ImportError as exc:
        what = feature or purpose
        raise MissingDependencyError(
            f"{what} needs the Python package '{name}', which is not installed or failed to import "
            f"({exc}). Install it into ComfyUI's Python with: {install}") from exc


def unavailable_packages() -> list[str]:
    return [name for name in OPTIONAL_PACKAGES if not is_available(name)]


def log_unavailable_once() -> list[str]:
    """One log line at pack load naming every optional package that is missing."""
    missing = unavailable_packages()
    if missing:
        logger.warning("Likeness: optional packages not installed: %s. Nodes that need them stay listed "
                       "and explain what to install when run.", ", ".join(missing))
    return missing
