"""IMAGE batch -> FACES: detection with retries, face selection, embeddings, the annotated preview.

Per image:

1. detection at the analyzer's size; when nothing is found (and ``retry``), again at smaller
   detector sizes (480, 320: faces that fill the frame) and on the image padded by 25 % with black
   (tight crops where the face touches the border);
2. faces are numbered left to right (the preview shows the numbers);
3. selection: ``largest`` (bbox area), ``index`` (the number), ``all``, or ``most_similar`` to a
   reference FACE_EMBEDS (cosine of the normalised vectors);
4. dense landmarks and embeddings for the selected faces only.

``on_no_face``: ``error`` raises :class:`~..errors.NoFaceError` naming every image index without a
face (its advice is ``no_face_advice``: the Analyze Faces node's, unless the caller's node has other
inputs to change); ``skip`` and ``pass_through`` keep going with an empty face list for that image and record the
choice in FACES (nodes with one output per image then leave the image out, or pass it through).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..errors import IncompatibleEmbedsError, InvalidInputError, NoFaceError
from .analyzers.base import Capability, pad_image, scale_face
from .embeds import FaceEmbeds
from .images import size_problem, to_uint8_rgb
from .types import Face, FaceAnalysis

logger = logging.getLogger("likeness")

SELECTIONS = ("largest", "index", "all", "most_similar")
NO_FACE_MODES = ("error", "skip", "pass_through")
RETRY_SIZES = (480, 320)
RETRY_PAD = 0.25
ANALYZE_NODE_ADVICE = ("Try another crop or a more sensitive analyzer loader (a lower det_threshold; dlib: upsample "
                       "or MMOD), or set on_no_face to 'skip' or 'pass_through' to keep the queue running.")


@dataclass
class AnalyzeResult:
    faces: FaceAnalysis
    detections: list[list[Face]]                   # every detected face per image, numbered left to right
    selected: list[list[int]]                      # numbers of the selected faces per image
    images: list[np.ndarray] = field(default_factory=list)   # the uint8 RGB images analysed


def analyze(analyzer, image, selection: str = "largest", face_index: int = 0, reference: FaceEmbeds | None = None,
            on_no_face: str = "error", det_size: int | None = None, det_thresh: float | None = None,
            retry: bool = True, embed: bool = True, landmarks: bool = True,
            no_face_advice: str = ANALYZE_NODE_ADVICE) -> AnalyzeResult:
    """Analyse an IMAGE batch (see the module doc)."""
    if selection not in SELECTIONS:
        raise InvalidInputError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if on_no_face not in NO_FACE_MODES:
        raise InvalidInputError(f"on_no_face must be one of {NO_FACE_MODES}, got {on_no_face!r}")
    reference_vector = _reference_vector(analyzer, reference) if selection == "most_similar" else None
    can_embed = Capability.EMBED in analyzer.capabilities
    if selection == "most_similar" and not can_embed:
        raise InvalidInputError("selection 'most_similar' needs an analyzer with a recognition model.")
    batch = to_uint8_rgb(image)
    notes = list(batch.notes)
    per_image, detections, selected, missing = [], [], [], []
    for index, array in enumerate(batch.images):
        found, chosen, reason = _analyze_one(analyzer, array, index, selection, face_index, reference_vector,
                                             det_size, det_thresh, retry, embed and can_embed, landmarks)
        found = [f.with_image_index(index) for f in found]
        detections.append(found)
        selected.append(chosen)
        per_image.append([found[i] for i in chosen])
        if reason:
            missing.append((index, reason))
            notes.append(f"image {index}: {reason}")
    if missing and on_no_face == "error":
        total = len(batch.images)
        listing = "; ".join(f"image {i} {r}" for i, r in missing)
        raise NoFaceError(
            f"No usable face in {len(missing)} of {total} image(s) (indices {[i for i, _ in missing]}): {listing}.",
            no_face_advice)
    analysis = FaceAnalysis(faces=per_image, image_sizes=batch.sizes, backend=analyzer.backend,
                            model_id=analyzer.model_id, embedding_dim=analyzer.embedding_dim if can_embed else None,
                            notes=notes, on_no_face=on_no_face if on_no_face != "error" else "pass_through")
    for note in notes:
        logger.info("Likeness face analysis: %s", note)
    return AnalyzeResult(analysis, detections, selected, batch.images)


def _reference_vector(analyzer, reference: FaceEmbeds | None) -> np.ndarray:
    if reference is None:
        raise InvalidInputError("selection 'most_similar' needs a reference (connect FACE_EMBEDS).")
    if reference.model_id != analyzer.model_id:
        raise IncompatibleEmbedsError(
            f"the reference embeddings come from {reference.model_id} but this analyzer makes {analyzer.model_id}; "
            f"compute the reference with the same analyzer.")
    direction = reference.normalized().mean(0).numpy()
    return direction / max(float(np.linalg.norm(direction)), 1e-12)


def _analyze_one(analyzer, image: np.ndarray, index: int, selection: str, face_index: int,
                 reference: np.ndarray | None, det_size, det_thresh, retry: bool, embed: bool,
                 landmarks: bool) -> tuple[list[Face], list[int], str | None]:
    """(detections in original coordinates, selected numbers, reason when no usable face)."""
    problem = size_problem(*image.shape[:2])
    if problem:
        return [], [], problem
    found, work_image, offset = detect_with_retries(analyzer, image, det_size, det_thresh, retry)
    if not found:
        return [], [], "no face detected" + (" (also retried smaller and padded)" if retry else "")
    found = sorted(found, key=lambda f: (float(f.bbox[0]), float(f.bbox[1])))
    if selection == "most_similar":
        found = analyzer.embed(work_image, found)
    chosen, reason = select(found, selection, face_index, reference)
    if reason:
        return _to_original(found, offset), [], reason
    picked = [found[i] for i in chosen]
    if landmarks:
        picked = analyzer.landmarks(work_image, picked)
    if embed and selection != "most_similar":
        picked = analyzer.embed(work_image, picked)
    for number, face in zip(chosen, picked, strict=True):
        found[number] = face
    return _to_original(found, offset), chosen, None


def _to_original(faces: list[Face], offset: tuple[int, int]) -> list[Face]:
    if offset == (0, 0):
        return faces
    return [scale_face(f, 1.0, offset[0], offset[1]) for f in faces]


def detect_with_retries(analyzer, image: np.ndarray, det_size=None, det_thresh=None,
                        retry: bool = True) -> tuple[list[Face], np.ndarray, tuple[int, int]]:
    """Faces, the image they were found in (maybe padded) and the padding offset (x, y)."""
    size = int(det_size or analyzer.default_det_size)
    faces = analyzer.detect(image, size, det_thresh)
    if faces or not retry:
        return faces, image, (0, 0)
    for smaller in (s for s in RETRY_SIZES if s < size):
        faces = analyzer.detect(image, smaller, det_thresh)
        if faces:
            return faces, image, (0, 0)
    padded, pad_x, pad_y = pad_image(image, RETRY_PAD)
    for attempt in (size, min(RETRY_SIZES)):
        faces = analyzer.detect(padded, attempt, det_thresh)
        if faces:
            return faces, padded, (pad_x, pad_y)
    return [], image, (0, 0)


def select(faces: list[Face], selection: str, face_index: int = 0,
           reference: np.ndarray | None = None) -> tuple[list[int], str | None]:
    """Numbers of the faces to keep (faces are numbered left to right), or a reason when none fits."""
    if not faces:
        return [], "no face detected"
    if selection == "all":
        return list(range(len(faces))), None
    if selection == "largest":
        return [max(range(len(faces)), key=lambda i: faces[i].area)], None
    if selection == "index":
        if 0 <= face_index < len(faces):
            return [face_index], None
        return [], (f"has {len(faces)} face(s), so face_index {face_index} does not exist (faces are numbered "
                    f"left to right from 0, see the preview)")
    if selection == "most_similar":
        scores = [_cosine(f.embedding, reference) for f in faces]
        return [int(np.argmax(scores))], None
    raise InvalidInputError(f"unknown selection {selection!r}")


def _cosine(embedding: np.ndarray | None, reference: np.ndarray) -> float:
    if embedding is None:
        return -2.0
    norm = float(np.linalg.norm(embedding))
    return float(np.dot(embedding, reference) / norm) if norm > 0 else -2.0


# ----------------------------------------------------------------------------------------- preview

SELECTED_COLOUR = (40, 220, 40)
OTHER_COLOUR = (230, 80, 60)
KPS_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))


def draw_preview(result: AnalyzeResult):
    """IMAGE [B,H,W,3]: every detection boxed and numbered; selected faces green, others red."""
    from .images import to_image_tensor

    drawn = []
    for index, array in enumerate(result.images):
        canvas = array.copy()
        chosen = set(result.selected[index])
        for number, face in enumerate(result.detections[index]):
            colour = SELECTED_COLOUR if number in chosen else OTHER_COLOUR
            draw_face(canvas, face, colour, f"#{number} {face.score:.2f}", thick=number in chosen)
        if not chosen:
            draw_banner(canvas, "no face" if not result.detections[index] else "no face selected", OTHER_COLOUR)
        drawn.append(canvas)
    return to_image_tensor(drawn)


def _scale(canvas: np.ndarray) -> float:
    return max(0.35, min(canvas.shape[:2]) / 900.0)


def draw_face(canvas: np.ndarray, face: Face, colour, label: str = "", thick: bool = True) -> None:
    import cv2

    scale = _scale(canvas)
    width = max(1, int(round((3 if thick else 1.5) * scale)))
    x1, y1, x2, y2 = (int(round(float(v))) for v in face.bbox)
    cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, width, cv2.LINE_AA)
    radius = max(1, int(round(3 * scale)))
    for point, kp_colour in zip(face.kps, KPS_COLOURS, strict=True):
        cv2.circle(canvas, (int(round(float(point[0]))), int(round(float(point[1])))), radius, kp_colour, -1, cv2.LINE_AA)
    if label:
        draw_label(canvas, label, (x1, y1), colour)


def draw_label(canvas: np.ndarray, text: str, corner: tuple[int, int], colour) -> None:
    import cv2

    scale = _scale(canvas)
    font = cv2.FONT_HERSHEY_SIMPLEX
    thickness = max(1, int(round(1.5 * scale)))
    (w, h), base = cv2.getTextSize(text, font, 0.6 * scale, thickness)
    x = max(0, min(corner[0], canvas.shape[1] - w - 2))
    y = corner[1] - 4 if corner[1] - h - base - 4 >= 0 else corner[1] + h + 4
    cv2.rectangle(canvas, (x, y - h - 2), (x + w + 2, y + base), colour, -1)
    cv2.putText(canvas, text, (x + 1, y), font, 0.6 * scale, (255, 255, 255), thickness, cv2.LINE_AA)


def draw_banner(canvas: np.ndarray, text: str, colour) -> None:
    draw_label(canvas, text, (4, int(24 * _scale(canvas)) + 4), colour)


def warn_images_without_face(faces, input_name: str = "image") -> list[int]:
    """Log (so the UI shows) which images of ``input_name`` have no face and are left out of an identity."""
    missing = [i for i, face in enumerate(faces.first_face_per_image()) if face is None]
    if missing:
        logger.warning("Likeness: image(s) %s of '%s' have no face and were left out of the identity (%d of %d "
                       "used); check Analyze Faces' preview.", missing, input_name, len(faces) - len(missing),
                       len(faces))
    return missing
