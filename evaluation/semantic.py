"""Whole-image embedding metrics: CLIP-T (image-prompt), CLIP-I and DINO (image-reference) cosines."""
from __future__ import annotations

from .inputs import MetricContext


def _to_reference(ctx: MetricContext, encoder, column: str) -> list[dict]:
    generated = ctx.embeddings(encoder, "images")
    references = ctx.embeddings(encoder, "references")
    return [{column: float(generated[i] @ references[ctx.inputs.paired_index("references", i)])}
            for i in range(ctx.inputs.count)]


def clip_t(ctx: MetricContext) -> list[dict]:
    generated = ctx.embeddings(ctx.models.clip, "images")
    unique = list(dict.fromkeys(ctx.inputs.prompts))           # a shared prompt is encoded once
    texts = ctx.models.clip.embed_texts(unique)
    return [{"clip_t": float(generated[i] @ texts[unique.index(prompt)])}
            for i, prompt in enumerate(ctx.inputs.prompts)]


def clip_i(ctx: MetricContext) -> list[dict]:
    return _to_reference(ctx, ctx.models.clip, "clip_i")


def dino(ctx: MetricContext) -> list[dict]:
    return _to_reference(ctx, ctx.models.dino, "dino")
