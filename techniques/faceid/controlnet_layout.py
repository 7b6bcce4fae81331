"""Key-for-key check of a diffusers ControlNet state dict (Face-MakeUp's ``controlnet`` group).

Face-MakeUp's "PoseNet" is a diffusers ``ControlNetModel.from_unet`` copy of the SD1.5 encoder. ComfyUI's own
ControlNet loading turns it into a ComfyUI ControlNet later; here we only prove that the group is complete and
consistent before anything is built: the architecture is read from a few keys (widths, depths, context width),
the full expected key -> shape table is generated from it, and the group must match that table exactly.
This also accepts scaled-down ControlNets of the same architecture (tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import CheckpointLayoutError
from .processors import raise_problems
from .projection import count_indexed


@dataclass(frozen=True)
class ControlNetShape:
    in_channels: int
    conditioning_channels: int
    block_out_channels: tuple[int, ...]
    blocks_with_attention: tuple[bool, ...]
    transformer_depth: tuple[int, ...]       # per down block (0 without attention)
    mid_transformer_depth: int
    layers_per_block: int
    time_embed_dim: int
    cross_attention_dim: int
    linear_projection: bool
    embedding_channels: tuple[int, ...]


def _shape(sd, key):
    if key not in sd:
        raise CheckpointLayoutError(f"'controlnet' has no '{key}', which every diffusers ControlNet has.")
    return tuple(sd[key].shape)


def controlnet_shape_from_state_dict(sd: dict[str, torch.Tensor]) -> ControlNetShape:
    """Read the architecture from the group's keys (raises CheckpointLayoutError when a defining key is absent)."""
    base, in_channels = _shape(sd, "conv_in.weight")[:2]
    time_embed_dim = _shape(sd, "time_embedding.linear_1.weight")[0]
    first_embed, cond_channels = _shape(sd, "controlnet_cond_embedding.conv_in.weight")[:2]
    n_embed_blocks = count_indexed(sd, "controlnet_cond_embedding.blocks.")
    embedding = [first_embed] + [_shape(sd, f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight")[0]
                                 for i in range(n_embed_blocks // 2)]
    n_blocks = count_indexed(sd, "down_blocks.")
    if n_blocks == 0:
        raise CheckpointLayoutError("'controlnet' has no down_blocks.")
    layers = count_indexed(sd, "down_blocks.0.resnets.")
    channels, has_attention, depths = [], [], []
    cross_dim, linear = 0, False
    for b in range(n_blocks):
        channels.append(_shape(sd, f"down_blocks.{b}.resnets.0.conv1.weight")[0])
        attn = f"down_blocks.{b}.attentions.0."
        has_attention.append(any(k.startswith(attn) for k in sd))
        depths.append(count_indexed(sd, attn + "transformer_blocks.") if has_attention[-1] else 0)
        if has_attention[-1] and not cross_dim:
            cross_dim = _shape(sd, attn + "transformer_blocks.0.attn2.to_k.weight")[1]
            linear = len(_shape(sd, attn + "proj_in.weight")) == 2
    mid_depth = count_indexed(sd, "mid_block.attentions.0.transformer_blocks.")
    if not cross_dim and mid_depth:
        cross_dim = _shape(sd, "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight")[1]
    if base != channels[0]:
        raise CheckpointLayoutError(f"'controlnet': conv_in has {base} channels but down_blocks.0 has {channels[0]}.")
    return ControlNetShape(in_channels, cond_channels, tuple(channels), tuple(has_attention), tuple(depths),
                           mid_depth, layers, time_embed_dim, cross_dim, linear, tuple(embedding))


def expected_controlnet_shapes(cfg: ControlNetShape) -> dict[str, tuple[int, ...]]:
    """Every key of a diffusers ControlNetModel with this architecture, with its shape."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(prefix, cout, cin, k):
        out[f"{prefix}.weight"] = (cout, cin, k, k)
        out[f"{prefix}.bias"] = (cout,)

    def linear(prefix, cout, cin, bias=True):
        out[f"{prefix}.weight"] = (cout, cin)
        if bias:
            out[f"{prefix}.bias"] = (cout,)

    def norm(prefix, c):
        out[f"{prefix}.weight"] = (c,)
        out[f"{prefix}.bias"] = (c,)

    def resnet(prefix, cin, cout):
        norm(f"{prefix}.norm1", cin)
        conv(f"{prefix}.conv1", cout, cin, 3)
        linear(f"{prefix}.time_emb_proj", cout, cfg.time_embed_dim)
        norm(f"{prefix}.norm2", cout)
        conv(f"{prefix}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{prefix}.conv_shortcut", cout, cin, 1)

    def transformer(prefix, c, depth):
        norm(f"{prefix}.norm", c)
        proj = linear if cfg.linear_projection else (lambda p, co, ci: conv(p, co, ci, 1))
        proj(f"{prefix}.proj_in", c, c)
        for t in range(depth):
            block = f"{prefix}.transformer_blocks.{t}"
            for attn, kv_in in (("attn1", c), ("attn2", cfg.cross_attention_dim)):
                norm(f"{block}.norm{1 if attn == 'attn1' else 2}", c)
                linear(f"{block}.{attn}.to_q", c, c, bias=False)
                linear(f"{block}.{attn}.to_k", c, kv_in, bias=False)
                linear(f"{block}.{attn}.to_v", c, kv_in, bias=False)
                linear(f"{block}.{attn}.to_out.0", c, c)
            norm(f"{block}.norm3", c)
            linear(f"{block}.ff.net.0.proj", 8 * c, c)      # GEGLU: value and gate halves
            linear(f"{block}.ff.net.2", c, 4 * c)
        proj(f"{prefix}.proj_out", c, c)

    base = cfg.block_out_channels[0]
    conv("conv_in", base, cfg.in_channels, 3)
    linear("time_embedding.linear_1", cfg.time_embed_dim, base)
    linear("time_embedding.linear_2", cfg.time_embed_dim, cfg.time_embed_dim)
    emb = cfg.embedding_channels
    conv("controlnet_cond_embedding.conv_in", emb[0], cfg.conditioning_channels, 3)
    for i in range(len(emb) - 1):
        conv(f"controlnet_cond_embedding.blocks.{2 * i}", emb[i], emb[i], 3)
        conv(f"controlnet_cond_embedding.blocks.{2 * i + 1}", emb[i + 1], emb[i], 3)
    conv("controlnet_cond_embedding.conv_out", base, emb[-1], 3)

    zero_convs = [base]
    previous = base
    last = len(cfg.block_out_channels) - 1
    for b, c in enumerate(cfg.block_out_channels):
        for layer in range(cfg.layers_per_block):
            resnet(f"down_blocks.{b}.resnets.{layer}", previous if layer == 0 else c, c)
            if cfg.blocks_with_attention[b]:
                transformer(f"down_blocks.{b}.attentions.{layer}", c, cfg.transformer_depth[b])
            zero_convs.append(c)
        if b != last:
            conv(f"down_blocks.{b}.downsamplers.0.conv", c, c, 3)
            zero_convs.append(c)
        previous = c
    for i, c in enumerate(zero_convs):
        conv(f"controlnet_down_blocks.{i}", c, c, 1)
    top = cfg.block_out_channels[-1]
    resnet("mid_block.resnets.0", top, top)
    if cfg.mid_transformer_depth:
        transformer("mid_block.attentions.0", top, cfg.mid_transformer_depth)
    resnet("mid_block.resnets.1", top, top)
    conv("controlnet_mid_block", top, top, 1)
    return out


def validate_controlnet_state_dict(sd: dict[str, torch.Tensor], group: str = "controlnet") -> ControlNetShape:
    """Raise CheckpointLayoutError naming every missing, unexpected or mis-shaped key; return the architecture."""
    cfg = controlnet_shape_from_state_dict(sd)
    expected = expected_controlnet_shapes(cfg)
    problems = [f"missing key '{group}.{k}'" for k in expected if k not in sd]
    problems += [f"unexpected key '{group}.{k}'" for k in sd if k not in expected]
    problems += [f"mis-shaped key '{group}.{k}': {list(sd[k].shape)}, expected {list(shape)}"
                 for k, shape in expected.items() if k in sd and tuple(sd[k].shape) != shape]
    raise_problems(problems, f"ControlNet group '{group}'")
    return cfg
