"""PuLID-FLUX's two trained modules: the ID encoder (IDFormer) and the per-block ID cross-attention.

Written for this pack from the paper's description and the released weights' key layout (``pulid_flux_v0.9.x``
safetensors, see ``tests/data/checkpoint_layouts/pulid_flux_v0.9.1.json``); the parameter names follow that layout
key for key so the official file loads with ``strict=True``:

- :class:`IDFormer` (``pulid_encoder.*``): a perceiver resampler. The ID vector (antelopev2 ArcFace 512 + EVA-CLIP
  pooled 768 = 1280) is mapped to ``num_id_tokens`` tokens that join ``num_queries`` learned latents; five groups
  of layers each read one of EVA-CLIP's five intermediate hidden states (mapped by ``mapping_{i}``) plus the ID
  tokens as context. Output: ``num_queries`` ID tokens of ``output_dim`` (2048) = the ID embedding.
- :class:`IDCrossAttention` (``pulid_ca.N.*``): the DiT's image tokens (queries, width 3072) attend to the ID tokens
  (keys/values, width 2048); its output is added to the block's image tokens scaled by the ID weight.

Attention runs through ``scaled_dot_product_attention`` (the default ``1/sqrt(d)`` scale is the paper's); the
released code's split scaling and fp32 softmax give the same values in fp32 (the fidelity test checks 1e-4).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrossAttentionConfig", "IDCrossAttention", "IDFormer", "IDFormerConfig", "LatentAttention",
           "feed_forward"]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H*D] -> [B, H, N, D]``."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D] -> [B, N, H*D]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class _Attention(nn.Module):
    """Shared parameters of both attentions: LayerNorms of the context (``norm1``) and the queries (``norm2``),
    bias-free query / fused key-value / output projections."""

    def __init__(self, dim: int, dim_head: int, heads: int, context_dim: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = nn.LayerNorm(context_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def attend(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``queries`` already normalised ``[B, Nq, dim]``; ``context`` normalised ``[B, Nk, context_dim]``."""
        k, v = self.to_kv(context).chunk(2, dim=-1)
        q = _heads(self.to_q(queries), self.heads)
        # the fused kernels keep logits and softmax in fp32 for bf16 inputs (what the release does by hand)
        out = F.scaled_dot_product_attention(q, _heads(k, self.heads), _heads(v, self.heads))
        return self.to_out(_merge(out))


class LatentAttention(_Attention):
    """The IDFormer's perceiver layer: latents attend to ``[context; latents]`` (context width = latent width)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__(dim, dim_head, heads, dim)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context = self.norm1(context)
        latents = self.norm2(latents)
        return self.attend(latents, torch.cat((context, latents), dim=1))


class IDCrossAttention(_Attention):
    """One ``pulid_ca`` module: image tokens ``[B, N, dim]`` attend to ID tokens ``[B, T, id_dim]``; returns the
    residual ``[B, N, dim]`` (unweighted)."""

    def __init__(self, dim: int = 3072, dim_head: int = 128, heads: int = 16, id_dim: int = 2048):
        super().__init__(dim, dim_head, heads, id_dim)

    def forward(self, id_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.attend(self.norm2(image_tokens), self.norm1(id_tokens))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """Pre-norm GELU MLP without biases (indices 0 / 1 / 3 carry the weights, as in the released file)."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


def _mlp(width_in: int, hidden: int, width_out: int) -> nn.Sequential:
    """The three-layer LayerNorm/LeakyReLU MLP of ``mapping_{i}`` and ``id_embedding_mapping``."""
    return nn.Sequential(nn.Linear(width_in, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, width_out))


VIT_SCALES = 5   # EVA-CLIP hidden states read by the IDFormer (blocks 4, 8, 12, 16, 20 of 24)


@dataclass(frozen=True)
class IDFormerConfig:
    """Released PuLID-FLUX values by default; tests shrink them (``vit_dim``/``id_dim``/``mapping_dim`` are fixed
    to EVA02-CLIP-L and antelopev2 in the release)."""

    dim: int = 1024
    depth: int = 10
    dim_head: int = 64
    heads: int = 16
    num_id_tokens: int = 5
    num_queries: int = 32
    output_dim: int = 2048
    ff_mult: int = 4
    vit_dim: int = 1024       # EVA02-CLIP-L-14-336 width
    id_dim: int = 1280        # ArcFace 512 + EVA-CLIP projected 768
    mapping_dim: int = 1024

    def __post_init__(self):
        if self.depth % VIT_SCALES:
            raise ValueError(f"IDFormer depth must be a multiple of {VIT_SCALES} (one group per ViT scale), "
                             f"got {self.depth}")

    def as_dict(self) -> dict:
        return asdict(self)


class IDFormer(nn.Module):
    """``pulid_encoder``: ``(id_vector [B, id_dim] or [B, R, id_dim], 5 x ViT hidden [B, N, vit_dim])`` ->
    ID tokens ``[B, num_queries, output_dim]``. ``R`` reference vectors give ``R * num_id_tokens`` ID tokens."""

    def __init__(self, config: IDFormerConfig | None = None):
        super().__init__()
        c = self.config = config or IDFormerConfig()
        scale = c.dim ** -0.5
        self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) * scale)
        self.proj_out = nn.Parameter(torch.randn(c.dim, c.output_dim) * scale)
        self.layers = nn.ModuleList(
            nn.ModuleList([LatentAttention(c.dim, c.dim_head, c.heads), feed_forward(c.dim, c.ff_mult)])
            for _ in range(c.depth))
        for i in range(VIT_SCALES):
            setattr(self, f"mapping_{i}", _mlp(c.vit_dim, c.mapping_dim, c.dim))
        self.id_embedding_mapping = _mlp(c.id_dim, c.mapping_dim, c.dim * c.num_id_tokens)

    def forward(self, id_vector: torch.Tensor, vit_hidden: list[torch.Tensor] | tuple[torch.Tensor, ...]
                ) -> torch.Tensor:
        c = self.config
        if len(vit_hidden) != VIT_SCALES:
            raise ValueError(f"IDFormer reads {VIT_SCALES} ViT hidden states, got {len(vit_hidden)}")
        batch = id_vector.shape[0]
        id_tokens = self.id_embedding_mapping(id_vector).reshape(batch, -1, c.dim)
        latents = torch.cat((self.latents.expand(batch, -1, -1), id_tokens), dim=1)
        per_scale = c.depth // VIT_SCALES
        for i, hidden in enumerate(vit_hidden):
            context = torch.cat((id_tokens, getattr(self, f"mapping_{i}")(hidden)), dim=1)
            for attention, ff in self.layers[i * per_scale:(i + 1) * per_scale]:
                latents = attention(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, :c.num_queries] @ self.proj_out


@dataclass(frozen=True)
class CrossAttentionConfig:
    """``pulid_ca`` shape: ``dim`` = the DiT's width (FLUX.1: 3072), ``id_dim`` = the IDFormer's output."""

    dim: int = 3072
    dim_head: int = 128
    heads: int = 16
    id_dim: int = 2048

    def build(self) -> IDCrossAttention:
        return IDCrossAttention(self.dim, self.dim_head, self.heads, self.id_dim)
