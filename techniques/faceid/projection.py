"""ID-token projectors of the IP-Adapter FaceID family (FaceID, FaceID-Plus/PlusV2, ConsistentID, Face-MakeUp).

Module and parameter names follow the released checkpoints key for key, so ``load_state_dict(strict=True)``
works on the official files (see ``shared/checkpoint_layouts``):

- :class:`MLPProjModel` (FaceID): ``proj.0`` / ``proj.2`` / ``norm``. ArcFace [B,512] -> 4 tokens [B,4,768].
- :class:`ProjPlusModel` (FaceID-Plus, PlusV2, ConsistentID ``image_proj``, Face-MakeUp ``image_proj``): the same
  MLP, then a :class:`FacePerceiverResampler` whose queries are those 4 tokens and whose context is the CLIP-H
  penultimate hidden states [B,257,1280]. PlusV2 (and Face-MakeUp) add the shortcut ``x + s_scale * resampler``.
- :class:`IDResampler` (InstantID ``image_proj``): the IP-Adapter-Plus ``Resampler`` with learned latent queries
  attending over the ArcFace vector as a one-token context: [B,512] -> 16 tokens [B,16,2048] (SDXL).
- :class:`PerceiverAttention` and :func:`feed_forward`: the resamplers' layer pair, shared with ConsistentID's
  FacialEncoder.

SD1.5 and SDXL files differ only in widths (768 vs 2048 token width, 12 vs 32 perceiver heads), so both load
through the same classes.

Everything here is plain torch; shapes are inferred from a state dict by :func:`projector_config_from_state_dict`
so scaled-down test models of the same architecture load through the same code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import CheckpointLayoutError, InvalidInputError

# The official resamplers all use 64-dimensional heads; the head count is inner_dim // 64.
DEFAULT_DIM_HEAD = 64


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm -> Linear(no bias) -> GELU -> Linear(no bias); keys ``0.weight/bias``, ``1.weight``, ``3.weight``."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads*dh] -> [B, heads, N, dh]."""
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


class PerceiverAttention(nn.Module):
    """Latent queries attend over ``concat(context, latents)`` (IP-Adapter resampler layer).

    The 1/sqrt(dh) scale is applied as dh^-1/4 on q and on k before the product (as the official code does,
    which keeps fp16 logits in range), and the softmax runs in fp32 whatever the input dtype.
    """

    def __init__(self, *, dim: int, dim_head: int = DEFAULT_DIM_HEAD, heads: int = 8):
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """context [B, N, dim] (projected image features), latents [B, Q, dim] -> update [B, Q, dim]."""
        context = self.norm1(context)
        latents = self.norm2(latents)
        batch, n_queries, _ = latents.shape
        q = _split_heads(self.to_q(latents), self.heads)
        k, v = self.to_kv(torch.cat((context, latents), dim=-2)).chunk(2, dim=-1)
        k, v = _split_heads(k, self.heads), _split_heads(v, self.heads)
        quarter_scale = 1.0 / math.sqrt(math.sqrt(self.dim_head))
        logits = (q * quarter_scale) @ (k * quarter_scale).transpose(-2, -1)
        weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        out = (weights @ v).transpose(1, 2).reshape(batch, n_queries, -1)
        return self.to_out(out)


class FacePerceiverResampler(nn.Module):
    """Resampler without learned latents: the queries are passed in (the 4 ID tokens)."""

    def __init__(self, *, dim: int = 768, depth: int = 4, dim_head: int = DEFAULT_DIM_HEAD, heads: int = 12,
                 embedding_dim: int = 1280, output_dim: int = 768, ff_mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
            for _ in range(depth))

    def forward(self, latents: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """latents [B, Q, dim], image_features [B, N, embedding_dim] -> [B, Q, output_dim]."""
        context = self.proj_in(image_features)
        for attention, ff in self.layers:
            latents = attention(context, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class IDResampler(nn.Module):
    """InstantID's projector: ``num_queries`` learned latents refined by a perceiver over the identity vector.

    Key names follow the official ``Resampler`` (``latents``, ``proj_in``, ``layers.{i}.{0,1}``, ``proj_out``,
    ``norm_out``); the ArcFace vector is the perceiver's one-token context.
    """

    def __init__(self, *, dim: int = 1280, depth: int = 4, dim_head: int = DEFAULT_DIM_HEAD, heads: int = 20,
                 num_queries: int = 16, embedding_dim: int = 512, output_dim: int = 2048, ff_mult: int = 4):
        super().__init__()
        self.num_tokens = num_queries
        self.cross_attention_dim = output_dim
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
            for _ in range(depth))

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        """id_embeds [B, embedding_dim] or [B, N, embedding_dim] -> tokens [B, num_queries, output_dim]."""
        context = id_embeds.unsqueeze(1) if id_embeds.dim() == 2 else id_embeds
        latents = self.latents.expand(context.shape[0], -1, -1)
        context = self.proj_in(context)
        for attention, ff in self.layers:
            latents = attention(context, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class MLPProjModel(nn.Module):
    """FaceID: ArcFace vector -> ``num_tokens`` LayerNorm-ed tokens."""

    def __init__(self, cross_attention_dim: int = 768, id_embeddings_dim: int = 512, num_tokens: int = 4):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = nn.Sequential(nn.Linear(id_embeddings_dim, id_embeddings_dim * 2), nn.GELU(),
                                  nn.Linear(id_embeddings_dim * 2, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        """id_embeds [B, id_dim] -> tokens [B, num_tokens, cross_attention_dim]."""
        tokens = self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class ProjPlusModel(nn.Module):
    """FaceID-Plus projector: MLP tokens refined by a perceiver over CLIP-H penultimate hidden states."""

    def __init__(self, cross_attention_dim: int = 768, id_embeddings_dim: int = 512, clip_embeddings_dim: int = 1280,
                 num_tokens: int = 4, depth: int = 4, heads: int | None = None, dim_head: int = DEFAULT_DIM_HEAD):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = nn.Sequential(nn.Linear(id_embeddings_dim, id_embeddings_dim * 2), nn.GELU(),
                                  nn.Linear(id_embeddings_dim * 2, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=cross_attention_dim, depth=depth, dim_head=dim_head,
            heads=heads if heads is not None else max(1, cross_attention_dim // dim_head),
            embedding_dim=clip_embeddings_dim, output_dim=cross_attention_dim, ff_mult=4)

    def forward(self, id_embeds: torch.Tensor, clip_embeds: torch.Tensor, shortcut: bool = False,
                scale: float = 1.0) -> torch.Tensor:
        """id_embeds [B, id_dim], clip_embeds [B, N, clip_dim] -> [B, num_tokens, cross_attention_dim].

        ``shortcut`` (PlusV2, Face-MakeUp): ``x + scale * resampler(x, clip)``; otherwise ``resampler(x, clip)``.
        """
        tokens = self.norm(self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim))
        refined = self.perceiver_resampler(tokens, clip_embeds)
        return tokens + scale * refined if shortcut else refined


# --------------------------------------------------------------------------------------------------------------
# Building a projector from a state dict (dimensions read from the shapes)

@dataclass(frozen=True)
class ProjectorConfig:
    kind: str                      # "mlp" (FaceID), "plus" (FaceID-Plus family) or "resampler" (InstantID)
    cross_attention_dim: int
    id_embeddings_dim: int
    num_tokens: int
    clip_embeddings_dim: int = 0   # "plus" only
    depth: int = 0
    heads: int = 0
    dim_head: int = DEFAULT_DIM_HEAD
    width: int = 0                 # "resampler" only: the perceiver's inner width (latents' dim)

    def build(self) -> nn.Module:
        if self.kind == "mlp":
            return MLPProjModel(self.cross_attention_dim, self.id_embeddings_dim, self.num_tokens)
        if self.kind == "resampler":
            return IDResampler(dim=self.width, depth=self.depth, dim_head=self.dim_head, heads=self.heads,
                               num_queries=self.num_tokens, embedding_dim=self.id_embeddings_dim,
                               output_dim=self.cross_attention_dim)
        return ProjPlusModel(self.cross_attention_dim, self.id_embeddings_dim, self.clip_embeddings_dim,
                             self.num_tokens, self.depth, self.heads, self.dim_head)


def _shape(sd: dict[str, torch.Tensor], key: str, group: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointLayoutError(f"'{group}' has no '{key}', which every FaceID-family projector has.")
    return tuple(sd[key].shape)


def count_indexed(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of consecutive ``{prefix}{i}.`` indices present (0, 1, 2, ...)."""
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in sd
               if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    n = 0
    while n in indices:
        n += 1
    return n


def attention_heads(inner_dim: int, dim_head: int = DEFAULT_DIM_HEAD) -> tuple[int, int]:
    """(heads, dim_head) for an inner width: 64-d heads as in the official code, one head for tiny widths."""
    if inner_dim >= dim_head and inner_dim % dim_head == 0:
        return inner_dim // dim_head, dim_head
    return 1, inner_dim


def resampler_config_from_state_dict(sd: dict[str, torch.Tensor], group: str = "image_proj") -> ProjectorConfig:
    """InstantID's Resampler dimensions from its keys (``latents`` [1, Q, dim], ``proj_in`` [dim, id])."""
    _, queries, width = _shape(sd, "latents", group)
    proj_width, id_dim = _shape(sd, "proj_in.weight", group)
    output_dim = _shape(sd, "proj_out.weight", group)[0]
    depth = count_indexed(sd, "layers.")
    if proj_width != width or depth == 0:
        raise CheckpointLayoutError(f"'{group}': a Resampler needs proj_in [{width}, id] and at least one layer; "
                                    f"got proj_in {[proj_width, id_dim]} and {depth} layers.")
    heads, dim_head = attention_heads(_shape(sd, "layers.0.0.to_q.weight", group)[0])
    return ProjectorConfig("resampler", output_dim, id_dim, queries, depth=depth, heads=heads, dim_head=dim_head,
                           width=width)


def projector_config_from_state_dict(sd: dict[str, torch.Tensor], group: str = "image_proj") -> ProjectorConfig:
    """Read the projector's dimensions from its keys and shapes (raises CheckpointLayoutError on nonsense)."""
    if "latents" in sd:
        return resampler_config_from_state_dict(sd, group)
    hidden, id_dim = _shape(sd, "proj.0.weight", group)
    flat_out, hidden2 = _shape(sd, "proj.2.weight", group)
    (cross,) = _shape(sd, "norm.weight", group)
    if hidden != 2 * id_dim or hidden2 != hidden or flat_out % cross:
        raise CheckpointLayoutError(
            f"'{group}' MLP shapes do not fit together: proj.0 {[hidden, id_dim]}, proj.2 {[flat_out, hidden2]}, "
            f"norm {[cross]} (expected proj.0 [2*id, id], proj.2 [tokens*C, 2*id], norm [C]).")
    tokens = flat_out // cross
    if not any(k.startswith("perceiver_resampler.") for k in sd):
        return ProjectorConfig("mlp", cross, id_dim, tokens)
    dim, clip_dim = _shape(sd, "perceiver_resampler.proj_in.weight", group)
    depth = count_indexed(sd, "perceiver_resampler.layers.")
    if depth == 0:
        raise CheckpointLayoutError(f"'{group}' has a perceiver_resampler without layers.")
    inner = _shape(sd, "perceiver_resampler.layers.0.0.to_q.weight", group)[0]
    heads, dim_head = attention_heads(inner)
    if dim != cross:
        raise CheckpointLayoutError(
            f"'{group}': perceiver width {dim} differs from the token width {cross}; not a FaceID-Plus projector.")
    return ProjectorConfig("plus", cross, id_dim, tokens, clip_dim, depth, heads, dim_head)


def projector_tokens(projector: nn.Module, id_embeds: torch.Tensor, clip_embeds: torch.Tensor | None = None,
                     shortcut: bool = False, s_scale: float = 1.0) -> torch.Tensor:
    """Run either projector kind with its right inputs; returns [B, num_tokens, C] in the projector's dtype."""
    param = next(projector.parameters())
    id_embeds = id_embeds.to(device=param.device, dtype=param.dtype)
    if id_embeds.dim() == 1:
        id_embeds = id_embeds.unsqueeze(0)
    id_dim = projector.proj_in.in_features if isinstance(projector, IDResampler) else projector.proj[0].in_features
    if id_embeds.shape[-1] != id_dim:
        raise InvalidInputError(
            f"this projector takes {id_dim}-d identity vectors (insightface ArcFace); got {id_embeds.shape[-1]}-d.")
    if isinstance(projector, (MLPProjModel, IDResampler)):
        return projector(id_embeds)
    if clip_embeds is None:
        raise InvalidInputError("FaceID-Plus projectors need CLIP vision hidden states (penultimate layer).")
    clip_embeds = clip_embeds.to(device=param.device, dtype=param.dtype)
    if clip_embeds.dim() == 2:
        clip_embeds = clip_embeds.unsqueeze(0)
    clip_dim = projector.perceiver_resampler.proj_in.in_features
    if clip_embeds.dim() != 3 or clip_embeds.shape[-1] != clip_dim:
        raise InvalidInputError(
            f"this projector takes CLIP vision hidden states of width {clip_dim} (CLIP-ViT-H penultimate layer); "
            f"got shape {list(clip_embeds.shape)}. Load the ViT-H CLIP vision model.")
    if clip_embeds.shape[0] != id_embeds.shape[0]:
        raise InvalidInputError(
            f"{id_embeds.shape[0]} identity vector(s) but {clip_embeds.shape[0]} CLIP image(s); give one image per "
            "identity (or mix them first).")
    return projector(id_embeds, clip_embeds, shortcut=shortcut, scale=s_scale)
