"""Face analyzer backends (FACE_ANALYZER): insightface ONNX packs and dlib.

Every backend implements :class:`.base.FaceAnalyzer`. Backends import their optional packages lazily,
so importing this package never needs insightface, onnxruntime or dlib.
"""
from .base import Capability, FaceAnalyzer, pad_image, scale_to_side  # noqa: F401
