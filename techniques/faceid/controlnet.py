"""ID-fed ControlNets as ComfyUI ControlNets: the identity tokens instead of the text as context (host-gated).

Face-MakeUp's "PoseNet" (SD1.5, 4 ID tokens) and InstantID's IdentityNet (SDXL, 16 ID tokens) are diffusers
``ControlNetModel`` s whose cross-attention context is the identity tokens, driven by the 5-keypoint map. ComfyUI already supports a per-conditioning ControlNet context: ``ControlNet.get_control`` reads
``cond['crossattn_controlnet']`` (filled from the conditioning entry's ``cross_attn_controlnet``) before the
text. So the ControlNet half is: convert the diffusers state dict with ComfyUI's own key map (the same one
``comfy.controlnet.load_controlnet_state_dict`` uses), build ComfyUI's ControlNet from it (:mod:`host.controlnet`),
and attach a copy per conditioning entry exactly like ``ControlNetApplyAdvanced``, with the cond ID tokens on
positive entries and the uncond ones on negative entries.

The UNet config comes from ComfyUI's diffusers detection when it recognises the model (the real Face-MakeUp is
SD1.5-shaped, the IdentityNet SDXL-shaped); for scaled-down test ControlNets, which no detection table lists, it is derived from the shapes.
Everything after the config is the same code path.
"""
from __future__ import annotations

import logging
import math

import torch

from ...errors import CheckpointLayoutError, InvalidInputError
from .controlnet_layout import ControlNetShape

logger = logging.getLogger("likeness")

SD15_NUM_HEADS = 8    # diffusers' SD1.5 "attention_head_dim" = 8 is the number of heads; shapes cannot tell
SDXL_HEAD_CHANNELS = 64   # SDXL's heads are 64 wide (ComfyUI's num_head_channels)


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
    } | (_sdxl_conditioning(shape) if shape.addition_embed_dim else {})


def _sdxl_conditioning(shape: ControlNetShape) -> dict:
    """SDXL's added conditions (label_emb of the pooled text + size embeddings) and 64-wide heads (narrower when a
    scaled-down model's widths are not multiples of 64)."""
    widths = [c for c, attn in zip(shape.block_out_channels, shape.blocks_with_attention, strict=True) if attn]
    return {"num_classes": "sequential", "adm_in_channels": shape.addition_embed_dim, "num_heads": -1,
            "num_head_channels": math.gcd(SDXL_HEAD_CHANNELS, *widths)}


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


def build_id_controlnet(sd: dict[str, torch.Tensor], shape: ControlNetShape, what: str = "Face-MakeUp controlnet"):
    """A ``comfy.controlnet.ControlNet`` from a diffusers ControlNet state dict (validated; not modified)."""
    from ...host.controlnet import build_controlnet, diffusers_unet_config

    config = diffusers_unet_config(sd) or unet_config_from_shape(shape)
    key_map = diffusers_to_comfy_keys(sd, config)
    converted = {key_map[k]: v for k, v in sd.items() if k in key_map}
    leftover = sorted(k for k in sd if k not in key_map)
    if leftover:
        raise CheckpointLayoutError(f"{what}: {len(leftover)} key(s) have no ComfyUI name, e.g. {leftover[:3]}; "
                                    "the file is not a diffusers SD1.5 / SDXL ControlNet.")
    return build_controlnet(converted, config, what)


def controlnet_context_width(control_net) -> int | None:
    """The context width the ControlNet's cross-attentions take (None when it has none or is not a UNet copy)."""
    model = getattr(control_net, "control_model", None)
    if model is None:
        return None
    for name, module in model.named_modules():
        if name.endswith("attn2.to_k") and hasattr(module, "in_features"):
            return int(module.in_features)
    return None


def check_controlnet_context(control_net, id_tokens: torch.Tensor, what: str) -> None:
    """The ControlNet must take the ID tokens' width as its context (IdentityNet: 2048), not another model's."""
    width = controlnet_context_width(control_net)
    if width is not None and width != id_tokens.shape[-1]:
        raise InvalidInputError(f"this ControlNet attends to {width}-d context but {what}'s ID tokens are "
                                f"{id_tokens.shape[-1]}-d; connect {what}'s own ControlNet (InstantID: IdentityNet, "
                                "ControlNetModel/diffusion_pytorch_model.safetensors).")


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
