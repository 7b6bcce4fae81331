"""Joint attention: the text keys and the injectors' :class:`~.injectors.KeyGroup` s in one softmax.

``out = softmax([q K_c; q K_1; ...; q K_n] + biases) [V_c; V_1; ...; V_n]`` (Face Fusion Eq. 3/6/7), where
each group is visible to its own batch rows, carries a log-weight and optionally a per-query bias.

Two exact forms of the same result (see :mod:`.kernels`):

- outside autograd, one attention per key block merged by log-sum-exp: rows without identity skip the
  face keys, Eq. 7 needs no ``[Nq, Nk]`` mask, and an "all-zero keys" group costs nothing;
- under autograd (training), one softmax over the concatenated keys, because the fused kernels return the
  log-sum-exp without gradient.
"""
from __future__ import annotations

import math

import torch

from .injectors import AttentionCall, KeyGroup, row_index, take_rows
from .kernels import attention_with_lse, joint_attention_concat, merge_heads, merge_into, sdpa, split_heads


def joint_attention(call: AttentionCall, groups: list[KeyGroup],
                    keep_text: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(joint output [B, Nq, C], text-only attention or None)``; ``keep_text`` asks for the text-only
    attention too (it comes for free from the merge's first block)."""
    if torch.is_grad_enabled() and (call.q.requires_grad or any(g.k is not None and g.k.requires_grad
                                                                  for g in groups)):
        text_only = sdpa(call.q, call.k_text, call.v_text, call.heads) if keep_text else None
        return concatenated_joint(call, groups), text_only
    return merged_joint(call, groups, keep_text)


def merged_joint(call: AttentionCall, groups: list[KeyGroup],
                 keep_text: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One attention per key block, merged by log-sum-exp into the text attention of each group's rows."""
    q, heads = call.q, call.heads
    q4 = split_heads(q, heads)
    o, lse = attention_with_lse(q4, split_heads(call.k_text, heads), split_heads(call.v_text, heads))
    text_only = merge_heads(o).clone() if keep_text else None  # o is updated in place below
    for group in groups:
        index = row_index(group.rows, q.shape[0], q.device)
        if group.zero_keys:   # Nk all-zero keys and values: output 0, log-sum-exp log(Nk)
            rows_n = len(group.rows)
            o_g = torch.zeros((rows_n,) + tuple(o.shape[1:]), dtype=o.dtype, device=o.device)
            l_g = torch.full((rows_n,) + tuple(lse.shape[1:]), math.log(group.zero_keys), dtype=lse.dtype,
                             device=lse.device)
        else:
            o_g, l_g = attention_with_lse(take_rows(q4, index), split_heads(group.k.to(q.dtype), heads),
                                          split_heads(group.v.to(q.dtype), heads))
        if group.log_weight:
            l_g = l_g + group.log_weight
        if group.query_bias is not None:
            l_g = l_g + group.query_bias.to(l_g.dtype).unsqueeze(1)
        o[index], lse[index] = merge_into(take_rows(o, index), take_rows(lse, index), o_g, l_g)
    return merge_heads(o), text_only


def concatenated_joint(call: AttentionCall, groups: list[KeyGroup]) -> torch.Tensor:
    """Differentiable joint attention: every block scattered to all rows, rows outside a block masked."""
    q = call.q
    batch, n_q = q.shape[0], q.shape[1]
    k_blocks, v_blocks, biases = [call.k_text], [call.v_text], [None]
    for group in groups:
        index = torch.tensor(group.rows, dtype=torch.long, device=q.device)
        if group.zero_keys:
            k_g = q.new_zeros(1, group.zero_keys, q.shape[2])
            v_g = k_g
        else:
            k_g, v_g = group.k.to(q.dtype), group.v.to(q.dtype)
        n_k = k_g.shape[1]
        k_full = q.new_zeros(batch, n_k, q.shape[2]).index_copy(0, index, k_g.expand(len(group.rows), -1, -1))
        v_full = q.new_zeros(batch, n_k, q.shape[2]).index_copy(0, index, v_g.expand(len(group.rows), -1, -1))
        row_bias = torch.full((batch, n_q), float("-inf"), dtype=torch.float32, device=q.device)
        inside = torch.full((len(group.rows), n_q), float(group.log_weight), dtype=torch.float32, device=q.device)
        if group.query_bias is not None:
            inside = inside + group.query_bias.to(torch.float32)
        biases.append(row_bias.index_copy(0, index, inside))
        k_blocks.append(k_full)
        v_blocks.append(v_full)
    return joint_attention_concat(q, k_blocks, v_blocks, call.heads, biases)
