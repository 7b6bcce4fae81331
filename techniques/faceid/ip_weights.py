"""Per-site weights of the decoupled ID branch (``to_k_ip``/``to_v_ip`` of every attn2 processor).

The engine's decoupled injector computes, at each cross-attention site,
``out += scale * Attention(q, to_k_ip(id_tokens), to_v_ip(id_tokens))`` with the site's own query and heads.
Processor ``2k+1`` belongs to the k-th transformer block in diffusers order; :func:`ip_site_weights` pairs each
with the ComfyUI block it lives in (derived from the model by :func:`..lora.transformer_blocks`), so the engine
can look a site up by ``(block name, block number, transformer index)`` or by the diffusers order k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import CheckpointLayoutError
from .lora import TransformerBlockRef, check_adapter_fits
from .processors import AdapterWeights


@dataclass(frozen=True)
class IPSiteWeights:
    """The ID-branch projections of one cross-attention site."""
    order: int                      # k: diffusers order of the transformer block (processor 2k+1)
    processor_index: int            # 2k+1
    block: tuple[str, int] | None   # ComfyUI block id, e.g. ("input", 1); None when not paired with a model
    transformer_index: int          # index inside the block's SpatialTransformer
    to_k_ip: torch.Tensor           # [C, context_dim]
    to_v_ip: torch.Tensor           # [C, context_dim]

    @property
    def patch_key(self) -> tuple[str, int, int] | None:
        return None if self.block is None else (self.block[0], self.block[1], self.transformer_index)


def ip_weights_by_order(adapter: AdapterWeights) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{k: (to_k_ip, to_v_ip)}`` for every attn2 processor 2k+1 (no model needed)."""
    return {p.site_order: (p.to_k_ip, p.to_v_ip) for p in adapter.ip_processors()}


def ip_site_weights(adapter: AdapterWeights, blocks: list[TransformerBlockRef] | None = None) -> list[IPSiteWeights]:
    """One entry per cross-attention site in diffusers order; paired with the model's blocks when given."""
    if blocks is not None:
        check_adapter_fits(adapter, blocks)
    sites = []
    for proc in adapter.ip_processors():
        ref = blocks[proc.site_order] if blocks is not None else None
        if ref is not None and ref.channels and proc.to_k_ip.shape[0] != ref.channels:
            raise CheckpointLayoutError(f"to_k_ip of processor {proc.index} is {proc.to_k_ip.shape[0]} wide but block "
                                        f"{ref.block} is {ref.channels} wide; wrong base model.")
        sites.append(IPSiteWeights(proc.site_order, proc.index, ref.block if ref else None,
                                   ref.transformer_index if ref else 0, proc.to_k_ip, proc.to_v_ip))
    return sites


class IdentityKV:
    """The engine's ``DecoupledInjector`` provider: ``(site, kind) -> (to_k_ip(tokens), to_v_ip(tokens))``.

    ``cond_tokens`` / ``uncond_tokens`` are the projector's ID tokens ``[1 | chunk_size, N, context]`` for
    positive (kind 0) and negative (kind 1) chunks; ``uncond_tokens=None`` gives negative chunks nothing.
    Keys and values of every processor are projected once, here, where the tokens are; :meth:`to` moves them
    with the model (the engine calls it when ComfyUI loads or offloads the model), so an attention call is a
    lookup. Shared between model clones, never copied.
    """

    def __init__(self, adapter: AdapterWeights, cond_tokens: torch.Tensor, uncond_tokens: torch.Tensor | None,
                 dtype: torch.dtype = torch.float32):
        tokens = {0: _prepare(cond_tokens, dtype), 1: None if uncond_tokens is None else _prepare(uncond_tokens, dtype)}
        widths = {t.shape[-1] for t in tokens.values() if t is not None}
        if widths != {adapter.context_dim}:
            raise CheckpointLayoutError(f"ID tokens are {sorted(widths)}-d but to_k_ip/to_v_ip take "
                                        f"{adapter.context_dim}-d inputs.")
        self.kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for order, (to_k, to_v) in ip_weights_by_order(adapter).items():
            for kind, t in tokens.items():
                if t is not None:
                    to_k, to_v = to_k.to(t.device, dtype), to_v.to(t.device, dtype)
                    self.kv[(order, kind)] = (t @ to_k.T, t @ to_v.T)
        self.kinds = {kind for kind, t in tokens.items() if t is not None}

    def __call__(self, site, kind: int):
        kind = 0 if kind == 0 else 1
        if kind not in self.kinds:
            return None
        kv = self.kv.get((site.order, kind))
        if kv is None:
            raise CheckpointLayoutError(f"the adapter has no to_k_ip for cross-attention site {site.order} "
                                        f"(processor {2 * site.order + 1}); wrong base model.")
        if kv[0].shape[-1] != site.channels:
            raise CheckpointLayoutError(f"to_k_ip of processor {2 * site.order + 1} is {kv[0].shape[-1]} wide but "
                                        f"site {site.key} is {site.channels} wide; wrong base model.")
        return kv

    def to(self, device: torch.device) -> "IdentityKV":
        self.kv = {key: (k.to(device), v.to(device)) for key, (k, v) in self.kv.items()}
        return self

    def __deepcopy__(self, memo):
        return self


def _prepare(tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tokens = tokens if tokens.dim() == 3 else tokens.unsqueeze(0)
    return tokens.detach().to(dtype=dtype)
