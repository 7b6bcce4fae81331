"""ConsistentID's FacialEncoder: facial-region image features fused into the feature words' text embeddings.

Key layout of the released ``FacialEncoder`` group (see ``shared/checkpoint_layouts/consistentid_v1_sd15.json``):

- ``visual_projection`` (:class:`RegionResampler`, the official ``AttentionMLP``): a resampler with one learned
  query (``latents`` [1,1,1024]), ``proj_in`` 1280->1024, 8 x (PerceiverAttention 16x64, FeedForward x4),
  ``proj_out`` 1024->768, ``norm_out``. It turns one region crop's CLIP-H penultimate tokens [257,1280] into
  one 768-d vector.
- ``fuse_module`` (:class:`FuseModule`, PhotoMaker's): ``fused = LN(MLP2(MLP1(cat(tok, region)) + tok) + ...)``
  with ``MLP = LayerNorm -> fc1 -> GELU -> fc2`` (``mlp2`` adds its input back).

Pairing (as in the official code, which the released weights were trained with): the k valid region vectors,
in region order, replace the k marked feature-word tokens in *sequence* order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import CheckpointLayoutError, InvalidInputError
from ..faceid.projection import FacePerceiverResampler, attention_heads, count_indexed


class RegionResampler(FacePerceiverResampler):
    """Perceiver resampler with ``num_queries`` learned latents (ConsistentID: one query per region).

    The same resampler as FaceID-Plus's, except that its queries are parameters instead of inputs.
    """

    def __init__(self, *, dim: int = 1024, depth: int = 8, dim_head: int = 64, heads: int = 16,
                 num_queries: int = 1, embedding_dim: int = 1280, output_dim: int = 768, ff_mult: int = 4):
        super().__init__(dim=dim, depth=depth, dim_head=dim_head, heads=heads, embedding_dim=embedding_dim,
                         output_dim=output_dim, ff_mult=ff_mult)
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """[B, N, embedding_dim] -> [B, num_queries, output_dim]."""
        return super().forward(self.latents.expand(image_features.shape[0], -1, -1), image_features)


class FuseMLP(nn.Module):
    """LayerNorm -> fc1 -> GELU -> fc2, optionally adding the input back (keys ``layernorm``, ``fc1``, ``fc2``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, residual: bool):
        super().__init__()
        if residual and in_dim != out_dim:
            raise ValueError("a residual MLP needs in_dim == out_dim")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.act_fn = nn.GELU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return y + x if self.residual else y


class FuseModule(nn.Module):
    """Fuses a text token embedding with a region embedding of the same width."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.mlp1 = FuseMLP(embed_dim * 2, embed_dim, embed_dim, residual=False)
        self.mlp2 = FuseMLP(embed_dim, embed_dim, embed_dim, residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, token_embeds: torch.Tensor, region_embeds: torch.Tensor) -> torch.Tensor:
        """token_embeds [..., C], region_embeds [..., C] -> fused [..., C]."""
        mixed = self.mlp1(torch.cat([token_embeds, region_embeds], dim=-1)) + token_embeds
        return self.layer_norm(self.mlp2(mixed))


class FacialEncoder(nn.Module):
    """Region features -> one vector per region -> fused into the marked text tokens."""

    def __init__(self, embedding_dim: int = 1280, output_dim: int = 768, resampler_dim: int = 1024,
                 depth: int = 8, heads: int = 16, dim_head: int = 64, num_queries: int = 1):
        super().__init__()
        self.visual_projection = RegionResampler(dim=resampler_dim, depth=depth, dim_head=dim_head, heads=heads,
                                                 num_queries=num_queries, embedding_dim=embedding_dim,
                                                 output_dim=output_dim)
        self.fuse_module = FuseModule(output_dim)

    def encode_regions(self, region_features: torch.Tensor) -> torch.Tensor:
        """[R, N, embedding_dim] CLIP hidden states of R region crops -> [R, output_dim]."""
        return self.visual_projection(region_features)[:, 0]

    def fuse(self, prompt_embeds: torch.Tensor, region_embeds: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """Replace ``prompt_embeds[:, positions[i]]`` by ``fuse(token, region_embeds[i])``; returns a new tensor.

        prompt_embeds [B, T, C]; region_embeds [K, C] or [B, K, C]; positions: K token indices into T, in the
        order the regions are paired with (ascending for the official pairing).
        """
        if region_embeds.dim() == 2:
            region_embeds = region_embeds.unsqueeze(0).expand(prompt_embeds.shape[0], -1, -1)
        if len(positions) != region_embeds.shape[1]:
            raise InvalidInputError(f"{len(positions)} marked tokens but {region_embeds.shape[1]} region embeddings; "
                                    "every <|facial|> marker needs exactly one facial region.")
        if not positions:
            return prompt_embeds.clone()
        if max(positions) >= prompt_embeds.shape[1] or min(positions) < 0:
            raise InvalidInputError(f"marked token positions {positions} fall outside the {prompt_embeds.shape[1]} "
                                    "text tokens of this conditioning.")
        index = torch.as_tensor(positions, device=prompt_embeds.device)
        tokens = prompt_embeds[:, index]
        fused = self.fuse_module(tokens, region_embeds.to(tokens.dtype))
        out = prompt_embeds.clone()
        out[:, index] = fused.to(out.dtype)
        return out

    def forward(self, prompt_embeds: torch.Tensor, region_features: torch.Tensor, token_mask: torch.Tensor,
                valid_mask: torch.Tensor) -> torch.Tensor:
        """Official-style call: prompt_embeds [B,T,C], region_features [B,R,N,D], token_mask [B,T] bool,
        valid_mask [B,R] bool. Per batch row, the valid regions (in region order) fuse into the marked tokens
        (in sequence order); their counts must agree."""
        rows = []
        for b in range(prompt_embeds.shape[0]):
            positions = torch.nonzero(token_mask[b], as_tuple=False).flatten().tolist()
            regions = region_features[b][valid_mask[b].bool()]
            region_embeds = (self.encode_regions(regions) if len(regions)
                             else prompt_embeds.new_zeros(0, prompt_embeds.shape[-1]))
            rows.append(self.fuse(prompt_embeds[b:b + 1], region_embeds, positions))
        return torch.cat(rows, dim=0)


@dataclass(frozen=True)
class FacialEncoderConfig:
    embedding_dim: int
    output_dim: int
    resampler_dim: int
    depth: int
    heads: int
    dim_head: int
    num_queries: int

    def build(self) -> FacialEncoder:
        return FacialEncoder(self.embedding_dim, self.output_dim, self.resampler_dim, self.depth, self.heads,
                             self.dim_head, self.num_queries)


def facial_encoder_config_from_state_dict(sd: dict[str, torch.Tensor], group: str = "FacialEncoder"
                                          ) -> FacialEncoderConfig:
    """Dimensions read from the group's shapes (the released model: 1280 -> 1024 x 8 layers -> 768)."""
    def shape(key):
        if key not in sd:
            raise CheckpointLayoutError(f"'{group}' has no '{key}', which ConsistentID's FacialEncoder has.")
        return tuple(sd[key].shape)

    _, num_queries, dim = shape("visual_projection.latents")
    embedding_dim = shape("visual_projection.proj_in.weight")[1]
    output_dim = shape("visual_projection.proj_out.weight")[0]
    depth = count_indexed(sd, "visual_projection.layers.")
    if depth == 0:
        raise CheckpointLayoutError(f"'{group}' has a visual_projection without layers.")
    heads, dim_head = attention_heads(shape("visual_projection.layers.0.0.to_q.weight")[0])
    fuse_dim = shape("fuse_module.layer_norm.weight")[0]
    if fuse_dim != output_dim:
        raise CheckpointLayoutError(f"'{group}': fuse_module width {fuse_dim} differs from the region vector width "
                                    f"{output_dim}.")
    return FacialEncoderConfig(embedding_dim, output_dim, dim, depth, heads, dim_head, num_queries)
