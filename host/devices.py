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
