"""Face analyzer backends (FACE_ANALYZER): insightface ONNX packs and dlib.

Every backend implements the analyzer protocol described in :mod:`.base`. Backends import their optional packages lazily,
so importing this package never needs insightface, onnxruntime or dlib.
"""
from .base import Capability, pad_image, scale_to_side  # noqa: F401
