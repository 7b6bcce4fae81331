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
    Keys and values are computed once per (site, kind) on ``device`` and memoised (the provider is called on
    every attention call). Shared between model clones, never copied.
    """

    def __init__(self, adapter: AdapterWeights, cond_tokens: torch.Tensor, uncond_tokens: torch.Tensor | None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.weights = ip_weights_by_order(adapter)
        self.device = torch.device(device) if device is not None else cond_tokens.device
        self.dtype = dtype
        self.tokens = {0: self._prepare(cond_tokens), 1: None if uncond_tokens is None else self._prepare(uncond_tokens)}
        widths = {t.shape[-1] for t in self.tokens.values() if t is not None}
        if widths != {adapter.context_dim}:
            raise CheckpointLayoutError(f"ID tokens are {sorted(widths)}-d but to_k_ip/to_v_ip take "
                                        f"{adapter.context_dim}-d inputs.")
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _prepare(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens if tokens.dim() == 3 else tokens.unsqueeze(0)
        return tokens.detach().to(self.device, self.dtype)

    def __call__(self, site, kind: int):
        tokens = self.tokens[0 if kind == 0 else 1]
        if tokens is None:
            return None
        key = (site.order, 0 if kind == 0 else 1)
        cached = self._cache.get(key)
        if cached is not None and cached[0].shape[-1] == site.channels:
            return cached
        if site.order not in self.weights:
            raise CheckpointLayoutError(f"the adapter has no to_k_ip for cross-attention site {site.order} "
                                        f"(processor {2 * site.order + 1}); wrong base model.")
        to_k, to_v = (w.to(self.device, self.dtype) for w in self.weights[site.order])
        if to_k.shape[0] != site.channels:
            raise CheckpointLayoutError(f"to_k_ip of processor {2 * site.order + 1} is {to_k.shape[0]} wide but "
                                        f"site {site.key} is {site.channels} wide; wrong base model.")
        cached = self._cache[key] = (tokens @ to_k.T, tokens @ to_v.T)
        return cached

    def __deepcopy__(self, memo):
        return self
