"""The ID cross-attention with its ID side folded into the query and output projections (sampling only).

Per head ``h`` (``d`` = head width, ``T`` ID tokens), ``IDCrossAttention`` computes
``softmax(norm(x) W_q,h^T K_h^T / sqrt(d)) V_h W_out,h^T`` summed over heads. ``K_h`` and ``V_h`` come from the ID
tokens only, so ``W_q,h^T K_h^T`` (``[dim, T]``) and ``V_h W_out,h^T`` (``[T, dim]``) are fixed for one ID: folded
once, each block call costs two ``[N, dim] x [dim, H*T]`` products instead of ``to_q`` and ``to_out``
(``[N, dim] x [dim, H*d]``). The release has 16 heads of 128 and 32 ID tokens: 512 columns instead of 2048, about
4x less work per call (the same numbers up to rounding: the folds are made in fp32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoders import IDCrossAttention


@dataclass(frozen=True)
class FoldedIDAttention:
    keys: torch.Tensor     # [dim, H*T]: every head's W_q,h^T K_h^T / sqrt(d)
    values: torch.Tensor   # [H*T, dim]: every head's V_h W_out,h^T
    heads: int
    tokens: int


def fold(ca: IDCrossAttention, id_tokens: torch.Tensor, dtype: torch.dtype) -> FoldedIDAttention:
    """Fold one ID (``[1, T, id_dim]``) into ``ca``'s projections; the result in ``dtype`` on ``ca``'s device."""
    weight = ca.to_q.weight
    with torch.no_grad():
        context = ca.norm1(id_tokens.to(weight.device, weight.dtype))
        k, v = ca.to_kv(context)[0].float().chunk(2, dim=-1)             # [T, H*d] each
        heads, tokens = ca.heads, k.shape[0]
        width = k.shape[1] // heads
        k_heads = k.view(tokens, heads, width).transpose(0, 1)           # [H, T, d]
        v_heads = v.view(tokens, heads, width).transpose(0, 1)
        w_q = ca.to_q.weight.float().view(heads, width, -1)              # [H, d, dim]
        w_out = ca.to_out.weight.float().view(-1, heads, width).permute(1, 2, 0)   # [H, d, dim]
        keys = torch.einsum("htd,hdc->htc", k_heads, w_q) * width ** -0.5
        values = torch.einsum("htd,hdc->htc", v_heads, w_out)
    return FoldedIDAttention(keys.reshape(heads * tokens, -1).t().contiguous().to(dtype),
                             values.reshape(heads * tokens, -1).contiguous().to(dtype), heads, tokens)


def folded_residual(ca: IDCrossAttention, folded: FoldedIDAttention, image_tokens: torch.Tensor) -> torch.Tensor:
    """``ca(id_tokens, image_tokens)`` for the folded ID: ``[B, N, dim]``."""
    queries = ca.norm2(image_tokens)
    batch, n = queries.shape[:2]
    logits = (queries @ folded.keys).view(batch, n, folded.heads, folded.tokens)
    weights = torch.softmax(logits.float(), dim=-1).to(queries.dtype)    # fp32 softmax, as the fused kernels do
    return weights.view(batch, n, folded.heads * folded.tokens) @ folded.values
