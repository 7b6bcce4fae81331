"""Loading ``pulid_flux_v0.9.0`` / ``v0.9.1`` safetensors: split into the IDFormer and the ID cross-attentions.

The released file is flat: ``pulid_encoder.*`` (one :class:`~.encoders.IDFormer`) and ``pulid_ca.N.*`` (20
:class:`~.encoders.IDCrossAttention` for FLUX.1's 19 double + 38 single blocks at the released intervals). Shapes
are read from the tensors (widths, depth, number of ID tokens, number of cross-attentions); head counts cannot be
read from shapes and default to the release's (16 / 16). Every key must be consumed and fit: anything else raises
:class:`~errors.CheckpointLayoutError` naming the file (wrong file, an SD1.5 PuLID file, truncated or corrupt).
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import CheckpointLayoutError, ModelFileError
from .encoders import VIT_SCALES, CrossAttentionConfig, IDCrossAttention, IDFormer, IDFormerConfig

logger = logging.getLogger("likeness")

ENCODER_GROUP = "pulid_encoder"
CA_GROUP = "pulid_ca"
RELEASE_HEADS = 16
SD15_GROUPS = ("id_adapter", "id_adapter_attn_layers")   # PuLID for SD1.5/SDXL (pulid_v1*.bin / .safetensors)
MAX_LISTED = 12


@dataclass
class PulidFluxModel:
    """A loaded PuLID-FLUX file: the ID encoder and the ordered cross-attentions, in eval mode."""

    encoder: IDFormer
    cross_attentions: nn.ModuleList
    source: str
    patcher: Any = None   # ComfyUI's ModelPatcher of the cross-attentions (made by apply, host only)

    @property
    def encoder_config(self) -> IDFormerConfig:
        return self.encoder.config

    @property
    def ca_config(self) -> CrossAttentionConfig:
        ca = self.cross_attentions[0]
        return CrossAttentionConfig(ca.to_q.in_features, ca.to_q.out_features // ca.heads, ca.heads,
                                    ca.to_kv.in_features)

    @property
    def dim(self) -> int:
        """The DiT width the cross-attentions were trained for (FLUX.1: 3072)."""
        return self.ca_config.dim

    def to(self, device=None, dtype=None) -> "PulidFluxModel":
        self.encoder.to(device=device, dtype=dtype)
        self.cross_attentions.to(device=device, dtype=dtype)
        return self

    def parameters(self):
        yield from self.encoder.parameters()
        yield from self.cross_attentions.parameters()


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path``; ModelFileError naming the file when it is missing, truncated or not safetensors."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"PuLID-FLUX file not found: {path}. Put pulid_flux_v0.9.1.safetensors into "
                             "models/pulid.")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"cannot read {name} as safetensors (truncated or corrupt?): {exc}. Download "
                             "pulid_flux_v0.9.1.safetensors again.") from exc


def load_pulid_flux(path: str, encoder_heads: int = RELEASE_HEADS, ca_heads: int = RELEASE_HEADS) -> PulidFluxModel:
    """Load a PuLID-FLUX file in its stored dtype (cast with :meth:`PulidFluxModel.to`)."""
    return pulid_flux_from_state_dict(read_safetensors(path), os.path.basename(path), encoder_heads, ca_heads)


def split_groups(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[dict, dict[int, dict]]:
    """``(encoder keys, {ca index: keys})``; refuses files of another kind and stray keys."""
    encoder: dict[str, torch.Tensor] = {}
    cas: dict[int, dict[str, torch.Tensor]] = {}
    stray: list[str] = []
    for key, tensor in state_dict.items():
        group, _, rest = key.partition(".")
        match = re.fullmatch(r"(\d+)\.(.+)", rest) if group == CA_GROUP else None
        if group == ENCODER_GROUP and rest:
            encoder[rest] = tensor
        elif match:
            cas.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        else:
            stray.append(key)
    if not encoder and not cas:
        raise CheckpointLayoutError(f"{source} is not a PuLID-FLUX file: {_kind_hint(state_dict)}")
    problems = [f"unexpected key '{k}'" for k in stray]
    if not encoder:
        problems.append(f"no '{ENCODER_GROUP}.*' keys (the ID encoder)")
    if not cas:
        problems.append(f"no '{CA_GROUP}.N.*' keys (the ID cross-attentions)")
    missing = sorted(set(range(max(cas) + 1)) - set(cas)) if cas else []
    problems += [f"'{CA_GROUP}.{i}.*' missing (the indices must run 0..{max(cas)})" for i in missing]
    _raise(problems, source)
    return encoder, cas


def _kind_hint(state_dict: Mapping[str, torch.Tensor]) -> str:
    groups = sorted({k.split(".", 1)[0] for k in state_dict})
    if any(g in SD15_GROUPS for g in groups):
        return ("it is a PuLID file for SD1.5/SDXL (groups id_adapter / id_adapter_attn_layers). PuLID-FLUX needs "
                "pulid_flux_v0.9.0 or v0.9.1.safetensors.")
    shown = ", ".join(groups[:6]) or "(empty)"
    return (f"neither '{ENCODER_GROUP}.*' nor '{CA_GROUP}.N.*' keys are present (top-level groups: {shown}). Pick "
            "pulid_flux_v0.9.1.safetensors.")


def _raise(problems: list[str], source: str) -> None:
    if not problems:
        return
    listed = "\n  - ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise CheckpointLayoutError(f"{source} does not match the PuLID-FLUX layout ({len(problems)} problem(s)); is it "
                                f"truncated or another model's file?\n  - {listed}{more}")


def _shape(keys: Mapping[str, torch.Tensor], key: str, ndim: int, source: str, group: str) -> tuple[int, ...]:
    tensor = keys.get(key)
    if tensor is None or tensor.ndim != ndim:
        found = "missing" if tensor is None else f"shape {list(tensor.shape)}"
        _raise([f"'{group}.{key}' is {found}, expected a {ndim}-d tensor"], source)
    return tuple(tensor.shape)


def encoder_config_from(keys: Mapping[str, torch.Tensor], source: str, heads: int = RELEASE_HEADS) -> IDFormerConfig:
    """The IDFormer's hyper-parameters read from its tensors' shapes."""
    g = ENCODER_GROUP
    _, num_queries, dim = _shape(keys, "latents", 3, source, g)
    _, output_dim = _shape(keys, "proj_out", 2, source, g)
    inner, _ = _shape(keys, "layers.0.0.to_q.weight", 2, source, g)
    ff_inner, _ = _shape(keys, "layers.0.1.1.weight", 2, source, g)
    mapping_dim, vit_dim = _shape(keys, "mapping_0.0.weight", 2, source, g)
    _, id_dim = _shape(keys, "id_embedding_mapping.0.weight", 2, source, g)
    id_out, _ = _shape(keys, "id_embedding_mapping.6.weight", 2, source, g)
    depth = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"layers\.(\d+)\.", k)))
    if inner % heads or id_out % dim or ff_inner % dim or depth % VIT_SCALES:
        _raise([f"inconsistent ID encoder widths (attention {inner} for {heads} heads, ID tokens {id_out} / {dim}, "
                f"depth {depth})"], source)
    return IDFormerConfig(dim=dim, depth=depth, dim_head=inner // heads, heads=heads, num_id_tokens=id_out // dim,
                          num_queries=num_queries, output_dim=output_dim, ff_mult=ff_inner // dim, vit_dim=vit_dim,
                          id_dim=id_dim, mapping_dim=mapping_dim)


def ca_config_from(keys: Mapping[str, torch.Tensor], source: str, heads: int = RELEASE_HEADS) -> CrossAttentionConfig:
    inner, dim = _shape(keys, "to_q.weight", 2, source, f"{CA_GROUP}.0")
    _, id_dim = _shape(keys, "to_kv.weight", 2, source, f"{CA_GROUP}.0")
    if inner % heads:
        _raise([f"ID cross-attention width {inner} is not a multiple of {heads} heads"], source)
    return CrossAttentionConfig(dim=dim, dim_head=inner // heads, heads=heads, id_dim=id_dim)


def _load_strict(module: nn.Module, keys: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype) -> list[str]:
    """Put ``keys`` into ``module`` (built on the meta device: the file's tensors become its parameters, no copy);
    the problems (missing / unexpected / mis-shaped keys) named in full."""
    expected = module.state_dict()
    problems = [f"'{prefix}.{k}' missing" for k in expected if k not in keys]
    problems += [f"unexpected key '{prefix}.{k}'" for k in keys if k not in expected]
    problems += [f"'{prefix}.{k}' has shape {list(keys[k].shape)}, expected {list(t.shape)}"
                 for k, t in expected.items() if k in keys and keys[k].shape != t.shape]
    if not problems:
        module.load_state_dict({k: keys[k].to(dtype).contiguous() for k in expected}, strict=True, assign=True)
    return problems


def pulid_flux_from_state_dict(state_dict: Mapping[str, torch.Tensor], source: str = "state dict",
                               encoder_heads: int = RELEASE_HEADS, ca_heads: int = RELEASE_HEADS) -> PulidFluxModel:
    """Build and fill the modules from a flat state dict in the released layout (every key consumed)."""
    encoder_keys, ca_keys = split_groups(state_dict, source)
    encoder_config = encoder_config_from(encoder_keys, source, encoder_heads)
    ca_config = ca_config_from(ca_keys[0], source, ca_heads)
    with torch.device("meta"):   # no random init of weights that are overwritten next
        encoder = IDFormer(encoder_config)
        cas = nn.ModuleList(ca_config.build() for _ in ca_keys)
    stored = encoder_keys["latents"].dtype   # the file's dtype (bf16 released; no fp32 copy)
    problems = _load_strict(encoder, encoder_keys, ENCODER_GROUP, stored)
    for index in sorted(ca_keys):
        problems += _load_strict(cas[index], ca_keys[index], f"{CA_GROUP}.{index}", stored)
    _raise(problems, source)
    logger.info("PuLID-FLUX %s: ID encoder %d layers -> %d tokens x %d, %d ID cross-attentions (width %d)", source,
                encoder_config.depth, encoder_config.num_queries, encoder_config.output_dim, len(cas), ca_config.dim)
    return PulidFluxModel(encoder.eval().requires_grad_(False), cas.eval().requires_grad_(False), source)


def state_dict_of(model: PulidFluxModel) -> dict[str, torch.Tensor]:
    """The released flat layout of ``model`` (the inverse of :func:`pulid_flux_from_state_dict`)."""
    out = {f"{ENCODER_GROUP}.{k}": v for k, v in model.encoder.state_dict().items()}
    for index, ca in enumerate(model.cross_attentions):
        out.update({f"{CA_GROUP}.{index}.{k}": v for k, v in ca.state_dict().items()})
    return out


def build_pulid_flux(encoder_config: IDFormerConfig, ca_config: CrossAttentionConfig, count: int,
                     source: str = "random") -> PulidFluxModel:
    """Randomly initialised modules (tests, benchmarks)."""
    cas = nn.ModuleList(IDCrossAttention(ca_config.dim, ca_config.dim_head, ca_config.heads, ca_config.id_dim)
                        for _ in range(count))
    return PulidFluxModel(IDFormer(encoder_config).eval().requires_grad_(False), cas.eval().requires_grad_(False),
                          source)
