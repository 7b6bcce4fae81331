"""Identity-mixing balance: how much a generated face looks like each of the blended source identities.

Face-MakeUp's paper shows identity mixing but gives no measure of the balance; this readout is the
similarity node's FaceSim (best-matching face, cosine) of every result image against each source identity
separately, plus each source's share of the positive similarity (a balance of 0.5/0.5 means the result sits
midway). Host-independent: FACES in, numbers out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ...errors import InvalidInputError
from ...face_analysis.similarity import compare
from ...face_analysis.types import FaceAnalysis


@dataclass
class MixingReadout:
    model_id: str
    source_images: list[int]                          # which source image each identity came from
    cosines: list[list[float]] = field(default_factory=list)   # [result image][source identity]; NaN: no face
    weights: list[float] | None = None                # the mix weights used, for the report

    def shares(self) -> list[list[float]]:
        """Per result image, each source's share of the (clamped at 0) similarities; NaN without a face."""
        out = []
        for row in self.cosines:
            positive = [max(c, 0.0) if not math.isnan(c) else math.nan for c in row]
            total = sum(p for p in positive if not math.isnan(p))
            out.append([p / total if total > 0 and not math.isnan(p) else math.nan for p in positive])
        return out

    def mean_cosine(self, source: int) -> float:
        values = [row[source] for row in self.cosines if not math.isnan(row[source])]
        return sum(values) / len(values) if values else math.nan

    def to_text(self) -> str:
        names = [f"source {i} (image {s})" for i, s in enumerate(self.source_images)]
        head = f"identity mixing balance ({self.model_id})"
        if self.weights:
            head += "; mix weights " + ", ".join(f"{w:g}" for w in self.weights)
        lines = [head]
        for r, (row, share) in enumerate(zip(self.cosines, self.shares(), strict=True)):
            parts = [f"{n}: cosine {c:.4f} share {s:.2f}" for n, c, s in zip(names, row, share, strict=True)]
            lines.append(f"result {r}: " + "; ".join(parts))
        return "\n".join(lines)


def _single_image(analysis: FaceAnalysis, index: int) -> FaceAnalysis:
    return replace(analysis, faces=[analysis.faces[index]], image_sizes=[analysis.image_sizes[index]], notes=[])


def mixing_readout(sources: FaceAnalysis, results: FaceAnalysis, weights: list[float] | None = None) -> MixingReadout:
    """Cosine of each result image's best face to each source identity (the first face of each source image
    that has an embedding). Sources and results must come from the same embedding model."""
    with_face = [i for i, faces in enumerate(sources.faces) if any(f.embedding is not None for f in faces)]
    if not with_face:
        raise InvalidInputError("the source FACES hold no identity embedding (no face, or no recognition model).")
    readout = MixingReadout(results.model_id, with_face, [[] for _ in results.faces], weights)
    for index in with_face:
        report = compare(_single_image(sources, index), results)
        for row, score in zip(readout.cosines, report.scores, strict=True):
            row.append(score.cosine)
    return readout
