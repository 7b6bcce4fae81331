"""IMAGE tensors <-> uint8 RGB numpy arrays, with the input checks every face node needs.

ComfyUI's IMAGE is a float tensor ``[B,H,W,C]`` in 0..1. Detectors want ``uint8 [H,W,3]`` RGB. The
conversion accepts what users actually wire in and says what it did (documented fallbacks, each
recorded as a note that the nodes show):

- grayscale ``[B,H,W,1]``: replicated to three channels;
- gray + alpha ``[B,H,W,2]`` and RGBA ``[B,H,W,4]``: the alpha channel is dropped (ComfyUI's Load
  Image already gives alpha as a separate MASK);
- a single image ``[H,W,C]``: treated as a batch of one;
- values just outside 0..1: clipped.

Anything else raises :class:`~..errors.InvalidInputError` through the pack's one input check
(:mod:`..validation`): other channel counts, other ranks, empty tensors, non-tensors, NaN / infinite pixels
(typically an fp16 VAE decode that overflowed; refused, never repaired) and values far outside 0..1.
Size limits are not enforced here: :func:`size_problem` tells the analysis code whether an image is
too small for face detection, and large images are downscaled by the detectors themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidInputError
from ..validation import check_image, check_values

MIN_DETECT_SIDE = 32      # below this no detector here can find a face (SCRFD's finest stride is 8, dlib HOG needs ~80)


@dataclass
class ConvertedBatch:
    """uint8 RGB images of a batch, plus what the conversion had to fix."""

    images: list[np.ndarray]
    notes: list[str] = field(default_factory=list)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [(int(a.shape[0]), int(a.shape[1])) for a in self.images]


def check_image_tensor(image, name: str = "image", pixels: bool = True) -> torch.Tensor:
    """Validate an IMAGE (:func:`..validation.check_image`) and return it as a float tensor ``[B,H,W,C]`` (C in
    1..4); ``pixels=False`` checks the shape only."""
    image = check_image(image, name, pixels=False)
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    elif not image.is_floating_point():
        image = image.float()
    if pixels:
        check_values(image, name)
    return image


def to_uint8_rgb(image, name: str = "image") -> ConvertedBatch:
    """IMAGE ``[B,H,W,C]`` float 0..1 -> list of uint8 ``[H,W,3]`` RGB arrays (see the module doc for fallbacks)."""
    image = check_image_tensor(image, name)
    notes: list[str] = []
    channels = image.shape[-1]
    if channels == 1:
        notes.append(f"'{name}' is grayscale: its channel was replicated to RGB.")
        image = image.expand(-1, -1, -1, 3)
    elif channels == 2:
        notes.append(f"'{name}' is gray + alpha: alpha was dropped and gray replicated to RGB.")
        image = image[..., :1].expand(-1, -1, -1, 3)
    elif channels == 4:
        notes.append(f"'{name}' is RGBA: the alpha channel was ignored.")
        image = image[..., :3]
    images = []
    for index in range(image.shape[0]):
        # numpy, single pass where possible: torch's threaded elementwise ops contend with ONNX Runtime's
        # threads and were the slowest step of a whole analysis on 2 cores.
        one = image[index].detach().to("cpu", torch.float32).numpy()
        scaled = one * np.float32(255.0)
        scaled += np.float32(0.5)
        np.clip(scaled, 0.0, 255.0, out=scaled)
        images.append(np.ascontiguousarray(scaled.astype(np.uint8)))
    return ConvertedBatch(images, notes)


def to_rgb_float(image, name: str = "image") -> tuple[torch.Tensor, list[str]]:
    """IMAGE -> float ``[B,H,W,3]`` in 0..1 with the same checks and channel fallbacks as :func:`to_uint8_rgb`."""
    image = check_image_tensor(image, name).detach().to("cpu", torch.float32)
    notes: list[str] = []
    channels = image.shape[-1]
    if channels in (1, 2):
        notes.append(f"'{name}' is grayscale: replicated to RGB.")
        image = image[..., :1].expand(-1, -1, -1, 3)
    elif channels == 4:
        notes.append(f"'{name}' is RGBA: the alpha channel was ignored.")
        image = image[..., :3]
    return image.clamp(0.0, 1.0).contiguous(), notes


def to_image_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 ``[H,W,3]`` arrays of one size -> IMAGE ``[B,H,W,3]`` float 0..1."""
    if not arrays:
        raise InvalidInputError("no image to convert")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise InvalidInputError(f"images of different sizes cannot form one IMAGE batch: {sorted(shapes)}")
    stacked = np.stack([a[..., :3] for a in arrays]).astype(np.float32) / 255.0
    return torch.from_numpy(stacked)


def size_problem(height: int, width: int) -> str | None:
    """Why an image of this size cannot be searched for faces, or None when it can."""
    if min(height, width) < MIN_DETECT_SIDE:
        return (f"is {width}x{height} pixels, smaller than the {MIN_DETECT_SIDE} px minimum for face detection "
                f"(upscale it first, or pass a larger crop)")
    return None
