"""Host side of the in-graph trainers: load the model the way samplers do.

``comfy`` is imported inside the function; outside ComfyUI the model is used where it is. Training folders
are resolved by :mod:`host.paths`.
"""
from __future__ import annotations

from typing import Any

import torch

from . import comfy_available


def load_for_training(model_patcher: Any) -> torch.device:
    """Load ``model_patcher`` fully onto its compute device with its weight patches applied (e.g. a LoRA
    upstream), as ComfyUI's own trainer does; returns the device to train on."""
    if comfy_available() and hasattr(model_patcher, "load_device") and hasattr(model_patcher, "patch_model"):
        import comfy.model_management

        comfy.model_management.load_models_gpu([model_patcher], memory_required=1e20, force_full_load=True)
        return torch.device(model_patcher.load_device)
    model = getattr(model_patcher, "model", model_patcher)
    for param in model.parameters():
        return param.device
    return torch.device("cpu")
