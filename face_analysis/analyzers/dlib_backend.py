"""dlib backend: HOG or MMOD detector, 5/68-point predictors, 128-D ResNet identity embedding.

Model files come from the ``face-recognition-models`` package, located without importing it (its
``__init__`` needs ``pkg_resources``, gone from setuptools >= 81). Everything is offline and the
models are licensed for commercial use (dlib: Boost, models: CC0 / public training data), so this is
the path for users without insightface and an independent judge of identity similarity.

Five keypoints (our order: image-left eye centre, image-right eye centre, nose tip, left and right
mouth corners):

- ``landmarks="68"`` (default): eye centres are the means of points 36-41 and 42-47, the nose tip is
  point 30, the mouth corners are points 48 and 54. The 68 points are kept as dense landmarks.
- ``landmarks="5"`` (faster, ~10 MB model instead of ~100 MB): dlib's 5-point model gives both corners
  of each eye and the base of the nose (subnasale), no mouth. Eye centres are the corner means; the
  rest is placed along the face's vertical axis (eye midpoint -> nose base, length ``d``) with mean
  proportions measured against the 68-point model on the packaged photos (astronaut + the 6 faces of
  insightface's t1.jpg): nose tip at 0.76·d, mouth line at 1.23·d, mouth corners ±0.49 of the eye
  distance to the sides. Good enough for alignment crops (within ~0.2 eye distances on those
  photos); use "68" when the keypoints themselves matter (pose maps).

Embeddings always use the 5-point shape (what dlib's ResNet was trained on), so ``model_id`` is the
same for both landmark settings and embeddings stay comparable.
"""
from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import replace

import numpy as np

from ...deps import require
from ...errors import ModelFileError
from ..types import Face
from .base import Capability, scale_face, scale_to_side

MODEL_FILES = {
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "sp5": "shape_predictor_5_face_landmarks.dat",
    "sp68": "shape_predictor_68_face_landmarks.dat",
    "mmod": "mmod_human_face_detector.dat",
}
DETECTORS = ("HOG", "MMOD")
LANDMARKS = ("68", "5")
MODEL_ID = "dlib:resnet_v1"
# 5-point mode: mean positions relative to the eye midpoint -> nose base axis (see the module doc)
NOSE_TIP_DOWN, MOUTH_DOWN, MOUTH_HALF_WIDTH = 0.76, 1.23, 0.49
EMBEDDING_DIM = 128

_CACHE: dict[str, object] = {}
_LOCK = threading.Lock()


def model_dir() -> str:
    """Folder of the ``face_recognition_models`` model files (package located, not imported)."""
    require("dlib", "The dlib face analyzer")
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError("The dlib face analyzer needs the 'face-recognition-models' package for its model "
                             "files: pip install face-recognition-models")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models")
    missing = [f for f in MODEL_FILES.values() if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ModelFileError(f"face-recognition-models is installed but {', '.join(missing)} are missing from {path}; "
                             f"reinstall it: pip install --force-reinstall face-recognition-models")
    return path


def _model(kind: str):
    """A dlib model object, loaded once per process."""
    with _LOCK:
        if kind not in _CACHE:
            dlib = require("dlib", "The dlib face analyzer")
            if kind == "hog":
                _CACHE[kind] = dlib.get_frontal_face_detector()
            else:
                path = os.path.join(model_dir(), MODEL_FILES[kind])
                loader = {"recognition": dlib.face_recognition_model_v1, "sp5": dlib.shape_predictor,
                          "sp68": dlib.shape_predictor, "mmod": dlib.cnn_face_detection_model_v1}[kind]
                try:
                    _CACHE[kind] = loader(path)
                except RuntimeError as exc:
                    raise ModelFileError(f"dlib could not read {path} ({exc}); reinstall face-recognition-models.") from exc
        return _CACHE[kind]


def load_dlib(detector: str = "HOG", landmarks: str = "68", jitters: int = 0, det_size: int = 1600,
              upsample: int = 0) -> "DlibAnalyzer":
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
    if landmarks not in LANDMARKS:
        raise ValueError(f"landmarks must be one of {LANDMARKS}, got {landmarks!r}")
    model_dir()   # clear error early when files are missing
    return DlibAnalyzer(detector, landmarks, int(jitters), int(det_size), int(upsample))


class DlibAnalyzer:
    """FACE_ANALYZER over dlib (see :mod:`.base` for the protocol)."""

    backend = "dlib"
    model_id = MODEL_ID
    embedding_dim = EMBEDDING_DIM
    default_det_thresh = 0.0      # HOG: SVM margin; MMOD: CNN confidence. 0 is dlib's own default.

    def __init__(self, detector: str, landmarks: str, jitters: int, det_size: int, upsample: int):
        self.detector = detector
        self.landmark_mode = landmarks
        self.jitters = max(0, jitters)
        self.default_det_size = det_size
        self.upsample = max(0, upsample)
        caps = {Capability.DETECT, Capability.KPS5, Capability.EMBED}
        if landmarks == "68":
            caps.add(Capability.LANDMARKS_68)
        self.capabilities = frozenset(caps)

    def describe(self) -> str:
        return (f"dlib {self.detector} detector, {self.landmark_mode}-point landmarks, 128-D ResNet embedding "
                f"(jitters {self.jitters})")

    def detect(self, image: np.ndarray, det_size: int | None = None, det_thresh: float | None = None) -> list[Face]:
        dlib = require("dlib", "The dlib face analyzer")
        thresh = self.default_det_thresh if det_thresh is None else float(det_thresh)
        # Downscale big images (HOG time grows with pixels; 4096 px takes seconds). No upscaling: it makes
        # HOG find faces in textures (the astronaut's suit); small faces are what `upsample` is for.
        small, factor = scale_to_side(image, int(det_size or self.default_det_size))
        small = np.ascontiguousarray(small)
        boxes: list[tuple[dlib.rectangle, float]] = []
        if self.detector == "HOG":
            rects, scores, _ = _model("hog").run(small, self.upsample, thresh)
            boxes = list(zip(rects, scores, strict=True))
        else:
            boxes = [(d.rect, d.confidence) for d in _model("mmod")(small, self.upsample) if d.confidence >= thresh]
        faces = []
        predictor = _model("sp68" if self.landmark_mode == "68" else "sp5")
        for rect, score in boxes:
            points = _points(predictor(small, rect))
            bbox = np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], dtype=np.float32)
            if self.landmark_mode == "68":
                face = Face(bbox=bbox, score=float(score), kps=kps5_from_68(points), landmarks=points,
                            landmark_kind="68", landmark_sets={"68": points})
            else:
                face = Face(bbox=bbox, score=float(score), kps=kps5_from_dlib5(points))
            faces.append(scale_face(face, factor) if factor != 1.0 else face)
        return faces

    def landmarks(self, image: np.ndarray, faces: list[Face]) -> list[Face]:
        if self.landmark_mode != "68":
            return faces
        predictor = _model("sp68")
        out = []
        for face in faces:
            if face.landmark_kind == "68":
                out.append(face)
                continue
            points = _points(predictor(np.ascontiguousarray(image), _rect(face.bbox)))
            out.append(replace(face, landmarks=points, landmark_kind="68", landmark_sets={**face.landmark_sets, "68": points}))
        return out

    def embed(self, image: np.ndarray, faces: list[Face]) -> list[Face]:
        if not faces:
            return []
        dlib = require("dlib", "The dlib face analyzer")
        image = np.ascontiguousarray(image)
        sp5 = _model("sp5")
        shapes = dlib.full_object_detections()
        for face in faces:
            shapes.append(sp5(image, _rect(face.bbox)))
        vectors = _model("recognition").compute_face_descriptor(image, shapes, self.jitters)
        return [replace(f, embedding=np.asarray(v, dtype=np.float32)) for f, v in zip(faces, vectors, strict=True)]


def _rect(bbox: np.ndarray):
    dlib = require("dlib", "The dlib face analyzer")
    x1, y1, x2, y2 = (int(round(float(v))) for v in bbox)
    return dlib.rectangle(x1, y1, max(x1 + 1, x2 - 1), max(y1 + 1, y2 - 1))


def _points(shape) -> np.ndarray:
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)


def kps5_from_68(points: np.ndarray) -> np.ndarray:
    """Our 5 keypoints from dlib's 68: eye centres (36-41, 42-47), nose tip (30), mouth corners (48, 54)."""
    return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]]).astype(np.float32)


def kps5_from_dlib5(points: np.ndarray) -> np.ndarray:
    """Our 5 keypoints from dlib's 5 (0-1 image-right eye corners, 2-3 image-left eye corners, 4 nose base).

    Nose tip and mouth corners are estimated (see the module doc).
    """
    left_eye = points[2:4].mean(0)
    right_eye = points[0:2].mean(0)
    mid_eye = (left_eye + right_eye) / 2
    across = right_eye - left_eye                       # image left -> right along the eye line
    down = points[4] - mid_eye                          # eye line -> nose base: the face's vertical axis
    nose_tip = mid_eye + down * NOSE_TIP_DOWN
    mouth_centre = mid_eye + down * MOUTH_DOWN
    half_mouth = across * MOUTH_HALF_WIDTH
    return np.stack([left_eye, right_eye, nose_tip, mouth_centre - half_mouth, mouth_centre + half_mouth]).astype(np.float32)
