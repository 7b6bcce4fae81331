"""Crop a face with context, build its inpaint mask, and paste the result back (FaceA-Net decoupling).

The scene is made by any model; only the face is redrawn by the identity model, at its native working
size: a square box around the face (``context`` times the face box) is cut out, resized so its long
side is ``working_size`` (a multiple of 8), inpainted, resized back and blended into the original with
a feathered mask. The feathered mask is forced to zero inside a margin along the crop border, so the
blend never reaches the crop's edge and every pixel where the full-resolution mask is zero is returned
bit-for-bit unchanged.

Images are ComfyUI IMAGE tensors ``[H,W,C]`` / ``[B,H,W,C]`` float 0..1, masks ``[H,W]`` float 0..1.
Face geometry comes from :class:`~...face_analysis.types.Face` (bbox, five keypoints). Nothing here
imports ComfyUI: :func:`sample_inpaint` samples through :mod:`host.sampling`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import InvalidInputError
from .identity import ATTRIBUTES, TASKS

logger = logging.getLogger("likeness")

MASK_REGIONS = TASKS  # "face" and the four attributes


@dataclass(frozen=True)
class CropInfo:
    """Where a working crop came from: ``box`` (x0, y0, x1, y1) in the original image's pixels."""

    box: tuple[int, int, int, int]
    image_size: tuple[int, int]       # (H, W) of the original image
    work_size: tuple[int, int]        # (h, w) of the crop as the model sees it
    image_index: int = 0

    @property
    def box_size(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        return y1 - y0, x1 - x0

    @property
    def scale(self) -> tuple[float, float]:
        """(sy, sx): working pixels per original pixel."""
        bh, bw = self.box_size
        return self.work_size[0] / bh, self.work_size[1] / bw

    def to_work(self, points: np.ndarray) -> np.ndarray:
        """Original-image (x, y) points -> working-crop coordinates."""
        sy, sx = self.scale
        pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        return np.stack([(pts[:, 0] - self.box[0]) * sx, (pts[:, 1] - self.box[1]) * sy], axis=1)


def crop_box(bbox, image_size: tuple[int, int], context: float = 2.0, square: bool = False) -> tuple[int, int, int, int]:
    """A square box of side ``context`` x the face box's long side, centred on the face, kept inside the
    image (shifted; where the image is smaller than the square the box takes the image's full extent on
    that axis, or, with ``square=True``, the square shrinks to fit)."""
    height, width = image_size
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if not (x2 > x1 and y2 > y1):
        raise InvalidInputError(f"Face box {list(bbox)} is empty.")
    side = max(x2 - x1, y2 - y1) * max(1.0, float(context))
    if square:
        side = min(side, width, height)
    # square when it fits; otherwise the full extent along the short image side
    side_x = int(round(min(side, width)))
    side_y = int(round(min(side, height)))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    x0 = int(round(min(max(cx - side_x / 2, 0), width - side_x)))
    y0 = int(round(min(max(cy - side_y / 2, 0), height - side_y)))
    return x0, y0, x0 + side_x, y0 + side_y


def work_size_for(box: tuple[int, int, int, int], working_size: int = 512, multiple: int = 8) -> tuple[int, int]:
    """(h, w) with the long side ``working_size`` and both sides multiples of ``multiple``."""
    if working_size < multiple:
        raise InvalidInputError(f"working size {working_size} is smaller than {multiple}.")
    bw, bh = box[2] - box[0], box[3] - box[1]
    long_side = max(bw, bh)
    def snap(v: float) -> int:
        return max(multiple, int(round(v / multiple)) * multiple)
    return snap(working_size * bh / long_side), snap(working_size * bw / long_side)


def make_crop_info(bbox, image_size, context: float = 2.0, working_size: int = 512, image_index: int = 0,
                   square: bool = False) -> CropInfo:
    box = crop_box(bbox, image_size, context, square)
    return CropInfo(box=box, image_size=tuple(image_size), work_size=work_size_for(box, working_size),
                    image_index=image_index)


def _resize_chw(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N,C,H,W] resize; antialiased when shrinking, bicubic when enlarging (clamped to 0..1)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x.clone()
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    out = F.interpolate(x, size=size, mode="bilinear" if shrinking else "bicubic", align_corners=False,
                        antialias=shrinking)
    return out.clamp(0.0, 1.0)


def crop_image(image: torch.Tensor, info: CropInfo) -> torch.Tensor:
    """The working crop ``[h,w,C]`` of an image ``[H,W,C]``."""
    x0, y0, x1, y1 = info.box
    region = image[y0:y1, x0:x1].permute(2, 0, 1).unsqueeze(0).float()
    return _resize_chw(region, info.work_size)[0].permute(1, 2, 0)


def crop_mask(mask: torch.Tensor, info: CropInfo) -> torch.Tensor:
    """The working crop ``[h,w]`` of a full-resolution mask ``[H,W]``."""
    x0, y0, x1, y1 = info.box
    return _resize_chw(mask[y0:y1, x0:x1][None, None].float(), info.work_size)[0, 0]


# ---------------------------------------------------------------------------------------------- masks

def ellipse_mask(size: tuple[int, int], center, radii, angle: float = 0.0) -> torch.Tensor:
    """A filled (anti-aliased by one pixel) ellipse ``[h,w]``; ``angle`` in radians."""
    h, w = size
    ys = torch.arange(h, dtype=torch.float32).view(-1, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, -1) + 0.5
    dx, dy = xs - float(center[0]), ys - float(center[1])
    c, s = math.cos(angle), math.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    rx, ry = max(float(radii[0]), 0.5), max(float(radii[1]), 0.5)
    dist = torch.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    edge = 1.0 / max(min(rx, ry), 1.0)
    return ((1.0 - dist) / edge + 0.5).clamp(0.0, 1.0)


def keypoint_region_masks(bbox, kps, size: tuple[int, int], regions=MASK_REGIONS) -> dict[str, torch.Tensor]:
    """Region masks from a face box and five keypoints (all in the coordinates of an image of ``size``).

    A geometric stand-in for a face parser: the face is an ellipse fitted to the box; eyes, nose and
    mouth are ellipses scaled by the inter-ocular distance and rotated with the eye line. ``left_eye``
    is the eye on the image's left (the pack-wide convention of keypoints and parsing regions).
    """
    kps = np.asarray(kps, dtype=np.float32).reshape(5, 2)
    x1, y1, x2, y2 = (float(v) for v in bbox)
    eye_img_left, eye_img_right, nose, mouth_l, mouth_r = kps
    eye_vec = eye_img_right - eye_img_left
    iod = max(float(np.linalg.norm(eye_vec)), 1.0)
    angle = math.atan2(float(eye_vec[1]), float(eye_vec[0]))
    out: dict[str, torch.Tensor] = {}
    for region in regions:
        if region == "face":
            center = ((x1 + x2) / 2, (y1 + y2) / 2 - 0.05 * (y2 - y1))
            radii = (0.58 * (x2 - x1), 0.66 * (y2 - y1))
            out[region] = ellipse_mask(size, center, radii, angle)
        elif region in ("left_eye", "right_eye"):
            eye = eye_img_left if region == "left_eye" else eye_img_right
            out[region] = ellipse_mask(size, eye, (0.32 * iod, 0.2 * iod), angle)
        elif region == "nose":
            eyes_mid = (eye_img_left + eye_img_right) / 2
            center = eyes_mid + (nose - eyes_mid) * 0.6
            out[region] = ellipse_mask(size, center, (0.3 * iod, 0.5 * iod), angle)
        elif region == "mouth":
            center = (mouth_l + mouth_r) / 2
            half = max(float(np.linalg.norm(mouth_r - mouth_l)) / 2, 0.2 * iod)
            out[region] = ellipse_mask(size, center, (half * 1.3, 0.28 * iod), angle)
        else:
            raise InvalidInputError(f"Unknown mask region '{region}'; expected one of {', '.join(MASK_REGIONS)}.")
    return out


# task -> face-parsing region (``face_analysis.parsing.regions``; left/right = the image's left/right)
PARSE_REGION = {"face": "whole_face", "left_eye": "left_eye", "right_eye": "right_eye", "nose": "nose",
                "mouth": "mouth_and_lips"}
# how far a box mask extends beyond the parsed region, as a fraction of the region's size per side
BOX_MARGIN = {"face": 0.08, "left_eye": 0.35, "right_eye": 0.35, "nose": 0.2, "mouth": 0.25}
MASK_SHAPES = ("box", "region")


def face_in_crop(face, info: CropInfo):
    """The face with its box, keypoints and landmarks mapped into working-crop pixels."""
    from dataclasses import replace

    bbox = info.to_work(np.asarray(face.bbox, dtype=np.float32).reshape(2, 2)).reshape(-1)
    landmarks = None if face.landmarks is None else info.to_work(np.asarray(face.landmarks)[:, :2])
    return replace(face, bbox=bbox.astype(np.float32), kps=info.to_work(face.kps).astype(np.float32),
                   landmarks=landmarks, image_index=0)


def parse_labels(face, size: tuple[int, int], crop: torch.Tensor | None = None, parser=None) -> torch.Tensor:
    """BiSeNet label map ``[h,w]`` of one face: the given FACE_PARSER on ``crop`` when it is a network,
    else drawn from the face's landmarks (the parsing package's fallback)."""
    if parser is not None and getattr(parser, "kind", "landmarks") != "landmarks" and crop is not None:
        from ...face_analysis.parsing import parse_faces
        from ...face_analysis.types import FaceAnalysis

        analysis = FaceAnalysis(faces=[[face]], image_sizes=[tuple(size)], backend="crop", model_id="crop")
        return parse_faces(parser, crop[None], analysis).labels[0]
    from ...face_analysis.parsing.landmark_fallback import labels_for_face

    return torch.from_numpy(labels_for_face(face, int(size[0]), int(size[1])))


def box_of(mask: torch.Tensor, margin: float) -> torch.Tensor:
    """A filled rectangle around the mask's pixels, widened by ``margin`` x its size on every side."""
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    out = torch.zeros_like(mask, dtype=torch.float32)
    if len(ys) == 0:
        return out
    y0, y1, x0, x1 = float(ys.min()), float(ys.max()) + 1, float(xs.min()), float(xs.max()) + 1
    dy, dx = (y1 - y0) * margin, (x1 - x0) * margin
    h, w = mask.shape
    out[max(0, int(y0 - dy)):min(h, int(math.ceil(y1 + dy))), max(0, int(x0 - dx)):min(w, int(math.ceil(x1 + dx)))] = 1
    return out


def crop_region_masks(face, info: CropInfo, regions, crop: torch.Tensor | None = None, parser=None,
                      shape: str = "box") -> dict[str, torch.Tensor]:
    """Masks ``[h,w]`` of the named regions of ``face`` (original-image coordinates) in the working crop.

    Regions come from face parsing (the FACE_PARSER on the crop, or the landmark drawing); ``shape="box"``
    turns each into a rectangle around it (what the paper's Grounding-DINO boxes give), ``"region"``
    keeps the parsed shape. A region the parser leaves empty falls back to keypoint geometry.
    """
    if shape not in MASK_SHAPES:
        raise InvalidInputError(f"mask shape must be one of {MASK_SHAPES}, got {shape!r}.")
    local = face_in_crop(face, info)
    try:
        labels = parse_labels(local, info.work_size, crop, parser)
    except Exception as exc:  # a parser failure must not stop inpainting: the geometry still works
        logger.warning("FaceA-Net: face parsing failed (%s); using keypoint geometry for the masks", exc)
        labels = None
    from ...face_analysis.parsing.regions import region_mask

    out: dict[str, torch.Tensor] = {}
    for region in regions:
        seg = region_mask(labels, PARSE_REGION[region]) if labels is not None else None
        if seg is None or seg.sum() < 1:
            seg = (keypoint_region_masks(local.bbox, local.kps, info.work_size, [region])[region] > 0.5).float()
        out[region] = box_of(seg, BOX_MARGIN[region]) if shape == "box" else seg.float()
    return out


def grow_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate (positive) or erode (negative) a mask ``[h,w]`` by ``pixels`` (square structuring element)."""
    if pixels == 0:
        return mask.clone()
    k = 2 * abs(int(pixels)) + 1
    x = mask[None, None].float()
    if pixels > 0:
        return F.max_pool2d(x, k, stride=1, padding=k // 2)[0, 0]
    return -F.max_pool2d(-x, k, stride=1, padding=k // 2)[0, 0]


def feather_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Soften the mask edge with a Gaussian of finite support ``pixels`` (values stay in 0..1; pixels
    farther than ``pixels`` from the mask stay exactly 0)."""
    if pixels <= 0:
        return mask.clone()
    radius = int(pixels)
    sigma = max(radius / 2.5, 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = mask[None, None].float()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x[0, 0].clamp(0.0, 1.0)


def clear_border(mask: torch.Tensor, margin: int) -> torch.Tensor:
    """Zero a band of ``margin`` pixels along the border."""
    if margin <= 0:
        return mask
    out = mask.clone()
    out[:margin], out[-margin:], out[:, :margin], out[:, -margin:] = 0, 0, 0, 0
    return out


@dataclass
class InpaintMasks:
    """Two masks in working-crop pixels: what the sampler redraws and how the result is blended back."""

    sample: torch.Tensor   # [h,w] hard-ish mask handed to the sampler (covers the whole blend band)
    blend: torch.Tensor    # [h,w] feathered, zero along the crop border


def build_masks(region_mask: torch.Tensor, grow: int = 8, feather: int = 12) -> InpaintMasks:
    """From a region mask in working pixels: grow it, feather it for blending, and make the sampler's
    mask cover the feather band (so blended pixels are all freshly drawn or all original)."""
    h, w = region_mask.shape
    margin = feather + 2
    if min(h, w) <= 2 * margin + 2:
        raise InvalidInputError(f"The crop ({w}x{h}) is too small for a feather of {feather} px; "
                                "raise the working size or lower the feather.")
    grown = clear_border(grow_mask((region_mask > 0.5).float(), grow), margin)
    blend = feather_mask(grown, feather)
    sample = grow_mask(grown, feather)
    return InpaintMasks(sample=(sample > 0.5).float(), blend=blend)


def paste_back(image: torch.Tensor, generated: torch.Tensor, blend: torch.Tensor, info: CropInfo
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend the working crop ``generated`` [h,w,C] into ``image`` [H,W,C] with ``blend`` [h,w].

    Returns (image, full-resolution blend mask [H,W]). Pixels where that mask is 0 are unchanged.
    """
    x0, y0, x1, y1 = info.box
    size = info.box_size
    region = _resize_chw(generated.permute(2, 0, 1).unsqueeze(0).float(), size)[0].permute(1, 2, 0)
    weight = _resize_chw(blend[None, None].float(), size)[0, 0]
    weight = torch.where(weight < 1e-4, torch.zeros_like(weight), weight)  # resampling dust stays outside
    out = image.clone()
    original = image[y0:y1, x0:x1].float()
    channels = min(original.shape[-1], region.shape[-1])
    w3 = weight.unsqueeze(-1)
    mixed = original[..., :channels] * (1 - w3) + region[..., :channels].to(original) * w3
    out[y0:y1, x0:x1, :channels] = torch.where(w3 > 0, mixed, original[..., :channels]).to(out.dtype)
    full = torch.zeros(image.shape[:2], dtype=torch.float32)
    full[y0:y1, x0:x1] = weight
    return out, full


def masked_pixels(crop: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainting model's masked image: pixels under the (rounded) mask set to 0.5 grey, as ComfyUI's
    InpaintModelConditioning / VAEEncodeForInpaint prepare it. ``crop`` [...,h,w,C], ``mask`` [...,h,w]."""
    keep = (1.0 - mask.round()).unsqueeze(-1)
    return (crop - 0.5) * keep + 0.5


def region_mask_for(regions: dict[str, torch.Tensor], names) -> torch.Tensor:
    """Union of the named region masks."""
    names = list(names)
    if not names:
        raise InvalidInputError("No mask region chosen.")
    out = None
    for name in names:
        if name not in regions:
            raise InvalidInputError(f"Region '{name}' is not available; have {', '.join(regions)}.")
        out = regions[name].clone() if out is None else torch.maximum(out, regions[name])
    return out


def parse_regions(spec: str) -> list[str]:
    """'face' / 'eyes, nose, mouth' / 'left_eye,mouth' -> canonical region names."""
    names: list[str] = []
    for raw in spec.replace(";", ",").split(","):
        token = raw.strip().lower().replace(" ", "_")
        if not token:
            continue
        expanded = {"eyes": ["left_eye", "right_eye"], "attributes": list(ATTRIBUTES)}.get(token, [token])
        for name in expanded:
            if name not in MASK_REGIONS:
                raise InvalidInputError(f"Unknown mask region '{raw.strip()}'; use face, eyes, left_eye, right_eye, "
                                        "nose, mouth or attributes.")
            if name not in names:
                names.append(name)
    if not names:
        raise InvalidInputError("The mask regions are empty; use e.g. 'face' or 'eyes, mouth'.")
    return names


# ---------------------------------------------------------------------------------------- sampling

def sample_inpaint(model, vae, positive, negative, crop: torch.Tensor, mask: torch.Tensor, seed: int, steps: int,
                   cfg: float, sampler_name: str, scheduler: str, denoise: float = 1.0) -> torch.Tensor:
    """Inpaint one working crop ``[1,h,w,3]`` inside ``mask`` ``[1,h,w]`` with ComfyUI's sampler.

    Inputs are prepared as ComfyUI's InpaintModelConditioning does: a 9-channel inpainting model gets
    the mask and the masked image's latent as ``concat_mask`` / ``concat_latent_image``; every model
    also gets the mask as the latent's noise mask (a normal 4-channel model then inpaints by blending). An
    SDXL-style model also gets the crop's size as its size conds, as the identity trainer's ``y`` has them.
    """
    from ...host.adm import size_conds
    from ...host.sampling import sample_latent

    concat_latent = vae.encode(masked_pixels(crop, mask)[..., :3])
    latent = vae.encode(crop[..., :3])
    mask_bchw = mask.reshape(-1, 1, *mask.shape[-2:])
    samples = sample_latent(model, positive, negative, latent, seed=seed, steps=steps, cfg=cfg,
                            sampler_name=sampler_name, scheduler=scheduler, denoise=denoise, noise_mask=mask_bchw,
                            cond_values={"concat_latent_image": concat_latent, "concat_mask": mask_bchw,
                                         **size_conds(getattr(model, "model", model), *crop.shape[-3:-1])})
    return vae.decode(samples)[..., :3].clamp(0.0, 1.0)
