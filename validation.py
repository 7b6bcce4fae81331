"""The one check of IMAGE and MASK inputs: shape, finiteness and value range, refused with a message naming the input.

Every node that takes an IMAGE or a MASK calls :func:`check_images` / :func:`check_masks` before any work, and the
core conversions (``face_analysis.images``, the face parser, training data) use the same functions, so a bad
input is refused the same way wherever it enters.

The policy is refusal, never repair: a NaN or infinite pixel (typically an fp16 VAE decode that overflowed)
raises :class:`~.errors.InvalidInputError` naming the input and the image index, e.g. ``'reference' image 2 has
37 NaN/infinite pixels ...``. Replacing such pixels silently made results all-NaN in one technique and quietly
different in another. Values far outside 0..1 (0..255 or -1..1 data) are refused too; values just outside the
range (a sharpening overshoot) are within :data:`RANGE_SLACK` and left to the techniques, which clip as before.

Checked tensors are returned unchanged (same object), so a valid input gives exactly the result it gave before.
"""
from __future__ import annotations

from typing import Any

import torch

from .errors import InvalidInputError

# Accepted value range of IMAGE and MASK pixels: 0..1 with this much slack on each side.
RANGE_SLACK = 0.5
IMAGE_CHANNELS = (1, 2, 3, 4)


def check_image(image: Any, name: str = "image", pixels: bool = True) -> torch.Tensor:
    """``image`` if it is a usable IMAGE ``[B,H,W,C]`` (or one image ``[H,W,C]``), else InvalidInputError.

    ``pixels=False`` checks the shape only (for inputs whose size is all that is used, e.g. a canvas size)."""
    if not isinstance(image, torch.Tensor):
        raise InvalidInputError(f"'{name}' must be an IMAGE tensor [batch, height, width, channels]; "
                                f"got {type(image).__name__}.")
    if image.dim() not in (3, 4):
        raise InvalidInputError(f"'{name}' must be an IMAGE [batch, height, width, channels]; "
                                f"got shape {list(image.shape)}.")
    if image.numel() == 0:
        raise InvalidInputError(f"'{name}' is empty (shape {list(image.shape)}).")
    channels = image.shape[-1]
    if channels not in IMAGE_CHANNELS:
        raise InvalidInputError(
            f"'{name}' has {channels} channels (shape {list(image.shape)}); expected RGB [B,H,W,3] (grayscale "
            f"[B,H,W,1] and RGBA [B,H,W,4] are accepted too). Is a MASK or a LATENT connected where an IMAGE belongs?")
    if pixels:
        check_values(image if image.dim() == 4 else image.unsqueeze(0), name, "image")
    return image


def check_mask(mask: Any, name: str = "mask") -> torch.Tensor:
    """``mask`` if it is a usable MASK ``[B,H,W]``, ``[H,W]`` or ``[B,1,H,W]``, else InvalidInputError."""
    if not isinstance(mask, torch.Tensor):
        raise InvalidInputError(f"'{name}' must be a MASK tensor [batch, height, width]; got {type(mask).__name__}.")
    shape = list(mask.shape)
    if mask.dim() == 4 and shape[1] == 1:
        batch = mask[:, 0]
    elif mask.dim() in (2, 3):
        batch = mask if mask.dim() == 3 else mask.unsqueeze(0)
    else:
        raise InvalidInputError(f"'{name}' must be a MASK [batch, height, width] or [height, width]; got shape "
                                f"{shape}. Is an IMAGE connected where a MASK belongs?")
    if mask.numel() == 0:
        raise InvalidInputError(f"'{name}' is empty (shape {shape}).")
    check_values(batch, name, "mask")
    return mask


def check_images(**images: Any) -> None:
    """:func:`check_image` every given input by its node input name; None (an unconnected optional) is skipped."""
    for name, image in images.items():
        if image is not None:
            check_image(image, name)


def check_masks(**masks: Any) -> None:
    """:func:`check_mask` every given input by its node input name; None (an unconnected optional) is skipped."""
    for name, mask in masks.items():
        if mask is not None:
            check_mask(mask, name)


def check_values(batch: torch.Tensor, name: str, kind: str = "image") -> None:
    """Refuse NaN/infinite values and values far outside 0..1 in ``batch`` (first axis = the images)."""
    if not batch.is_floating_point():
        if batch.dtype == torch.bool:
            return
        raise InvalidInputError(f"'{name}' holds {batch.dtype} values; an {kind.upper()} holds floats in 0..1.")
    low, high = (float(v) for v in torch.aminmax(batch.detach()))   # NaN or inf here means a bad value somewhere
    if not (low == low and high == high) or abs(low) == float("inf") or abs(high) == float("inf"):
        raise InvalidInputError(_non_finite_message(batch, name, kind))
    if low < -RANGE_SLACK or high > 1.0 + RANGE_SLACK:
        raise InvalidInputError(_out_of_range_message(batch, name, kind))


def _non_finite_message(batch: torch.Tensor, name: str, kind: str) -> str:
    bad = ~torch.isfinite(batch.detach().reshape(batch.shape[0], -1))
    counts = bad.sum(dim=1).tolist()
    listing = ", ".join(f"{kind} {i}: {n} values" for i, n in enumerate(counts) if n)
    first = next(i for i, n in enumerate(counts) if n)
    return (f"'{name}' {kind} {first} has NaN/infinite pixels ({listing}; batch of {len(counts)}). This usually comes "
            f"from an fp16 VAE decode that overflowed or a broken file: fix or replace the {kind} (e.g. decode with "
            f"an fp32 VAE) before this node.")


def _out_of_range_message(batch: torch.Tensor, name: str, kind: str) -> str:
    flat = batch.detach().reshape(batch.shape[0], -1)
    outside = ((flat < -RANGE_SLACK) | (flat > 1.0 + RANGE_SLACK)).any(dim=1)
    index = int(outside.nonzero()[0, 0])
    low, high = (float(v) for v in torch.aminmax(flat[index]))
    hint = "0..255 data" if high > 1.0 + RANGE_SLACK else "-1..1 data"
    return (f"'{name}' {kind} {index} has values from {low:.3g} to {high:.3g}, but {kind}s hold 0..1 (this looks "
            f"like {hint}). Rescale it to 0..1 or connect a normal {kind.upper()}.")
