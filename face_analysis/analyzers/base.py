"""The analyzer protocol (FACE_ANALYZER) and small helpers shared by the backends.

An analyzer works on one uint8 RGB image ``[H,W,3]`` at a time:

- ``detect(image, det_size=None, det_thresh=None) -> list[Face]``: boxes, scores, five keypoints,
  coordinates in pixels of the given image, no embeddings; dense landmarks only when they come for free
  (dlib's 68 points, from which its keypoints are made). ``det_size`` is the long side the detector sees;
- ``landmarks(image, faces) -> list[Face]``: dense landmarks (``landmarks`` / ``landmark_kind``, every set
  in ``landmark_sets``, ``pose`` when a 3D model gives it); faces unchanged without a landmark model;
- ``embed(image, faces) -> list[Face]``: the same faces with ``embedding`` filled in (raw, not
  normalised);
- ``describe() -> str``: one line describing the backend and its models;
- attributes ``backend`` (``"insightface"`` / ``"dlib"``), ``model_id`` (names the embedding model, e.g.
  ``"insightface:buffalo_l/w600k_r50"``), ``embedding_dim``, ``capabilities`` (a set of
  :class:`Capability` values), ``default_det_size`` (the long side the detector sees) and
  ``default_det_thresh``.
"""
from __future__ import annotations

from enum import Enum

import numpy as np

from ..types import Face


class Capability(str, Enum):
    DETECT = "detect"
    KPS5 = "kps5"
    EMBED = "embed"
    LANDMARKS_68 = "landmarks_68"
    LANDMARKS_106 = "landmarks_106"
    POSE = "pose"


def scale_to_side(image: np.ndarray, side: int, allow_upscale: float = 1.0) -> tuple[np.ndarray, float]:
    """Resize so the long side is ``side`` (downscale always, upscale at most ``allow_upscale``x).

    Returns the resized image and the factor (resized = original * factor).
    """
    height, width = image.shape[:2]
    factor = min(float(side) / max(height, width), float(allow_upscale))
    if abs(factor - 1.0) < 1e-6:
        return image, 1.0
    import cv2

    new_size = (max(1, round(width * factor)), max(1, round(height * factor)))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, new_size, interpolation=interpolation), factor


def pad_image(image: np.ndarray, fraction: float) -> tuple[np.ndarray, int, int]:
    """Pad with black by ``fraction`` of each side (tight crops where the face touches the border).

    Returns the padded image and the (x, y) offset of the original inside it.
    """
    height, width = image.shape[:2]
    pad_y, pad_x = int(round(height * fraction)), int(round(width * fraction))
    padded = np.zeros((height + 2 * pad_y, width + 2 * pad_x, image.shape[2]), dtype=image.dtype)
    padded[pad_y:pad_y + height, pad_x:pad_x + width] = image
    return padded, pad_x, pad_y


def scale_face(face: Face, factor: float, offset_x: float = 0.0, offset_y: float = 0.0) -> Face:
    """Map a face's coordinates: new = old / factor - offset (undo a resize, then a padding)."""
    from dataclasses import replace

    shift = np.array([offset_x, offset_y], dtype=np.float32)
    bbox = (face.bbox / factor).astype(np.float32) - np.concatenate([shift, shift])
    kps = (face.kps / factor).astype(np.float32) - shift
    def move(points: np.ndarray) -> np.ndarray:
        return ((np.asarray(points)[:, :2] / factor) - shift).astype(np.float32)

    sets = {kind: move(points) for kind, points in face.landmark_sets.items()}
    if face.landmarks is None:
        landmarks = None
    elif face.landmark_kind in sets:
        landmarks = sets[face.landmark_kind]
    else:
        landmarks = move(face.landmarks)
    return replace(face, bbox=bbox.astype(np.float32), kps=kps.astype(np.float32), landmarks=landmarks,
                   landmark_sets=sets)
