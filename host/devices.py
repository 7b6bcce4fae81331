"""Which torch device small helper models (face parser, encoders) run on, through ComfyUI when present."""
from __future__ import annotations

import torch

from . import comfy_available


def torch_device(preference: str = "auto") -> torch.device:
    """``"auto"``: ComfyUI's compute device (or CUDA/MPS/CPU outside ComfyUI); else the named device."""
    if preference and preference != "auto":
        return torch.device(preference)
    if comfy_available():
        import comfy.model_management
        return comfy.model_management.get_torch_device()
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def half_precision_dtype(device: torch.device) -> torch.dtype:
    """float16 where half precision is usable on ``device`` (ComfyUI decides when present), else float32."""
    if device.type == "cpu":
        return torch.float32
    if comfy_available():
        import comfy.model_management
        return torch.float16 if comfy.model_management.should_use_fp16(device) else torch.float32
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def offload_device() -> torch.device:
    """Where models wait between runs: ComfyUI's offload device (the CPU unless --gpu-only), else the CPU."""
    if comfy_available():
        import comfy.model_management
        return comfy.model_management.unet_offload_device()
    return torch.device("cpu")
