"""Typed values that flow between nodes: FACES (:class:`FaceAnalysis`) and one :class:`Face`.

Coordinates are pixels of the analysed image (x right, y down, origin top-left corner). The five
keypoints follow insightface's order: the eye on the image's left, the eye on the image's right, nose
tip, left mouth corner, right mouth corner (image left/right, not the subject's).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass
class Face:
    """One detected face."""

    bbox: np.ndarray                     # [4] float32: x1, y1, x2, y2
    score: float                         # detector confidence
    kps: np.ndarray                      # [5, 2] float32, in the order above
    image_index: int = 0                 # index of the image in the analysed batch
    landmarks: np.ndarray | None = None  # [N, 2] float32 dense landmarks (68 dlib / 106 insightface / ...)
    landmark_kind: str | None = None     # "68", "106", "478", ...
    embedding: np.ndarray | None = None  # [D] float32 raw identity embedding
    pose: np.ndarray | None = None       # [3] float32 yaw, pitch, roll in degrees, when estimated
    landmark_sets: dict[str, np.ndarray] = field(default_factory=dict)  # every dense set computed, by kind

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    @property
    def normed_embedding(self) -> np.ndarray | None:
        if self.embedding is None:
            return None
        norm = float(np.linalg.norm(self.embedding))
        return self.embedding / norm if norm > 0 else self.embedding

    def with_image_index(self, index: int) -> "Face":
        return replace(self, image_index=index)


@dataclass
class FaceAnalysis:
    """FACES: per analysed image, the faces kept by the selection, plus where they came from.

    ``faces[i]`` is the (possibly empty) list of faces of image ``i``; ``image_sizes[i]`` is its
    ``(height, width)``. ``model_id`` names the embedding model (e.g. ``"insightface:buffalo_l/w600k_r50"``
    or ``"dlib:resnet_v1"``), so embeddings of different models are never mixed silently.
    """

    faces: list[list[Face]]
    image_sizes: list[tuple[int, int]]
    backend: str
    model_id: str
    embedding_dim: int | None = None
    notes: list[str] = field(default_factory=list)  # warnings worth showing (e.g. "image 2: no face")
    # What nodes with one output per image do for images without a face: "skip" leaves them out,
    # "pass_through" keeps them (whole image / empty mask / score NaN). "error" never reaches a node.
    on_no_face: str = "pass_through"
    alignment: object | None = None  # face_analysis.align.AlignedFaces set by the Align node (paste-back)

    def __len__(self) -> int:
        return len(self.faces)

    def all_faces(self) -> list[Face]:
        return [f for per_image in self.faces for f in per_image]

    def first_face_per_image(self) -> list[Face | None]:
        return [per_image[0] if per_image else None for per_image in self.faces]

    def images_without_faces(self) -> list[int]:
        return [i for i, per_image in enumerate(self.faces) if not per_image]
