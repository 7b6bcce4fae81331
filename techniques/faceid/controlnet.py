"""Face-MakeUp's pose ControlNet as a ComfyUI ControlNet, fed the ID tokens instead of the text (host-gated).

Face-MakeUp's "PoseNet" is a diffusers ``ControlNetModel`` whose cross-attention context is the 4 identity
tokens. ComfyUI already supports a per-conditioning ControlNet context: ``ControlNet.get_control`` reads
``cond['crossattn_controlnet']`` (filled from the conditioning entry's ``cross_attn_controlnet``) before the
text. So the ControlNet half is: convert the diffusers state dict with ComfyUI's own key map (the same one
``comfy.controlnet.load_controlnet_state_dict`` uses), build ComfyUI's ControlNet from it (:mod:`host.controlnet`),
and attach a copy per conditioning entry exactly like ``ControlNetApplyAdvanced``, with the cond ID tokens on
positive entries and the uncond ones on negative entries.

The UNet config comes from ComfyUI's diffusers detection when it recognises the model (the real Face-MakeUp is
SD1.5-shaped); for scaled-down test ControlNets, which no detection table lists, it is derived from the shapes.
Everything after the config is the same code path.
"""
from __future__ import annotations

import logging

import torch

from ...errors import CheckpointLayoutError, InvalidInputError
from .controlnet_layout import ControlNetShape

logger = logging.getLogger("likeness")

SD15_NUM_HEADS = 8    # diffusers' SD1.5 "attention_head_dim" = 8 is the number of heads; shapes cannot tell


def unet_config_from_shape(shape: ControlNetShape) -> dict:
    """A ComfyUI UNet config (``model_detection`` style) for a diffusers ControlNet of this architecture."""
    base = shape.block_out_channels[0]
    layers = shape.layers_per_block
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": shape.in_channels, "model_channels": base,
        "num_res_blocks": [layers] * len(shape.block_out_channels),
        "transformer_depth": [d for d in shape.transformer_depth for _ in range(layers)],
        "channel_mult": [c // base for c in shape.block_out_channels],
        "transformer_depth_middle": shape.mid_transformer_depth,
        # only read by the key map (a ControlNet has no decoder): SD1.5 mirrors the encoder depths
        "transformer_depth_output": [d for d in shape.transformer_depth for _ in range(layers + 1)],
        "use_linear_in_transformer": shape.linear_projection, "context_dim": shape.cross_attention_dim,
        "num_heads": SD15_NUM_HEADS, "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def diffusers_to_comfy_keys(sd: dict, config: dict) -> dict[str, str]:
    """The diffusers -> ComfyUI key map of ``comfy.controlnet.load_controlnet_state_dict`` (diffusers branch)."""
    from ...host.controlnet import unet_diffusers_key_map

    keys = unet_diffusers_key_map(config)
    keys["controlnet_mid_block.weight"] = "middle_block_out.0.weight"
    keys["controlnet_mid_block.bias"] = "middle_block_out.0.bias"
    count = 0
    while f"controlnet_down_blocks.{count}.weight" in sd:
        for s in (".weight", ".bias"):
            keys[f"controlnet_down_blocks.{count}{s}"] = f"zero_convs.{count}.0{s}"
        count += 1
    count = 0
    while True:
        source = "controlnet_cond_embedding.conv_in" if count == 0 else f"controlnet_cond_embedding.blocks.{count - 1}"
        last = f"{source}.weight" not in sd
        if last:
            source = "controlnet_cond_embedding.conv_out"
        for s in (".weight", ".bias"):
            keys[source + s] = f"input_hint_block.{count * 2}{s}"
        if last:
            return keys
        count += 1


def build_face_makeup_controlnet(sd: dict[str, torch.Tensor], shape: ControlNetShape):
    """A ``comfy.controlnet.ControlNet`` from Face-MakeUp's diffusers ``controlnet`` group (not modified)."""
    from ...host.controlnet import build_controlnet, diffusers_unet_config

    config = diffusers_unet_config(sd) or unet_config_from_shape(shape)
    key_map = diffusers_to_comfy_keys(sd, config)
    converted = {key_map[k]: v for k, v in sd.items() if k in key_map}
    leftover = sorted(k for k in sd if k not in key_map)
    if leftover:
        raise CheckpointLayoutError(f"Face-MakeUp controlnet: {len(leftover)} key(s) have no ComfyUI name, e.g. "
                                    f"{leftover[:3]}; the file is not a diffusers SD1.5 ControlNet.")
    return build_controlnet(converted, config, "Face-MakeUp controlnet")


def attach_id_controlnet(conditioning: list, control_net, hint: torch.Tensor, id_tokens: torch.Tensor,
                         strength: float, start_at: float = 0.0, end_at: float = 1.0) -> list:
    """Like ``ControlNetApplyAdvanced`` for one side: each entry gets a ControlNet copy with ``hint`` (IMAGE
    ``[B,H,W,C]``) chained after any previous ControlNet, and ``cross_attn_controlnet`` = ``id_tokens``
    ``[1,N,ctx]`` so the ControlNet attends to the ID tokens, not the text. Strength 0 leaves it untouched."""
    if strength == 0.0:
        return conditioning
    if hint.dim() != 4 or hint.shape[-1] != 3:
        raise InvalidInputError(f"the pose map must be an IMAGE [B,H,W,3], got {tuple(hint.shape)}.")
    hint_nchw = hint.movedim(-1, 1)
    tokens = id_tokens[:1] if id_tokens.dim() == 3 else id_tokens.unsqueeze(0)
    cache: dict = {}
    out = []
    for cross_attn, options in conditioning:
        entry = options.copy()
        previous = entry.get("control", None)
        key = id(previous)
        if key not in cache:
            c_net = control_net.copy().set_cond_hint(hint_nchw, strength, (start_at, end_at), vae=None,
                                                     extra_concat=[])
            c_net.set_previous_controlnet(previous)
            cache[key] = c_net
        entry["control"] = cache[key]
        entry["cross_attn_controlnet"] = tokens.detach().float().cpu()
        out.append([cross_attn, entry])
    return out
