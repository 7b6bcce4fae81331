"""The checked inputs of one metric run and the per-run caches (face analyses, CLIP / DINO embeddings).

Every metric reads the same :class:`MetricContext`, so each batch is analysed once per face analyzer and
embedded once per encoder however many metrics use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidInputError
from ..face_analysis.images import to_rgb_float
from ..face_analysis.types import Face, FaceAnalysis


def _paired(batch: torch.Tensor | None, count: int, name: str) -> torch.Tensor | None:
    """An IMAGE input that pairs with the generations: one image for all, or one per image."""
    if batch is None:
        return None
    batch = to_rgb_float(batch, name)[0]
    if batch.shape[0] not in (1, count):
        raise InvalidInputError(f"'{name}' has {batch.shape[0]} images for {count} generated image(s); give one "
                                f"(used for every image) or one per image.")
    return batch


@dataclass
class MetricInputs:
    """Generated images and what they are compared with, checked (see :func:`~.metrics.compute_metrics`)."""

    images: torch.Tensor
    references: torch.Tensor
    second_photos: torch.Tensor | None = None
    prompts: list[str] | None = None
    masks: torch.Tensor | None = None
    sources: torch.Tensor | None = None
    mix_sources: torch.Tensor | None = None

    @classmethod
    def build(cls, images, references, second_photos=None, prompts=None, masks=None, sources=None,
              mix_sources=None) -> MetricInputs:
        from .encoders import check_prompts

        images = to_rgb_float(images, "images")[0]
        count = images.shape[0]
        if references is None:
            raise InvalidInputError("the metrics need 'references' (the reference photo, or one per image).")
        mix = None if mix_sources is None else to_rgb_float(mix_sources, "mix_sources")[0]
        return cls(images, _paired(references, count, "references"), _paired(second_photos, count, "second_photos"),
                   None if prompts is None else check_prompts(prompts, count), _masks(masks, images),
                   _paired(sources, count, "sources"), mix)

    @property
    def count(self) -> int:
        return int(self.images.shape[0])

    def batch(self, name: str) -> torch.Tensor | None:
        if name == "sources" and self.sources is None:
            return self.references          # the inpainted image defaults to the reference
        return getattr(self, name)

    def paired_index(self, name: str, index: int) -> int:
        """Which image of the paired input ``name`` goes with generated image ``index``."""
        return 0 if self.batch(name).shape[0] == 1 else index


def _masks(masks, images: torch.Tensor) -> torch.Tensor | None:
    if masks is None:
        return None
    from ..validation import check_mask

    masks = check_mask(masks, "masks")
    if masks.dim() == 4:
        masks = masks[:, 0]
    elif masks.dim() == 2:
        masks = masks.unsqueeze(0)
    if masks.shape[0] not in (1, images.shape[0]):
        raise InvalidInputError(f"'masks' has {masks.shape[0]} masks for {images.shape[0]} images; give one or one "
                                f"per image.")
    return masks.float()


def largest_face(faces: list[Face]) -> Face | None:
    return max(faces, key=lambda f: f.area) if faces else None


@dataclass
class MetricContext:
    """Inputs, models and the caches one :func:`~.runner.run_metrics` call shares between metrics."""

    inputs: MetricInputs
    models: object                                   # MetricModels
    _analyses: dict = field(default_factory=dict)
    _embeddings: dict = field(default_factory=dict)

    def faces(self, analyzer, name: str) -> FaceAnalysis:
        """Every face (with embeddings and landmarks) of the input ``name``, analysed once per analyzer."""
        from ..face_analysis.analyze import analyze

        key = (id(analyzer), name)
        if key not in self._analyses:
            self._analyses[key] = analyze(analyzer, self.inputs.batch(name), selection="all",
                                          on_no_face="pass_through").faces
        return self._analyses[key]

    def embeddings(self, encoder, name: str) -> torch.Tensor:
        """``[N,D]`` unit image embeddings of the input ``name`` by ``encoder`` (CLIP or DINO), computed once."""
        key = (id(encoder), name)
        if key not in self._embeddings:
            self._embeddings[key] = encoder.embed_images(self.inputs.batch(name), self.models.batch_size)
        return self._embeddings[key]

    def reference_face(self, analyzer, index: int, name: str = "references") -> tuple[Face | None, str]:
        """The largest face of the ``name`` photo paired with generated image ``index``, or why there is none."""
        analysis = self.faces(analyzer, name)
        paired = self.inputs.paired_index(name, index)
        face = largest_face(analysis.faces[paired])
        return face, "" if face is not None else f"no face in {name} image {paired} ({analyzer.backend})"

    def generated_faces(self, analyzer, index: int) -> tuple[list[Face], str]:
        faces = self.faces(analyzer, "images").faces[index]
        return faces, "" if faces else f"no face in the image ({analyzer.backend})"


def unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)
