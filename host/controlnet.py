"""Host side of ControlNets: ComfyUI's config detection, key names and ControlNet construction.

A technique that ships a diffusers ControlNet (Face-MakeUp's pose net) converts its keys with ComfyUI's own
UNet key map and gets back the same ``comfy.controlnet.ControlNet`` object a ControlNetLoader would make
(dtype, device and cast operations picked by ComfyUI's model management), so attaching it to conditioning,
offloading and patching work as for any stock ControlNet. ``comfy`` is imported inside the functions.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointLayoutError


def diffusers_unet_config(state_dict: Mapping[str, torch.Tensor]) -> dict | None:
    """ComfyUI's UNet config for a diffusers (Control)Net state dict, or None when no detection table knows it."""
    import comfy.model_detection

    config = comfy.model_detection.unet_config_from_diffusers_unet(dict(state_dict))
    return dict(config) if config is not None else None


def unet_diffusers_key_map(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """``{diffusers key: ComfyUI key}`` of every UNet weight for this config (ComfyUI's ``unet_to_diffusers``)."""
    import comfy.utils

    return dict(comfy.utils.unet_to_diffusers(dict(unet_config)))


def build_controlnet(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any], what: str) -> Any:
    """A ``comfy.controlnet.ControlNet`` holding ``state_dict`` (ComfyUI key names) built from ``unet_config``.

    Dtype, devices and cast operations are chosen the way ``comfy.controlnet.load_controlnet_state_dict`` does.
    Every key must land on a parameter: a missing or unexpected key raises CheckpointLayoutError naming ``what``.
    """
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops
    import comfy.utils

    weight_dtype = comfy.utils.weight_dtype(dict(state_dict))
    unet_dtype = comfy.model_management.unet_dtype(model_params=-1, weight_dtype=weight_dtype)
    load_device = comfy.model_management.get_torch_device()
    manual_cast_dtype = comfy.model_management.unet_manual_cast(unet_dtype, load_device)
    config = dict(unet_config)
    config.update(operations=comfy.ops.pick_operations(unet_dtype, manual_cast_dtype), dtype=unet_dtype,
                  device=comfy.model_management.unet_offload_device(),
                  hint_channels=state_dict["input_hint_block.0.weight"].shape[1])
    config.pop("out_channels", None)
    control_model = comfy.cldm.cldm.ControlNet(**config)
    missing, unexpected = control_model.load_state_dict(dict(state_dict), strict=False)
    if missing or unexpected:
        raise CheckpointLayoutError(f"{what} does not fit ComfyUI's ControlNet: missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}.")
    return comfy.controlnet.ControlNet(control_model, load_device=load_device, manual_cast_dtype=manual_cast_dtype)
