"""Test helpers for FaceID-family checkpoints: state dicts built from the official layout JSONs, and scaled-down
random checkpoints of the same architecture sized for a given (tiny) UNet.

The layout JSONs in ``tests/data/checkpoint_layouts`` are copies of ``shared/checkpoint_layouts`` (key, shape and
dtype of every tensor of the official files; see the README there).
"""
from __future__ import annotations

import json
import os
import zlib

import torch

LAYOUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "checkpoint_layouts")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}

FACEID = "ip_adapter_faceid_sd15.json"
FACEID_PLUSV2 = "ip_adapter_faceid_plusv2_sd15.json"
CONSISTENTID = "consistentid_v1_sd15.json"
FACE_MAKEUP = "face_makeup_sd15.json"
BISENET = "bisenet_face_parsing_19.json"
FACEID_SDXL = "ip_adapter_faceid_sdxl.json"
FACEID_PLUSV2_SDXL = "ip_adapter_faceid_plusv2_sdxl.json"
FACEID_PORTRAIT_SDXL = "ip_adapter_faceid_portrait_sdxl.json"
INSTANTID = "instantid_ip_adapter_sdxl.json"
INSTANTID_CONTROLNET = "instantid_controlnet_sdxl.json"


def read_layout(name: str) -> dict:
    with open(os.path.join(LAYOUT_DIR, name), encoding="utf-8") as f:
        return json.load(f)


def key_value(group: str, key: str) -> float:
    """A per-key constant in [-0.5, 0.5): tensors filled with it prove each key reached the right parameter."""
    return (zlib.crc32(f"{group}.{key}".encode()) % 1000) / 1000.0 - 0.5


def state_dict_from_layout(name: str, empty_groups: tuple[str, ...] = (), materialize: bool = False,
                           as_dtype: torch.dtype | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{group: {key: tensor}}`` with each tensor filled with :func:`key_value` in its stored dtype.

    Without ``materialize`` the constants are broadcast views (no memory until the loader casts them; a loader
    run with the stored dtype, or ``as_dtype`` = the loader's dtype, copies nothing: the SDXL files are 1-2 GB);
    ``materialize=True`` makes real contiguous tensors (needed to save files). Groups in ``empty_groups`` are
    ``torch.empty`` (no memory touched; for the 1.45 GB ControlNet).
    """
    layout = read_layout(name)
    out = {}
    for group, keys in layout["groups"].items():
        tensors = {}
        for key, spec in keys.items():
            dtype = DTYPES[spec["dtype"]] if as_dtype is None else as_dtype
            if group in empty_groups:
                tensors[key] = torch.empty(spec["shape"], dtype=dtype)
            elif dtype.is_floating_point:
                value = torch.tensor(key_value(group, key), dtype=dtype).expand(spec["shape"])
                tensors[key] = value.contiguous() if materialize else value
            else:
                tensors[key] = torch.zeros(spec["shape"], dtype=dtype)
        out[group] = tensors
    return out


def expected_value(group: str, key: str, stored: torch.dtype) -> float:
    """What :func:`key_value` becomes after storage in ``stored`` and the loader's cast to fp32."""
    return float(torch.tensor(key_value(group, key)).to(stored).float())


def flatten(groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The ``.safetensors`` form: ``{"group.key": tensor}``."""
    return {f"{g}.{k}": t for g, sd in groups.items() for k, t in sd.items()}


# --------------------------------------------------------------------------------------------------------------
# Scaled-down random checkpoints (same architecture, tiny widths)

def _seeded(module: torch.nn.Module, seed: int, std: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def random_adapter_group(block_channels: list[int], context_dim: int, rank: int = 4, seed: int = 0,
                         std: float = 0.02, with_lora: bool = True) -> dict[str, torch.Tensor]:
    """A processor group for a UNet whose k-th transformer block (diffusers order) is ``block_channels[k]`` wide."""
    generator = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=generator) * std

    group = {}
    for k, c in enumerate(block_channels):
        for index, cross in ((2 * k, False), (2 * k + 1, True)):
            if with_lora:
                for target in ("to_q", "to_k", "to_v", "to_out"):
                    in_dim = context_dim if cross and target in ("to_k", "to_v") else c
                    group[f"{index}.{target}_lora.down.weight"] = rnd(rank, in_dim)
                    group[f"{index}.{target}_lora.up.weight"] = rnd(c, rank)
            if cross:
                group[f"{index}.to_k_ip.weight"] = rnd(c, context_dim)
                group[f"{index}.to_v_ip.weight"] = rnd(c, context_dim)
    return group


def random_faceid_checkpoint(block_channels: list[int], context_dim: int, *, kind: str = "plus",
                             id_dim: int = 512, clip_dim: int = 64, num_tokens: int = 4, rank: int = 4,
                             facial_encoder: bool = False, seed: int = 0, with_lora: bool = True
                             ) -> dict[str, dict[str, torch.Tensor]]:
    """A scaled-down FaceID / FaceID-Plus / ConsistentID checkpoint (nested groups) with random weights
    (``with_lora=False``: IP weights only, the FaceID-Portrait layout).

    ``block_channels`` from ``[ref.channels for ref in transformer_blocks(model)]``; ``context_dim`` the UNet's
    cross-attention width; ``clip_dim`` the tiny CLIP vision hidden width.
    """
    from likeness.techniques.consistentid.facial_encoder import FacialEncoder
    from likeness.techniques.faceid.projection import MLPProjModel, ProjPlusModel

    if kind == "mlp":
        projector = MLPProjModel(context_dim, id_dim, num_tokens)
    else:
        projector = ProjPlusModel(context_dim, id_dim, clip_dim, num_tokens, depth=2, heads=1, dim_head=context_dim)
    groups = {"image_proj": _seeded(projector, seed, 0.05),
              ("adapter_modules" if facial_encoder else "ip_adapter"):
                  random_adapter_group(block_channels, context_dim, rank, seed + 1, with_lora=with_lora)}
    if facial_encoder:
        encoder = FacialEncoder(embedding_dim=clip_dim, output_dim=context_dim, resampler_dim=64, depth=2, heads=1,
                                dim_head=64)
        groups["FacialEncoder"] = _seeded(encoder, seed + 2, 0.05)
    return groups


def random_instantid_checkpoint(block_channels: list[int], context_dim: int, *, width: int = 64, depth: int = 2,
                                num_tokens: int = 16, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A scaled-down InstantID ``ip-adapter.bin``: a Resampler on the 512-d ArcFace vector, IP-only processors."""
    from likeness.techniques.faceid.projection import IDResampler

    resampler = IDResampler(dim=width, depth=depth, dim_head=width, heads=1, num_queries=num_tokens,
                            embedding_dim=512, output_dim=context_dim)
    groups = {"image_proj": _seeded(resampler, seed, 0.05),
              "ip_adapter": random_adapter_group(block_channels, context_dim, seed=seed + 1, with_lora=False)}
    groups["image_proj"]["latents"] = torch.randn(1, num_tokens, width, generator=torch.Generator().manual_seed(seed))
    return groups
