"""Attention arithmetic used by the engine (plain torch, no host).

Layouts: ``[B, N, C]`` is the host's head-merged layout (C = heads * dim_head); ``[B, H, N, d]`` is the
per-head layout SDPA takes.

Joint attention over key blocks ``[K_c; K_1; ...; K_n]`` is computed as a *merge* of one attention per
block, exact up to float rounding: for block b with output ``o_b`` and log-sum-exp ``l_b`` of its
logits, ``softmax over all keys · V = sum_b exp(l_b - L) o_b`` with ``L = logsumexp_b l_b``. An additive
per-query bias on a whole block (Eq. 7's -inf, a weight's ``log w``) just adds to ``l_b``. This avoids
concatenating thousands of keys per call, materialising a ``[Nq, Nk]`` mask, and lets rows that carry
no identity (e.g. the negative chunk) skip the face keys. The fused kernels return ``l_b`` without
gradient, so when autograd is recording the engine uses :func:`joint_attention_concat` instead.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H*d]`` → ``[B, H, N, d]`` (a view when possible)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, d]`` → ``[B, N, H*d]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain attention in the host layout: ``[B,Nq,C]`` x ``[B|1,Nk,C]`` → ``[B,Nq,C]``.

    ``mask`` is additive, broadcastable to ``[B, H, Nq, Nk]`` (``[B,Nq,Nk]`` gets a head axis).
    """
    q4, k4, v4 = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    if k4.shape[0] != q4.shape[0]:
        k4, v4 = k4.expand(q4.shape[0], -1, -1, -1), v4.expand(q4.shape[0], -1, -1, -1)
    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return merge_heads(F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask))


def _lse_reference(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor,
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with log-sum-exp, any device/dtype; query-chunked to bound memory."""
    scale = 1.0 / math.sqrt(q4.shape[-1])
    outs, lses = [], []
    for start in range(0, q4.shape[2], chunk):
        logits = torch.matmul(q4[:, :, start:start + chunk].float(), k4.float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(logits, dim=-1)
        outs.append(torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), v4.float()).to(q4.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def attention_with_lse(q4: torch.Tensor, k4: torch.Tensor,
                       v4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in head layout plus its log-sum-exp: ``(o [B,H,Nq,d], lse [B,H,Nq] float32)``.

    Uses the fused CPU flash kernel or the CUDA memory-efficient kernel when available (keys may be
    batch-broadcast with ``expand``), else a chunked reference. The ``lse`` carries no gradient.
    """
    if k4.shape[0] != q4.shape[0]:
        k4, v4 = k4.expand(q4.shape[0], -1, -1, -1), v4.expand(q4.shape[0], -1, -1, -1)
    try:
        if q4.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q4, k4, v4)[:2]
            return out, lse.float()
        if q4.device.type == "cuda":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q4, k4, v4, None, True)[:2]
            return out, lse[..., :q4.shape[2]].float()
    except (RuntimeError, NotImplementedError, AttributeError):
        pass  # unsupported dtype/shape/backend: fall back
    return _lse_reference(q4, k4, v4)


def merge_into(acc_o: torch.Tensor, acc_lse: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one more key block (``o``, ``lse``; -inf lse = fully blocked) into the running result.

    All ``[R, H, Nq, d]`` / ``[R, H, Nq]``. The running lse must be finite (the text block always is).
    """
    new_lse = torch.logaddexp(acc_lse, lse)
    keep = torch.exp(acc_lse - new_lse).unsqueeze(-1)
    add = torch.exp(lse - new_lse).unsqueeze(-1)
    merged = acc_o.float() * keep + o.float() * add
    return merged.to(acc_o.dtype), new_lse


def joint_attention_concat(q: torch.Tensor, k_blocks: Sequence[torch.Tensor], v_blocks: Sequence[torch.Tensor],
                           heads: int, block_bias: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Eq. 3/6 literally: one softmax over the concatenated keys ``[K_0; K_1; ...]``.

    ``k_blocks[i]``: ``[B|1, N_i, C]``. ``block_bias[i]``: None or an additive per-query bias
    ``[B|1, Nq]`` for every key of block i (-inf blocks it; ``log w`` weights it). Differentiable.
    """
    b = q.shape[0]
    ks = [k.expand(b, -1, -1) for k in k_blocks]
    vs = [v.expand(b, -1, -1) for v in v_blocks]
    mask = None
    if block_bias is not None and any(bias is not None for bias in block_bias):
        cols = []
        for k, bias in zip(ks, block_bias, strict=True):
            if bias is None:
                cols.append(q.new_zeros(1, q.shape[1], 1).expand(b, -1, k.shape[1]))
            else:
                cols.append(bias.to(q.dtype).expand(b, -1).unsqueeze(-1).expand(-1, -1, k.shape[1]))
        mask = torch.cat(cols, dim=2)  # [B, Nq, Nk]
    return sdpa(q, torch.cat(ks, dim=1), torch.cat(vs, dim=1), heads, mask)


def joint_attention_weights(q: torch.Tensor, k: torch.Tensor, heads: int,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """The explicit softmax ``S = softmax(M + QK^T/sqrt(d))`` ``[B, H, Nq, Nk]`` (tests, small inputs)."""
    q4, k4 = split_heads(q, heads), split_heads(k.expand(q.shape[0], -1, -1), heads)
    logits = torch.matmul(q4, k4.transpose(-1, -2)) / math.sqrt(q4.shape[-1])
    if mask is not None:
        logits = logits + (mask.unsqueeze(1) if mask.ndim == 3 else mask)
    return torch.softmax(logits, dim=-1)


def reference_grid(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The token grid ``(h, w)`` of a reference at a site: the latent size halved (rounding up, like the
    UNet's stride-2 convs) until ``h * w == tokens``; None if no level matches."""
    h, w = latent_hw
    for _ in range(8):
        if h * w == tokens:
            return h, w
        h, w = -(-h // 2), -(-w // 2)
    return None


def pooling_window(references: int, budget: float, grid: tuple[int, int]) -> tuple[int, int]:
    """Smallest power-of-two window ``(kh, kw)`` (widths doubled first) so that ``references`` references
    pooled by it hold at most ``budget`` references' worth of keys; ``(1, 1)`` when already within budget
    (``budget <= 0``: no limit). Never larger than the grid."""
    kh = kw = 1
    if budget <= 0:
        return kh, kw
    while references / (kh * kw) > budget and (kh < grid[0] or kw < grid[1]):
        if kw <= kh and kw < grid[1]:
            kw *= 2
        else:
            kh *= 2
    return kh, kw


def pool_key_grid(x: torch.Tensor, grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """Average keys (or values) ``[B, h*w, C]`` over ``window`` blocks of their ``grid`` → ``[B, N', C]``.

    Key downsampling as ToDo (Smith et al. 2024) does for SD's high-resolution self-attention; pair it with
    a ``log(kh*kw)`` logit bias on the pooled block (ToMe's proportional attention, Bolya et al. 2023) so a
    pooled key carries the attention mass of the keys it stands for: exact when a window's keys and values
    are equal, a close approximation for the spatially smooth reference features. Edge windows of a grid
    not divisible by the window average fewer tokens.
    """
    if window == (1, 1):
        return x
    b, n, c = x.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"grid {grid} does not hold {n} tokens")
    image = x.transpose(1, 2).reshape(b, c, h, w)
    pooled = F.avg_pool2d(image, window, stride=window, ceil_mode=True, count_include_pad=False)
    return pooled.flatten(2).transpose(1, 2)
