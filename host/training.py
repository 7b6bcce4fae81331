"""Host side of the trainers: load the model the way samplers do and (for the command-line trainer, which
runs outside a graph) load a checkpoint, a VAE or a CLIP vision model by file the way ComfyUI's loader
nodes do. Training folders are resolved by :mod:`host.paths`.

``comfy`` is imported inside the functions; outside ComfyUI the model is used where it is.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ModelFileError
from . import comfy_available


def load_for_training(model_patcher: Any, companions: Sequence[Any] = ()) -> torch.device:
    """Load ``model_patcher`` fully onto its compute device with its weight patches applied (e.g. a LoRA
    upstream), as ComfyUI's own trainer does; returns the device to train on. ``companions`` (e.g. a
    ControlNet's model patchers) are loaded in the same call, so loading one does not evict the other."""
    if comfy_available() and hasattr(model_patcher, "load_device") and hasattr(model_patcher, "patch_model"):
        import comfy.model_management

        comfy.model_management.load_models_gpu([model_patcher, *companions], memory_required=1e20,
                                               force_full_load=True)
        return torch.device(model_patcher.load_device)
    model = getattr(model_patcher, "model", model_patcher)
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _existing(path: str, kind: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ModelFileError(f"{kind} file '{path}' does not exist")
    return path


def load_checkpoint_file(path: str) -> tuple[Any, Any, Any]:
    """(MODEL, CLIP, VAE) of a single-file checkpoint, as CheckpointLoaderSimple loads it."""
    import comfy.sd
    import folder_paths

    path = _existing(path, "checkpoint")
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
    if model is None or clip is None or vae is None:
        raise ModelFileError(f"'{path}' is not a full checkpoint (diffusion model, text encoder and VAE)")
    return model, clip, vae


def load_diffusion_model_file(path: str) -> Any:
    """A diffusion model file (e.g. FLUX.1's transformer), as Load Diffusion Model (UNETLoader) loads it."""
    import comfy.sd

    path = _existing(path, "diffusion model")
    model = comfy.sd.load_diffusion_model(path)
    if model is None:
        raise ModelFileError(f"'{path}' is not a diffusion model ComfyUI recognises")
    return model


def load_text_encoder_files(paths: Sequence[str], clip_type: str = "flux") -> Any:
    """Text encoder files as one CLIP, as DualCLIPLoader loads them (``clip_type``: its ``type``, e.g. flux)."""
    import comfy.sd
    import folder_paths

    kind = getattr(comfy.sd.CLIPType, clip_type.upper(), None)
    if kind is None:
        raise ModelFileError(f"unknown text encoder type '{clip_type}' (DualCLIPLoader's types: flux, sdxl, ...)")
    files = [_existing(path, "text encoder") for path in paths]
    return comfy.sd.load_clip(ckpt_paths=files, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                              clip_type=kind)


def load_vae_file(path: str) -> Any:
    """A VAE file, as VAELoader loads it."""
    import comfy.sd
    import comfy.utils

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(_existing(path, "VAE")))
    vae.throw_exception_if_invalid()
    return vae


def load_clip_vision_file(path: str) -> Any:
    """A CLIP vision model file, as CLIPVisionLoader loads it."""
    import comfy.clip_vision

    model = comfy.clip_vision.load(_existing(path, "CLIP vision"))
    if model is None:
        raise ModelFileError(f"'{path}' is not a CLIP vision model ComfyUI recognises")
    return model
