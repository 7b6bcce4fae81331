"""The extra conditioning vector ``y`` a trainer's direct ``apply_model`` call needs (SDXL and kin).

ComfyUI's sampler builds ``y`` per conditioning with the model's own ``encode_adm`` (``model_base.SDXL``:
the pooled text embedding followed by Fourier embeddings of the original size, the crop offsets and the
target size). A trainer that calls ``apply_model`` itself must pass the same ``y``, built the same way, or
an SDXL UNet fails (or, worse, trains on a different conditioning than it samples with). Models without
such a vector (SD1.5) give None.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidInputError


def needs_pooled(base_model: Any) -> bool:
    """Whether the model's UNet takes a ``y`` vector (``adm_in_channels``): SDXL-style models do."""
    return bool(getattr(base_model, "adm_channels", 0))


def size_conds(base_model: Any, height: int, width: int) -> dict:
    """The conditioning values that make the sampler build the same ``y`` size part as :func:`adm_vector` for a
    ``height`` x ``width`` image (``{}`` for a model without ``y``, so its sampling is unchanged)."""
    if not needs_pooled(base_model):
        return {}
    return {"width": int(width), "height": int(height), "crop_w": 0, "crop_h": 0, "target_width": int(width),
            "target_height": int(height)}


def adm_vector(base_model: Any, pooled: torch.Tensor | None, height: int, width: int,
               device: torch.device | str = "cpu") -> torch.Tensor | None:
    """``y`` ``[B, adm]`` for pooled text embeddings ``[B, P]`` and a square-cropped ``height`` x ``width`` pixel
    image (original size = target size, crop 0: what CLIPTextEncodeSDXL gives for an uncropped image), exactly
    as the sampler builds it; None for a model without ``y``."""
    if not needs_pooled(base_model):
        return None
    if pooled is None:
        raise InvalidInputError("this model (SDXL-style) needs the text encoder's pooled output; connect the CLIP "
                                "of the checkpoint the model came from")
    y = base_model.encode_adm(pooled_output=pooled, width=int(width), height=int(height), crop_w=0, crop_h=0,
                              target_width=int(width), target_height=int(height), device=device)
    return None if y is None else y.to(device)
