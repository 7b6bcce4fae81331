"""Face-parsing labels, named regions, mask shaping (grow / feather) and the colour parse map.

Label space: the 19 classes of zllrunning's BiSeNet trained on CelebAMask-HQ, in its order. In the
label maps this pack produces, the paired classes (brows, eyes, ears) are assigned by the side of the
face they lie on: ``l_*`` is the one on the image's left, ``r_*`` the one on the image's right (the
same convention as :mod:`..types` keypoints), whatever the network called them.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import InvalidInputError

LABELS = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eyeglasses", "l_ear", "r_ear",
          "earring", "nose", "mouth", "u_lip", "l_lip", "neck", "necklace", "cloth", "hair", "hat")
LABEL = {name: index for index, name in enumerate(LABELS)}

# Pairs whose side is re-assigned geometrically: (image-left label, image-right label).
SIDED_PAIRS = ((LABEL["l_brow"], LABEL["r_brow"]), (LABEL["l_eye"], LABEL["r_eye"]), (LABEL["l_ear"], LABEL["r_ear"]))

_FACE = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "eyeglasses", "nose", "mouth", "u_lip", "l_lip")
_REGION_LABELS: dict[str, tuple[str, ...]] = {
    "whole_face": _FACE,
    "skin": ("skin",),
    "brows": ("l_brow", "r_brow"),
    "left_brow": ("l_brow",),
    "right_brow": ("r_brow",),
    "eyes": ("l_eye", "r_eye"),
    "left_eye": ("l_eye",),
    "right_eye": ("r_eye",),
    "eyeglasses": ("eyeglasses",),
    "nose": ("nose",),
    "mouth_and_lips": ("mouth", "u_lip", "l_lip"),
    "lips": ("u_lip", "l_lip"),
    "inner_mouth": ("mouth",),
    "ears": ("l_ear", "r_ear"),
    "left_ear": ("l_ear",),
    "right_ear": ("r_ear",),
    "earrings": ("earring",),
    "hair": ("hair",),
    "hat": ("hat",),
    "neck": ("neck",),
    "necklace": ("necklace",),
    "cloth": ("cloth",),
    "head": _FACE + ("l_ear", "r_ear", "earring", "hair", "hat"),
    "background": ("background",),
}
REGIONS: dict[str, tuple[int, ...]] = {name: tuple(LABEL[n] for n in names) for name, names in _REGION_LABELS.items()}
REGION_NAMES = tuple(REGIONS)

# CelebAMask-HQ's colour for each part name (the dataset's 19-colour map, listed in its own label
# order: background, skin, nose, eye_g, l_eye, r_eye, l_brow, r_brow, l_ear, r_ear, mouth, u_lip,
# l_lip, hair, hat, ear_r, neck_l, neck, cloth), re-indexed here to the BiSeNet label order.
_CELEBAMASK_COLOURS = {
    "background": (0, 0, 0), "skin": (204, 0, 0), "nose": (76, 153, 0), "eyeglasses": (204, 204, 0),
    "l_eye": (51, 51, 255), "r_eye": (204, 0, 204), "l_brow": (0, 255, 255), "r_brow": (51, 255, 255),
    "l_ear": (102, 51, 0), "r_ear": (255, 0, 0), "mouth": (102, 204, 0), "u_lip": (255, 255, 0),
    "l_lip": (0, 0, 153), "hair": (0, 0, 204), "hat": (255, 51, 153), "earring": (0, 204, 204),
    "necklace": (0, 51, 0), "neck": (255, 153, 51), "cloth": (0, 204, 0),
}
PALETTE = np.array([_CELEBAMASK_COLOURS[name] for name in LABELS], dtype=np.uint8)  # [19, 3]


def parse_region_names(primary: str, extra: str = "") -> list[str]:
    """Region names from a combo choice plus a comma-separated list; unknown names raise a clear error."""
    names = [n.strip().lower().replace(" ", "_").replace("-", "_") for n in [primary, *extra.split(",")]]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in REGIONS]
    if unknown:
        raise InvalidInputError(f"Unknown face region '{unknown[0]}'. Known regions: {', '.join(REGION_NAMES)}.")
    return list(dict.fromkeys(names))


def region_mask(labels: torch.Tensor, regions: str | list[str]) -> torch.Tensor:
    """Float mask ``[..., H, W]`` (0/1) of the pixels whose label belongs to any of ``regions``."""
    names = [regions] if isinstance(regions, str) else list(regions)
    wanted = sorted({label for name in names for label in REGIONS[name]})
    lookup = torch.zeros(len(LABELS), dtype=torch.bool, device=labels.device)
    lookup[wanted] = True
    return lookup[labels.long()].float()


def _shift_max(x: torch.Tensor) -> torch.Tensor:
    """Max over the 4-neighbourhood (a 3x3 cross), edges replicated."""
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    centre = padded[:, :, 1:-1, 1:-1]
    return torch.maximum(torch.maximum(torch.maximum(centre, padded[:, :, :-2, 1:-1]), padded[:, :, 2:, 1:-1]),
                         torch.maximum(padded[:, :, 1:-1, :-2], padded[:, :, 1:-1, 2:]))


def grow_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate (``pixels`` > 0) or erode (< 0) a ``[B,H,W]`` mask by about ``|pixels|`` pixels.

    Alternating 3x3 square and cross steps approximate a disc (an octagon) and stay cheap for large
    radii (one max-pool per pixel of growth).
    """
    if pixels == 0:
        return mask
    x = mask.unsqueeze(1)
    sign = 1.0 if pixels > 0 else -1.0
    x = x * sign
    for step in range(abs(int(pixels))):
        if step % 2 == 0:
            x = F.max_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        else:
            x = _shift_max(x)
    return (x * sign).squeeze(1)


def feather_mask(mask: torch.Tensor, pixels: float) -> torch.Tensor:
    """Gaussian-soften a ``[B,H,W]`` mask: the edge ramps over about ``pixels`` pixels on each side."""
    if pixels <= 0:
        return mask
    sigma = max(float(pixels) / 3.0, 1e-3)
    radius = max(1, int(math.ceil(3.0 * sigma)))
    coords = torch.arange(-radius, radius + 1, dtype=torch.float32, device=mask.device)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(mask.dtype)
    x = mask.unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1).clamp(0.0, 1.0)


def shape_mask(mask: torch.Tensor, grow: int = 0, feather: float = 0.0) -> torch.Tensor:
    """Grow (or shrink) then feather, in that order, clamped to 0..1."""
    return feather_mask(grow_mask(mask, grow), feather).clamp(0.0, 1.0)


def colour_parse_map(labels: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[B,H,W,3]`` float 0..1: each label painted in its CelebAMask-HQ colour."""
    palette = torch.from_numpy(PALETTE).to(labels.device).float() / 255.0
    return palette[labels.long().clamp(0, len(LABELS) - 1)]


def coerce_mask(mask: torch.Tensor, batch: int, height: int, width: int, what: str = "mask") -> torch.Tensor:
    """A MASK input as ``[batch,H,W]``: accepts ``[H,W]``, ``[1,H,W]`` (broadcast) or ``[batch,H,W]``.

    Any other shape raises :class:`InvalidInputError` naming both shapes.
    """
    if not isinstance(mask, torch.Tensor):
        raise InvalidInputError(f"{what} must be a MASK tensor, got {type(mask).__name__}.")
    m = mask
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim == 2:
        m = m.unsqueeze(0)
    if m.ndim != 3 or tuple(m.shape[1:]) != (height, width) or m.shape[0] not in (1, batch):
        raise InvalidInputError(
            f"{what} has shape {list(mask.shape)} but the image batch is {batch}x{height}x{width}; "
            f"give a MASK of shape [{batch}, {height}, {width}] or [1, {height}, {width}] (resize it first).")
    if m.shape[0] == 1 and batch > 1:
        m = m.expand(batch, height, width)
    return m.float()
