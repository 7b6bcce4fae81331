"""Identity similarity (the papers' FaceSim): reference embeddings vs the faces of a batch of images.

Per image the best-matching face is reported with its cosine similarity and L2 distance to the
reference (several references are combined with the normalised mean first), and passes or fails
against the backend's threshold:

| backend     | decides on | default threshold | L2 measured on |
|-------------|------------|-------------------|----------------|
| dlib        | L2         | < 0.6 (dlib's documented same-person rule) | raw 128-D vectors |
| insightface | cosine     | >= 0.30 (ArcFace verification, ~FAR 1e-4 on IJB-C for w600k/glint models) | unit vectors |

(Cosine is scale-free; for unit vectors ``L2 = sqrt(2 - 2 cos)``.) dlib's vectors are not centred, so
their cosine runs high (0.86 between different people on insightface's t1.jpg): judge dlib by L2.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import InvalidInputError
from .embeds import FaceEmbeds, embeds_from_faces, normalized_mean
from .types import FaceAnalysis

THRESHOLDS = {
    "dlib": ("l2", 0.6),
    "insightface": ("cosine", 0.30),
}
DEFAULT_RULE = ("cosine", 0.30)


@dataclass
class ImageScore:
    image_index: int
    face_number: int | None       # which face of the image matched best (numbered left to right); None: no face
    cosine: float
    l2: float
    passed: bool
    note: str = ""


@dataclass
class SimilarityReport:
    model_id: str
    metric: str                   # "cosine" or "l2": what pass/fail is decided on
    threshold: float
    scores: list[ImageScore] = field(default_factory=list)

    @property
    def mean_cosine(self) -> float:
        values = [s.cosine for s in self.scores if not math.isnan(s.cosine)]
        return float(np.mean(values)) if values else float("nan")

    @property
    def mean_l2(self) -> float:
        values = [s.l2 for s in self.scores if not math.isnan(s.l2)]
        return float(np.mean(values)) if values else float("nan")

    @property
    def all_passed(self) -> bool:
        return bool(self.scores) and all(s.passed for s in self.scores)

    def to_text(self) -> str:
        rule = f"{'cosine >=' if self.metric == 'cosine' else 'L2 <'} {self.threshold:g}"
        lines = [f"identity similarity ({self.model_id}; pass: {rule})"]
        for s in self.scores:
            if s.face_number is None:
                lines.append(f"image {s.image_index}: {s.note or 'no face'} -> FAIL")
            else:
                lines.append(f"image {s.image_index} face #{s.face_number}: cosine {s.cosine:.4f}  L2 {s.l2:.4f}"
                             f" -> {'PASS' if s.passed else 'FAIL'}")
        lines.append(f"mean cosine {self.mean_cosine:.4f}, mean L2 {self.mean_l2:.4f}, "
                     f"{sum(s.passed for s in self.scores)}/{len(self.scores)} passed")
        return "\n".join(lines)

    def to_json(self) -> str:
        def clean(value):
            return None if isinstance(value, float) and math.isnan(value) else value
        return json.dumps({"model_id": self.model_id, "metric": self.metric, "threshold": self.threshold,
                           "mean_cosine": clean(self.mean_cosine), "all_passed": self.all_passed,
                           "scores": [{k: clean(v) for k, v in asdict(s).items()} for s in self.scores]})


def rule_for(backend: str, threshold: float | None = None) -> tuple[str, float]:
    metric, default = THRESHOLDS.get(backend, DEFAULT_RULE)
    return metric, float(default if threshold is None or threshold <= 0 else threshold)


def reference_embeds(reference) -> FaceEmbeds:
    """FACES or FACE_EMBEDS -> FACE_EMBEDS."""
    if isinstance(reference, FaceEmbeds):
        return reference
    if isinstance(reference, FaceAnalysis):
        return embeds_from_faces(reference)
    raise InvalidInputError(f"the reference must be FACES or FACE_EMBEDS, got {type(reference).__name__}")


def compare(reference, analysis: FaceAnalysis, threshold: float | None = None) -> SimilarityReport:
    """Score every image of ``analysis`` against ``reference`` (FACES or FACE_EMBEDS)."""
    embeds = reference_embeds(reference)
    embeds.check_compatible(analysis.model_id, analysis.embedding_dim, "the analysed images")
    metric, limit = rule_for(analysis.backend, threshold)
    raw_l2 = analysis.backend == "dlib"
    ref = normalized_mean(embeds.embeddings).numpy().astype(np.float64)
    ref_unit = ref / max(np.linalg.norm(ref), 1e-12)
    report = SimilarityReport(analysis.model_id, metric, limit)
    for index, faces in enumerate(analysis.faces):
        best: tuple[float, float, int] | None = None
        for number, face in enumerate(faces):
            if face.embedding is None:
                continue
            vector = np.asarray(face.embedding, dtype=np.float64)
            unit = vector / max(np.linalg.norm(vector), 1e-12)
            cosine = float(unit @ ref_unit)
            l2 = float(np.linalg.norm(vector - ref)) if raw_l2 else float(np.linalg.norm(unit - ref_unit))
            better = best is None or (cosine > best[0] if metric == "cosine" else l2 < best[1])
            if better:
                best = (cosine, l2, number)
        if best is None:
            note = "no face" if not faces else "no embedding"
            report.scores.append(ImageScore(index, None, float("nan"), float("nan"), False, note))
            continue
        cosine, l2, number = best
        passed = cosine >= limit if metric == "cosine" else l2 < limit
        report.scores.append(ImageScore(index, number, cosine, l2, bool(passed)))
    return report


def annotate(images: list[np.ndarray], analysis: FaceAnalysis, report: SimilarityReport):
    """IMAGE [B,H,W,3]: best face per image boxed green (pass) or red (fail) with its scores."""
    from .analyze import OTHER_COLOUR, SELECTED_COLOUR, draw_banner, draw_face
    from .images import to_image_tensor

    grey = (150, 150, 150)
    out = []
    for score, array, faces in zip(report.scores, images, analysis.faces, strict=True):
        canvas = array.copy()
        for number, face in enumerate(faces):
            if number != score.face_number:
                draw_face(canvas, face, grey, f"#{number}", thick=False)
        if score.face_number is None:
            draw_banner(canvas, f"{score.note or 'no face'}: FAIL", OTHER_COLOUR)
        else:
            colour = SELECTED_COLOUR if score.passed else OTHER_COLOUR
            label = f"cos {score.cosine:.2f} L2 {score.l2:.2f} {'PASS' if score.passed else 'FAIL'}"
            draw_face(canvas, faces[score.face_number], colour, label)
        out.append(canvas)
    return to_image_tensor(out)


def compare_images(analyzer, images, reference, threshold: float | None = None, det_thresh: float | None = None):
    """Analyse ``images`` (all faces, no-face images kept) and score them: (report, annotated IMAGE, analysis)."""
    from .analyze import analyze

    embeds = reference_embeds(reference)
    embeds.check_compatible(analyzer.model_id, analyzer.embedding_dim, "the analyzer's embeddings")
    result = analyze(analyzer, images, selection="all", on_no_face="pass_through", det_thresh=det_thresh,
                     landmarks=False)
    report = compare(embeds, result.faces, threshold)
    return report, annotate(result.images, result.faces, report), result.faces
