"""FACE_PARSER and the per-face parsing pipeline: crop, BiSeNet (or landmarks), paste back.

For every selected face the image is cropped to a square around the face box (``crop_scale`` times
its long side, black outside the image), resized to 512x512 (bilinear, antialiased), normalised with
the ImageNet mean/std and parsed by BiSeNet in batches. The logits are sampled back onto the image
pixels the crop covers and the arg-max is taken there. Where crops of several faces overlap, a
non-background label replaces background, and between two faces the more confident label wins.
Brows, eyes and ears are then re-assigned by side of the face's midline (eye centre to mouth centre),
so ``l_*`` is always the image-left one.

The landmark parser draws the same label space from 68/106 landmarks or 5 keypoints
(:mod:`.landmark_fallback`) and needs no weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InvalidInputError
from ..types import Face, FaceAnalysis
from .landmark_fallback import labels_for_face
from .regions import LABELS, SIDED_PAIRS

INPUT_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LANDMARKS_CHOICE = "landmarks (no weights)"
_PASTE_BUDGET = 16 * 1024 * 1024  # logits elements sampled per band when pasting back (64 MB in fp32)


@dataclass
class FaceParser:
    """FACE_PARSER: a loaded BiSeNet (``kind="bisenet"``) or the landmark fallback (``kind="landmarks"``)."""

    kind: str
    name: str
    model: nn.Module | None = None
    device: str = "auto"
    batch_size: int = 4

    def __post_init__(self):
        if self.kind not in ("bisenet", "landmarks"):
            raise InvalidInputError(f"unknown face parser kind '{self.kind}'")
        if self.kind == "bisenet" and self.model is None:
            raise InvalidInputError("a BiSeNet face parser needs a model")

    def describe(self) -> str:
        return f"{self.kind}: {self.name}"


def landmark_parser() -> FaceParser:
    return FaceParser(kind="landmarks", name=LANDMARKS_CHOICE)


@dataclass
class ParseResult:
    """Per image of the batch: the label map (``[B,H,W]`` uint8), how many faces were parsed, notes."""

    labels: torch.Tensor
    faces_parsed: list[int]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- inputs

def rgb_batch(images) -> tuple[torch.Tensor, list[str]]:
    """IMAGE -> float ``[B,H,W,3]`` 0..1 on CPU (gray replicated, alpha dropped, noted; NaN pixels are refused)."""
    from ..images import check_image_tensor

    x = check_image_tensor(images, "image").detach().to("cpu", torch.float32)
    notes = []
    if x.shape[-1] in (1, 2):
        x = x[..., :1].expand(-1, -1, -1, 3)
        notes.append("the image is grayscale: parsed as RGB with equal channels.")
    elif x.shape[-1] == 4:
        x = x[..., :3]
        notes.append("the image is RGBA: alpha was ignored for parsing.")
    return x.clamp(0.0, 1.0).contiguous(), notes


def faces_for_batch(analysis: FaceAnalysis, batch: int, height: int, width: int,
                    face_index: int = -1) -> tuple[list[list[Face]], list[str]]:
    """The faces to parse in each image of an IMAGE batch, in that batch's pixel coordinates.

    ``analysis`` must describe the same images: one entry per image, or a single entry used for every
    image. When it was made at another resolution of the same aspect ratio, coordinates are scaled.
    ``face_index`` -1 takes every face of an image, otherwise the face at that index (when present).
    """
    if not isinstance(analysis, FaceAnalysis):
        raise InvalidInputError(f"'faces' must be FACES from the Analyze node, got {type(analysis).__name__}.")
    if len(analysis) not in (1, batch):
        raise InvalidInputError(
            f"FACES describe {len(analysis)} images but the image batch has {batch}; analyse the same batch "
            "(or a single reference image, which is then used for every image).")
    selected, notes = [], []
    for image_index in range(batch):
        source = image_index if len(analysis) == batch else 0
        faces = analysis.faces[source]
        src_h, src_w = analysis.image_sizes[source]
        sx, sy = width / float(src_w), height / float(src_h)
        if abs(sx - sy) > 0.01 * max(sx, sy):
            raise InvalidInputError(
                f"FACES were found on a {src_w}x{src_h} image but image {image_index} is {width}x{height} (another "
                "aspect ratio): the face positions do not fit. Analyse the image that is being parsed.")
        if face_index >= 0:
            if face_index >= len(faces):
                notes.append(f"image {image_index}: no face at index {face_index} ({len(faces)} found).")
                faces = []
            else:
                faces = [faces[face_index]]
        if abs(sx - 1.0) > 1e-6 or abs(sy - 1.0) > 1e-6:
            faces = [_scaled_face(f, sx, sy) for f in faces]
        selected.append(list(faces))
    return selected, notes


def _scaled_face(face: Face, sx: float, sy: float) -> Face:
    from dataclasses import replace

    scale2 = np.array([sx, sy], dtype=np.float32)
    return replace(face, bbox=np.asarray(face.bbox, np.float32) * np.tile(scale2, 2),
                   kps=np.asarray(face.kps, np.float32) * scale2,
                   landmarks=None if face.landmarks is None else np.asarray(face.landmarks, np.float32)[:, :2] * scale2)


# --------------------------------------------------------------------------------- crop geometry

@dataclass
class _Crop:
    image_index: int
    face: Face
    visible: tuple[int, int, int, int]      # x0, y0, x1, y1 of the image pixels the crop covers
    placed: tuple[int, int, int, int]       # x, y, w, h of those pixels inside the 512x512 input


def _crop_for(face: Face, image_index: int, height: int, width: int, crop_scale: float) -> _Crop | None:
    box = np.asarray(face.bbox, dtype=np.float64)
    if box.shape != (4,) or not np.all(np.isfinite(box)):
        raise InvalidInputError(f"image {image_index}: a face box is not 4 finite numbers ({box.tolist()}).")
    side = max(box[2] - box[0], box[3] - box[1], 1.0) * float(crop_scale)
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    x0, y0 = cx - side / 2.0, cy - side / 2.0
    vx0, vy0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    vx1, vy1 = min(width, int(np.ceil(x0 + side))), min(height, int(np.ceil(y0 + side)))
    if vx1 - vx0 < 2 or vy1 - vy0 < 2:
        return None  # the face lies outside the image
    scale = INPUT_SIZE / side
    px, py = int(round((vx0 - x0) * scale)), int(round((vy0 - y0) * scale))
    px, py = min(max(px, 0), INPUT_SIZE - 1), min(max(py, 0), INPUT_SIZE - 1)
    pw = max(1, min(INPUT_SIZE - px, int(round((vx1 - vx0) * scale))))
    ph = max(1, min(INPUT_SIZE - py, int(round((vy1 - vy0) * scale))))
    return _Crop(image_index, face, (vx0, vy0, vx1, vy1), (px, py, pw, ph))


def _crop_input(image: torch.Tensor, crop: _Crop) -> torch.Tensor:
    """``[3,512,512]`` normalised network input for one crop (black outside the image)."""
    vx0, vy0, vx1, vy1 = crop.visible
    px, py, pw, ph = crop.placed
    region = image[vy0:vy1, vx0:vx1].permute(2, 0, 1).unsqueeze(0)
    antialias = pw < region.shape[-1] or ph < region.shape[-2]
    region = F.interpolate(region, size=(ph, pw), mode="bilinear", align_corners=False, antialias=antialias)
    canvas = torch.zeros(3, INPUT_SIZE, INPUT_SIZE, dtype=torch.float32)
    canvas[:, py:py + ph, px:px + pw] = region[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (canvas - mean) / std


def _paste_back(logits: torch.Tensor, crop: _Crop) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and confidences ``[h,w]`` on the crop's visible image pixels from ``[C,512,512]`` logits."""
    vx0, vy0, vx1, vy1 = crop.visible
    px, py, pw, ph = crop.placed
    width, height = vx1 - vx0, vy1 - vy0
    device = logits.device
    # Centre of visible pixel j sits at px + (j + 0.5) * pw / width in the 512 input (its exact resize).
    gx = (px + (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * (pw / width)) * (2.0 / INPUT_SIZE) - 1.0
    gy_all = (py + (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * (ph / height)) * (2.0 / INPUT_SIZE) - 1.0
    rows = max(1, _PASTE_BUDGET // max(1, logits.shape[0] * width))
    labels = torch.empty(height, width, dtype=torch.uint8)
    confidence = torch.empty(height, width, dtype=torch.float32)
    source = logits.unsqueeze(0).float()
    for start in range(0, height, rows):
        gy = gy_all[start:start + rows]
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1).unsqueeze(0)
        sampled = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        probabilities = sampled.softmax(dim=0)
        best, index = probabilities.max(dim=0)
        labels[start:start + gy.shape[0]] = index.to("cpu", torch.uint8)
        confidence[start:start + gy.shape[0]] = best.to("cpu")
    return labels, confidence


def assign_sides(labels: torch.Tensor, face: Face, origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Relabel brows/eyes/ears of ``labels`` (a window at ``origin`` = (x, y)) by side of the face midline."""
    kps = np.asarray(face.kps, dtype=np.float64)
    if kps.shape != (5, 2) or not np.all(np.isfinite(kps)):
        return labels
    eye_mid, mouth_mid = kps[0:2].mean(axis=0), kps[3:5].mean(axis=0)
    axis = mouth_mid - eye_mid
    if float(np.hypot(*axis)) < 1e-6:
        return labels
    height, width = labels.shape
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1) + origin[1] + 0.5 - float(eye_mid[1])
    xs = torch.arange(width, dtype=torch.float32).view(1, -1) + origin[0] + 0.5 - float(eye_mid[0])
    # Cross product of the downward midline with the pixel offset: positive on the image-left side.
    on_left = (float(axis[0]) * ys - float(axis[1]) * xs) > 0
    out = labels.clone()
    for left_label, right_label in SIDED_PAIRS:
        pair = (labels == left_label) | (labels == right_label)
        out[pair & on_left] = left_label
        out[pair & ~on_left] = right_label
    return out


# ------------------------------------------------------------------------------------- pipeline

def parse_faces(parser: FaceParser, images, analysis: FaceAnalysis, face_index: int = -1,
                crop_scale: float = 2.2, device: torch.device | str | None = None) -> ParseResult:
    """Label maps ``[B,H,W]`` (uint8, BiSeNet label space) of the selected faces of every image."""
    if not isinstance(parser, FaceParser):
        raise InvalidInputError(f"'parser' must be a FACE_PARSER from the Face Parser Loader, got {type(parser).__name__}.")
    if not (1.0 <= float(crop_scale) <= 6.0):
        raise InvalidInputError(f"crop_scale must be between 1 and 6 (face box sizes), got {crop_scale}.")
    rgb, notes = rgb_batch(images)
    batch, height, width, _ = rgb.shape
    selected, selection_notes = faces_for_batch(analysis, batch, height, width, face_index)
    notes += selection_notes
    labels = torch.zeros(batch, height, width, dtype=torch.uint8)
    counts = [len(faces) for faces in selected]
    for image_index, faces in enumerate(selected):
        if not faces:
            notes.append(f"image {image_index}: no face to parse; its masks are empty.")
    if parser.kind == "landmarks":
        _parse_with_landmarks(labels, selected)
    else:
        _parse_with_model(parser, rgb, labels, selected, crop_scale, device)
    return ParseResult(labels, counts, notes)


def _parse_with_landmarks(labels: torch.Tensor, selected: list[list[Face]]) -> None:
    _, height, width = labels.shape
    for image_index, faces in enumerate(selected):
        for face in sorted(faces, key=lambda f: f.area):  # larger faces painted last (they are in front)
            face_labels = torch.from_numpy(labels_for_face(face, height, width))
            target = labels[image_index]
            target[face_labels > 0] = face_labels[face_labels > 0]


def _parse_with_model(parser: FaceParser, rgb: torch.Tensor, labels: torch.Tensor, selected: list[list[Face]],
                      crop_scale: float, device) -> None:
    from ...host.devices import torch_device

    _, height, width, _ = rgb.shape
    crops = [c for i, faces in enumerate(selected) for f in faces
             if (c := _crop_for(f, i, height, width, crop_scale)) is not None]
    if not crops:
        return
    target_device = torch.device(device) if device is not None else torch_device(parser.device)
    model = parser.model.to(target_device).eval()
    confidence = torch.zeros(labels.shape, dtype=torch.float32)
    chunk = max(1, int(parser.batch_size))
    with torch.inference_mode():
        for start in range(0, len(crops), chunk):
            group = crops[start:start + chunk]
            batch_input = torch.stack([_crop_input(rgb[c.image_index], c) for c in group]).to(target_device)
            logits = model(batch_input)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            if logits.ndim != 4 or logits.shape[1] != len(LABELS):
                raise InvalidInputError(f"the face parser returned logits of shape {list(logits.shape)}, "
                                        f"expected [N, {len(LABELS)}, H, W].")
            for crop, crop_logits in zip(group, logits, strict=True):
                face_labels, face_confidence = _paste_back(crop_logits, crop)
                vx0, vy0, vx1, vy1 = crop.visible
                face_labels = assign_sides(face_labels, crop.face, (vx0, vy0))
                target = labels[crop.image_index, vy0:vy1, vx0:vx1]
                target_conf = confidence[crop.image_index, vy0:vy1, vx0:vx1]
                wins = (face_labels > 0) & ((target == 0) | (face_confidence > target_conf))
                target[wins] = face_labels[wins]
                target_conf[wins] = face_confidence[wins]


@dataclass
class RegionResult:
    mask: torch.Tensor        # MASK [B,H,W] float 0..1
    parse_map: torch.Tensor   # IMAGE [B,H,W,3] float 0..1 (CelebAMask-HQ colours)
    labels: torch.Tensor      # [B,H,W] uint8
    notes: list[str]


def face_regions(parser: FaceParser, images, analysis: FaceAnalysis, regions: list[str], grow: int = 0,
                 feather: float = 0.0, face_index: int = -1, crop_scale: float = 2.2, limit_mask=None,
                 device=None) -> RegionResult:
    """Parse the selected faces and return the union of ``regions`` as a grown/feathered MASK.

    ``limit_mask`` (optional MASK ``[B,H,W]`` or ``[1,H,W]`` of the image size) multiplies the result.
    """
    from .regions import REGIONS, coerce_mask, colour_parse_map, region_mask, shape_mask

    unknown = [r for r in regions if r not in REGIONS]
    if unknown or not regions:
        raise InvalidInputError(f"Unknown face region '{unknown[0] if unknown else ''}'. Known: {', '.join(REGIONS)}.")
    if abs(int(grow)) > 1024 or not (0 <= float(feather) <= 1024):
        raise InvalidInputError(f"grow must be within -1024..1024 and feather within 0..1024 (got {grow}, {feather}).")
    result = parse_faces(parser, images, analysis, face_index=face_index, crop_scale=crop_scale, device=device)
    batch, height, width = result.labels.shape
    limit = None if limit_mask is None else coerce_mask(limit_mask, batch, height, width, "mask")
    mask = shape_mask(region_mask(result.labels, regions), int(grow), float(feather))
    if limit is not None:
        mask = mask * limit.to(mask.dtype).clamp(0.0, 1.0)
    return RegionResult(mask, colour_parse_map(result.labels), result.labels, result.notes)
