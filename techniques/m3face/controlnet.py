"""FaceControlNet files the stock ControlNetLoader cannot size: any SD-layout diffusers ControlNet, as a ComfyUI
ControlNet for the stock Apply ControlNet.

The released FaceControlNets are diffusers ``ControlNetModel`` files. ComfyUI's ControlNetLoader accepts a diffusers
ControlNet only when it matches one of its fixed model tables (all 320 channels wide), and it takes the attention
projection type and head layout from the table entry. The English branches (SD1.5 shape) match it. A multilingual
branch whose AltDiffusion base differs from ComfyUI's SD2.1 entry, and the scaled-down models of tests and examples,
do not. This loader reads the architecture from the file's own shapes (checked key for key), converts the keys with
ComfyUI's own map and builds ComfyUI's ControlNet (:mod:`host.controlnet`), the same object the stock loader gives.

Shapes cannot tell the number of attention heads (it changes no weight). ``auto`` takes it from the base MODEL the
ControlNet is used with (FaceControlNets are copies of their base UNet's encoder, ``ControlNetModel.from_unet``),
else from ComfyUI's table when it knows the model, else by projection type: SD1.x convolutions use 8 heads, SD2.x
linear projections 64-channel heads.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ...errors import CheckpointLayoutError, InvalidInputError
from ..faceid.controlnet import diffusers_to_comfy_keys, unet_config_from_shape
from ..faceid.controlnet_layout import ControlNetShape, validate_controlnet_state_dict

logger = logging.getLogger("likeness")

SD1_HEADS = {"num_heads": 8, "num_head_channels": -1}
SD2_HEADS = {"num_heads": -1, "num_head_channels": 64}
HEAD_LAYOUTS = {"auto": None, "8 heads (SD1.5)": SD1_HEADS, "64-channel heads (SD2)": SD2_HEADS}


def head_layout(choice: str, shape: ControlNetShape, model_heads: Mapping[str, int] | None,
                table_config: Mapping[str, Any] | None) -> dict[str, int]:
    """``{"num_heads", "num_head_channels"}`` for the ControlNet (see the module docstring for ``auto``)."""
    if choice not in HEAD_LAYOUTS:
        raise InvalidInputError(f"heads must be one of {list(HEAD_LAYOUTS)}, not {choice!r}")
    if HEAD_LAYOUTS[choice] is not None:
        return dict(HEAD_LAYOUTS[choice])
    for source in (model_heads, table_config):
        if source:
            return {"num_heads": int(source.get("num_heads", -1)),
                    "num_head_channels": int(source.get("num_head_channels", -1))}
    return dict(SD2_HEADS if shape.linear_projection else SD1_HEADS)


def comfy_controlnet_config(state_dict: Mapping[str, torch.Tensor], heads: str = "auto",
                            model_heads: Mapping[str, int] | None = None) -> tuple[dict, ControlNetShape]:
    """ComfyUI's UNet config for a diffusers ControlNet state dict (validated key for key) and its shape."""
    from ...host.controlnet import diffusers_unet_config

    shape = validate_controlnet_state_dict(dict(state_dict), "FaceControlNet")
    config = unet_config_from_shape(shape)
    config.update(head_layout(heads, shape, model_heads, diffusers_unet_config(state_dict)))
    return config, shape


def build_face_controlnet(state_dict: Mapping[str, torch.Tensor], heads: str = "auto",
                          model_heads: Mapping[str, int] | None = None, what: str = "FaceControlNet") -> Any:
    """A ``comfy.controlnet.ControlNet`` from a diffusers ControlNet state dict of any SD layout."""
    from ...host.controlnet import build_controlnet

    config, shape = comfy_controlnet_config(state_dict, heads, model_heads)
    key_map = diffusers_to_comfy_keys(dict(state_dict), config)
    leftover = sorted(k for k in state_dict if k not in key_map)
    if leftover:
        raise CheckpointLayoutError(f"{what}: {len(leftover)} keys have no ComfyUI name, e.g. {leftover[:3]}")
    converted = {key_map[k]: v for k, v in state_dict.items()}
    logger.info("M3Face: %s is a %d-level ControlNet, %d channels, context %d, heads %s", what,
                len(shape.block_out_channels), shape.block_out_channels[0], shape.cross_attention_dim,
                {k: v for k, v in config.items() if k.startswith("num_head")})
    return build_controlnet(converted, config, what)
