"""FACE_EMBEDS: identity embeddings as data (stack, combine, save/load), never mixed across models.

Embeddings are kept raw (as the model produced them). insightface ArcFace vectors have norms around
15-30 and some consumers (InstantID) use them raw while others (FaceID) normalise; dlib's are ~1.45.
Combining therefore keeps the magnitude: "normalized_mean" averages directions and rescales to the
mean input norm.

Files are safetensors with one tensor ``embeddings`` [N,D] float32 and string metadata
``format=likeness.face_embeds``, ``version``, ``backend``, ``model_id``, ``dims``, ``count``, ``sources``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import IncompatibleEmbedsError, InvalidInputError, ModelFileError
from ..safetensors_io import atomic_save
from .types import FaceAnalysis

FORMAT = "likeness.face_embeds"
VERSION = "1"
COMBINE_METHODS = ("mean", "normalized_mean", "median", "outlier_rejection")


@dataclass
class FaceEmbeds:
    """Stacked embeddings ``[N,D]`` of one model, with where each came from."""

    embeddings: torch.Tensor                  # [N, D] float32, raw
    model_id: str
    backend: str
    sources: list[str] = field(default_factory=list)   # e.g. "image 0 face 1", "mean of 4"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.embeddings, torch.Tensor):
            self.embeddings = torch.as_tensor(np.asarray(self.embeddings), dtype=torch.float32)
        if self.embeddings.dim() == 1:
            self.embeddings = self.embeddings.unsqueeze(0)
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] == 0:
            raise InvalidInputError(f"FACE_EMBEDS needs embeddings [N, D] with N >= 1; got {list(self.embeddings.shape)}")
        self.embeddings = self.embeddings.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(self.embeddings).all()):
            raise InvalidInputError("FACE_EMBEDS contains NaN or infinite values")

    @property
    def dims(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])

    def __len__(self) -> int:
        return self.count

    def normalized(self) -> torch.Tensor:
        return torch.nn.functional.normalize(self.embeddings, dim=1)

    def describe(self) -> str:
        return f"{self.count} x {self.dims}-D embeddings of {self.model_id}"

    def check_compatible(self, other_model_id: str, other_dims: int | None, what: str = "these embeddings") -> None:
        """IncompatibleEmbedsError unless ``other`` was made by the same model with the same size."""
        if other_model_id != self.model_id or (other_dims is not None and other_dims != self.dims):
            raise IncompatibleEmbedsError(
                f"cannot mix embeddings of different models: {self.describe()} vs {what} from {other_model_id}"
                f"{f' ({other_dims}-D)' if other_dims is not None else ''}. Embeddings of different models live in "
                f"different spaces; analyse every image with the same analyzer (same pack / backend).")


def embeds_from_faces(analysis: FaceAnalysis) -> FaceEmbeds:
    """Every face of FACES that has an embedding, in image order."""
    vectors, sources = [], []
    for faces in analysis.faces:
        for number, face in enumerate(faces):
            if face.embedding is not None:
                vectors.append(np.asarray(face.embedding, dtype=np.float32).reshape(-1))
                sources.append(f"image {face.image_index} face {number}")
    if not vectors:
        missing = analysis.images_without_faces()
        why = (f"no face was found (images without a face: {missing})" if len(missing) == len(analysis.faces)
               else "the analyzer computed no embeddings (was it loaded without a recognition model?)")
        raise InvalidInputError(f"FACES holds no identity embedding: {why}.")
    dims = {v.shape[0] for v in vectors}
    if len(dims) != 1:
        raise IncompatibleEmbedsError(f"FACES mixes embedding sizes {sorted(dims)}")
    return FaceEmbeds(torch.from_numpy(np.stack(vectors)), analysis.model_id, analysis.backend, sources)


def concat(embeds: list[FaceEmbeds]) -> FaceEmbeds:
    """Stack several FACE_EMBEDS of the same model; IncompatibleEmbedsError otherwise."""
    embeds = [e for e in embeds if e is not None]
    if not embeds:
        raise InvalidInputError("no FACE_EMBEDS given")
    first = embeds[0]
    for other in embeds[1:]:
        first.check_compatible(other.model_id, other.dims, "other embeddings")
    return FaceEmbeds(torch.cat([e.embeddings for e in embeds]), first.model_id, first.backend,
                      [s for e in embeds for s in e.sources], [n for e in embeds for n in e.notes])


def combine(embeds: FaceEmbeds, method: str = "normalized_mean", outlier_threshold: float = 2.5) -> FaceEmbeds:
    """One embedding from many.

    - ``mean``: plain mean of the raw vectors.
    - ``normalized_mean``: mean of the unit vectors, renormalised, times the mean raw norm (directions
      weigh equally whatever their magnitude).
    - ``median``: element-wise median of the raw vectors (robust to one bad photo among >= 3).
    - ``outlier_rejection``: drops vectors whose cosine to the normalised mean is below the median
      cosine by more than ``outlier_threshold`` robust deviations (MAD, floor 0.02), then
      ``normalized_mean`` of the rest. Needs >= 3 vectors; the dropped sources are noted.
    """
    if method not in COMBINE_METHODS:
        raise InvalidInputError(f"combine method must be one of {COMBINE_METHODS}, got {method!r}")
    vectors = embeds.embeddings
    notes = list(embeds.notes)
    keep = torch.ones(vectors.shape[0], dtype=torch.bool)
    if method == "mean":
        result = vectors.mean(0)
    elif method == "median":
        result = vectors.median(0).values if vectors.shape[0] > 2 else vectors.mean(0)
    else:
        if method == "outlier_rejection" and vectors.shape[0] >= 3:
            keep = inliers(vectors, outlier_threshold)
            dropped = [embeds.sources[i] if i < len(embeds.sources) else f"#{i}" for i in range(len(keep)) if not keep[i]]
            if dropped:
                notes.append(f"outlier rejection dropped {len(dropped)} of {len(keep)}: {', '.join(dropped)}")
        result = normalized_mean(vectors[keep])
    source = f"{method} of {int(keep.sum())}"
    return FaceEmbeds(result.unsqueeze(0), embeds.model_id, embeds.backend, [source], notes)


def normalized_mean(vectors: torch.Tensor) -> torch.Tensor:
    direction = torch.nn.functional.normalize(vectors, dim=1).mean(0)
    direction = direction / direction.norm().clamp_min(1e-12)
    return direction * vectors.norm(dim=1).mean()


def inliers(vectors: torch.Tensor, threshold: float) -> torch.Tensor:
    cosines = torch.nn.functional.normalize(vectors, dim=1) @ torch.nn.functional.normalize(normalized_mean(vectors), dim=0)
    median = cosines.median()
    deviation = max(float((cosines - median).abs().median()) * 1.4826, 0.02)
    return cosines >= median - threshold * deviation


# ----------------------------------------------------------------------------------------- files

NUMBERED_LIMIT = 999
# The file names embeds_path makes, longest first, with "{}" where the stem goes (for the node's name check).
EMBEDS_FILE_NAMES = ("{}_" + str(NUMBERED_LIMIT) + ".safetensors", "{}.safetensors")


def embeds_path(folder: str, stem: str, overwrite: bool) -> str:
    """Where to save embeds named ``stem``: ``folder/<stem>.safetensors``; without ``overwrite`` and when that file
    exists, the first free ``<stem>_001.safetensors`` ... ``<stem>_999.safetensors``."""
    path = os.path.join(folder, f"{stem}.safetensors")
    number = 0
    while not overwrite and os.path.exists(path):
        number += 1
        if number > NUMBERED_LIMIT:
            raise InvalidInputError(f"'{stem}' and all {NUMBERED_LIMIT} numbered copies already exist in {folder}; "
                                    "choose another name or turn overwrite on.")
        path = os.path.join(folder, f"{stem}_{number:03d}.safetensors")
    return path


def save_embeds(embeds: FaceEmbeds, path: str) -> str:
    """Write a safetensors file (atomically); returns the path."""
    metadata = {"format": FORMAT, "version": VERSION, "backend": embeds.backend, "model_id": embeds.model_id,
                "dims": str(embeds.dims), "count": str(embeds.count), "sources": json.dumps(embeds.sources)}
    return atomic_save({"embeddings": embeds.embeddings}, path, metadata)


def load_embeds(path: str) -> FaceEmbeds:
    """Read a file written by :func:`save_embeds`; ModelFileError for anything else."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            tensor = handle.get_tensor("embeddings") if "embeddings" in keys else None
    except Exception as exc:
        raise ModelFileError(f"{path} is not a readable safetensors file ({exc}).") from exc
    if metadata.get("format") != FORMAT or tensor is None:
        raise ModelFileError(f"{path} is not a Likeness face-embeds file (metadata format "
                             f"{metadata.get('format')!r}, tensors {keys}). Save embeds with the Save Face Embeds node.")
    if metadata.get("version") != VERSION:
        raise ModelFileError(f"{path} has face-embeds version {metadata.get('version')!r}; this pack reads {VERSION}.")
    if str(tensor.shape[-1]) != metadata.get("dims"):
        raise ModelFileError(f"{path}: metadata says {metadata.get('dims')}-D but the tensor is {list(tensor.shape)}.")
    try:
        sources = json.loads(metadata.get("sources", "[]"))
    except ValueError:
        sources = []
    return FaceEmbeds(tensor.float(), metadata["model_id"], metadata.get("backend", ""), sources)
