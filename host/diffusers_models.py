"""Host side of diffusers-folder bases (M3Face's AltDiffusion): UNet and VAE weights become ComfyUI models.

The UNet's diffusers keys are renamed with ComfyUI's own map (``comfy.utils.unet_to_diffusers``, the one
``comfy.sd.load_diffusion_model_state_dict`` uses) and loaded into ComfyUI's ``UNetModel`` inside a ``BaseModel`` of
SD1.x sampling settings (scaled-linear betas 0.00085-0.012 over 1000 steps, SD latent scale), which AltDiffusion's
scheduler config shares; the dtype and devices are picked the way that function picks them. The VAE goes through
``comfy.sd.VAE``, which converts diffusers VAE keys itself. ``comfy`` is imported inside the functions.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointLayoutError
from .controlnet import unet_diffusers_key_map


def _model_type(prediction: str) -> Any:
    import comfy.model_base

    types = {"epsilon": comfy.model_base.ModelType.EPS, "v_prediction": comfy.model_base.ModelType.V_PREDICTION}
    if prediction not in types:
        raise CheckpointLayoutError(f"prediction type {prediction!r} is not one of {sorted(types)}")
    return types[prediction]


def comfy_unet_state_dict(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any],
                          what: str) -> dict[str, torch.Tensor]:
    """``state_dict`` (diffusers UNet keys) under ComfyUI's key names; every key must be mapped."""
    key_map = unet_diffusers_key_map(unet_config)
    leftover = sorted(k for k in state_dict if k not in key_map)
    if leftover:
        raise CheckpointLayoutError(f"{what}: {len(leftover)} keys do not fit the UNet its config.json describes, "
                                    f"e.g. {leftover[:3]}")
    return {key_map[k]: v for k, v in state_dict.items()}


def build_unet(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any], prediction: str,
               what: str) -> Any:
    """A ``ModelPatcher`` of ComfyUI's UNet for a diffusers UNet state dict and its (ComfyUI) ``unet_config``."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    converted = comfy_unet_state_dict(state_dict, unet_config, what)
    model_config = comfy.supported_models.SD15(dict(unet_config))
    model_config.unet_config = dict(unet_config)  # SD15 forces 8 heads; the folder's config says how many
    load_device = mm.get_torch_device()
    unet_dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(converted),
                               supported_dtypes=list(model_config.supported_inference_dtypes),
                               weight_dtype=comfy.utils.weight_dtype(converted))
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    model = comfy.model_base.BaseModel(model_config, model_type=_model_type(prediction),
                                       device=mm.unet_offload_device())
    missing, unexpected = model.diffusion_model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise CheckpointLayoutError(f"{what} does not fit ComfyUI's UNet: missing {sorted(missing)[:3]}, "
                                    f"unexpected {sorted(unexpected)[:3]}")
    model = model.to(mm.unet_offload_device()).eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def build_vae(state_dict: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> Any:
    """A ``comfy.sd.VAE`` from a diffusers AutoencoderKL state dict and ComfyUI ``AutoencoderKL`` params."""
    import comfy.sd

    vae = comfy.sd.VAE(sd=dict(state_dict), config={"params": dict(params)})
    vae.throw_exception_if_invalid()
    return vae


def text_encoder_placement() -> tuple[torch.device, torch.device, torch.dtype]:
    """(load device, offload device, dtype) ComfyUI uses for text encoders; float32 where the load device is the
    CPU (ComfyUI's fp16 default there is slow and imprecise)."""
    import comfy.model_management as mm

    device = mm.text_encoder_device()
    dtype = torch.float32 if torch.device(device).type == "cpu" else mm.text_encoder_dtype(device)
    return torch.device(device), torch.device(mm.text_encoder_offload_device()), dtype


def managed_module(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device) -> Any:
    """A ``ModelPatcher`` around a plain module, so ComfyUI loads it to the GPU and offloads it like a CLIP."""
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)


def load_managed(patcher: Any) -> torch.device:
    """Load ``patcher``'s module onto its device (ComfyUI frees memory first); returns that device."""
    import comfy.model_management as mm

    mm.load_model_gpu(patcher)
    return torch.device(patcher.load_device)


def model_head_layout(model_patcher: Any) -> dict[str, int] | None:
    """``{"num_heads", "num_head_channels"}`` of a ComfyUI MODEL's UNet config, or None when it has none."""
    model_config = getattr(getattr(model_patcher, "model", None), "model_config", None)
    unet_config = getattr(model_config, "unet_config", None)
    if not unet_config:
        return None
    return {"num_heads": int(unet_config.get("num_heads", -1)),
            "num_head_channels": int(unet_config.get("num_head_channels", -1))}
