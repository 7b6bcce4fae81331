"""Host side of the in-graph trainers: load the model the way samplers do, and resolve input paths.

``comfy`` / ``folder_paths`` are imported inside the functions; outside ComfyUI both degrade to plain
behaviour (the model is used where it is, paths are taken as given).
"""
from __future__ import annotations

import os
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


def input_path(path: str) -> str:
    """``path`` as given when absolute; else relative to ComfyUI's input folder (or the working folder)."""
    path = os.path.expanduser(path.strip())
    if os.path.isabs(path):
        return path
    if comfy_available():
        import folder_paths

        candidate = os.path.join(folder_paths.get_input_directory(), path)
        if os.path.exists(candidate) or not os.path.exists(path):
            return candidate
    return os.path.abspath(path)
