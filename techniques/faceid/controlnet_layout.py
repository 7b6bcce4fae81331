"""Key-for-key check of a diffusers ControlNet state dict (Face-MakeUp's ``controlnet`` group, InstantID's IdentityNet).

Face-MakeUp's "PoseNet" is a diffusers ``ControlNetModel.from_unet`` copy of the SD1.5 encoder; InstantID's
IdentityNet is the same for the SDXL encoder (plus SDXL's ``add_embedding`` of the pooled text and size conds). ComfyUI's own
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
    addition_embed_dim: int = 0              # SDXL: input width of ``add_embedding`` (pooled text + size conds)


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
    addition = sd.get("add_embedding.linear_1.weight")
    return ControlNetShape(in_channels, cond_channels, tuple(channels), tuple(has_attention), tuple(depths),
                           mid_depth, layers, time_embed_dim, cross_dim, linear, tuple(embedding),
                           int(addition.shape[1]) if addition is not None and addition.dim() == 2 else 0)


Shapes = dict[str, tuple[int, ...]]


def _conv(out: Shapes, prefix: str, cout: int, cin: int, k: int) -> None:
    out[f"{prefix}.weight"] = (cout, cin, k, k)
    out[f"{prefix}.bias"] = (cout,)


def _linear(out: Shapes, prefix: str, cout: int, cin: int, bias: bool = True) -> None:
    out[f"{prefix}.weight"] = (cout, cin)
    if bias:
        out[f"{prefix}.bias"] = (cout,)


def _norm(out: Shapes, prefix: str, c: int) -> None:
    out[f"{prefix}.weight"] = (c,)
    out[f"{prefix}.bias"] = (c,)


def _resnet(out: Shapes, prefix: str, cin: int, cout: int, time_embed_dim: int) -> None:
    _norm(out, f"{prefix}.norm1", cin)
    _conv(out, f"{prefix}.conv1", cout, cin, 3)
    _linear(out, f"{prefix}.time_emb_proj", cout, time_embed_dim)
    _norm(out, f"{prefix}.norm2", cout)
    _conv(out, f"{prefix}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(out, f"{prefix}.conv_shortcut", cout, cin, 1)


def _projection(out: Shapes, prefix: str, c: int, linear_projection: bool) -> None:
    """A transformer's proj_in / proj_out: a Linear in newer diffusers configs, a 1x1 conv in SD1.5's."""
    if linear_projection:
        _linear(out, prefix, c, c)
    else:
        _conv(out, prefix, c, c, 1)


def _transformer_block(out: Shapes, block: str, c: int, cross_attention_dim: int) -> None:
    for number, attn, kv_in in ((1, "attn1", c), (2, "attn2", cross_attention_dim)):
        _norm(out, f"{block}.norm{number}", c)
        _linear(out, f"{block}.{attn}.to_q", c, c, bias=False)
        _linear(out, f"{block}.{attn}.to_k", c, kv_in, bias=False)
        _linear(out, f"{block}.{attn}.to_v", c, kv_in, bias=False)
        _linear(out, f"{block}.{attn}.to_out.0", c, c)
    _norm(out, f"{block}.norm3", c)
    _linear(out, f"{block}.ff.net.0.proj", 8 * c, c)      # GEGLU: value and gate halves
    _linear(out, f"{block}.ff.net.2", c, 4 * c)


def _transformer(out: Shapes, prefix: str, c: int, depth: int, cfg: ControlNetShape) -> None:
    _norm(out, f"{prefix}.norm", c)
    _projection(out, f"{prefix}.proj_in", c, cfg.linear_projection)
    for t in range(depth):
        _transformer_block(out, f"{prefix}.transformer_blocks.{t}", c, cfg.cross_attention_dim)
    _projection(out, f"{prefix}.proj_out", c, cfg.linear_projection)


def _input_layers(out: Shapes, cfg: ControlNetShape) -> None:
    """conv_in, the time (and SDXL's added-conditions) embedding and the conditioning-image embedding."""
    base = cfg.block_out_channels[0]
    _conv(out, "conv_in", base, cfg.in_channels, 3)
    _linear(out, "time_embedding.linear_1", cfg.time_embed_dim, base)
    _linear(out, "time_embedding.linear_2", cfg.time_embed_dim, cfg.time_embed_dim)
    if cfg.addition_embed_dim:
        _linear(out, "add_embedding.linear_1", cfg.time_embed_dim, cfg.addition_embed_dim)
        _linear(out, "add_embedding.linear_2", cfg.time_embed_dim, cfg.time_embed_dim)
    emb = cfg.embedding_channels
    _conv(out, "controlnet_cond_embedding.conv_in", emb[0], cfg.conditioning_channels, 3)
    for i in range(len(emb) - 1):
        _conv(out, f"controlnet_cond_embedding.blocks.{2 * i}", emb[i], emb[i], 3)
        _conv(out, f"controlnet_cond_embedding.blocks.{2 * i + 1}", emb[i + 1], emb[i], 3)
    _conv(out, "controlnet_cond_embedding.conv_out", base, emb[-1], 3)


def _down_blocks(out: Shapes, cfg: ControlNetShape) -> list[int]:
    """The encoder's down blocks; returns the channels of every residual output (one zero conv each)."""
    base = cfg.block_out_channels[0]
    zero_convs = [base]
    previous = base
    last = len(cfg.block_out_channels) - 1
    for b, c in enumerate(cfg.block_out_channels):
        for layer in range(cfg.layers_per_block):
            _resnet(out, f"down_blocks.{b}.resnets.{layer}", previous if layer == 0 else c, c, cfg.time_embed_dim)
            if cfg.blocks_with_attention[b]:
                _transformer(out, f"down_blocks.{b}.attentions.{layer}", c, cfg.transformer_depth[b], cfg)
            zero_convs.append(c)
        if b != last:
            _conv(out, f"down_blocks.{b}.downsamplers.0.conv", c, c, 3)
            zero_convs.append(c)
        previous = c
    return zero_convs


def _mid_block(out: Shapes, cfg: ControlNetShape) -> None:
    top = cfg.block_out_channels[-1]
    _resnet(out, "mid_block.resnets.0", top, top, cfg.time_embed_dim)
    if cfg.mid_transformer_depth:
        _transformer(out, "mid_block.attentions.0", top, cfg.mid_transformer_depth, cfg)
    _resnet(out, "mid_block.resnets.1", top, top, cfg.time_embed_dim)
    _conv(out, "controlnet_mid_block", top, top, 1)


def expected_controlnet_shapes(cfg: ControlNetShape) -> Shapes:
    """Every key of a diffusers ControlNetModel with this architecture, with its shape."""
    out: Shapes = {}
    _input_layers(out, cfg)
    for i, c in enumerate(_down_blocks(out, cfg)):
        _conv(out, f"controlnet_down_blocks.{i}", c, c, 1)
    _mid_block(out, cfg)
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
