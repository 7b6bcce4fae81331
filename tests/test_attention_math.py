"""Plain-tensor proofs of the engine's attention arithmetic (no host).

- joint attention (merge of per-block attentions via log-sum-exp) equals the explicit softmax over the
  concatenated keys K' = [K_c; K_f] (Eq. 3-5);
- multi-reference equals Eq. 6 (one softmax over [K_c; K_f1; ...; K_fn], order kept);
- with the Eq. 7 mask a query inside identity A's mask puts exactly zero weight on identity B's keys,
  and the fast path gives the same output as the explicit masked softmax.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from likeness.attention_patches.kernels import (
    attention_with_lse,
    joint_attention_concat,
    joint_attention_weights,
    merge_heads,
    merge_into,
    sdpa,
    split_heads,
)
from likeness.attention_patches.masks import eq7_additive_mask, eq7_allowed, eq7_bias

HEADS = 4
C = 32


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _explicit(q, k, v, mask=None):
    """Eq. 4-5 written out: S = softmax(M + QK^T / sqrt(d)), h = S V (per head)."""
    weights = joint_attention_weights(q, k, HEADS, mask)
    v4 = split_heads(v.expand(q.shape[0], -1, -1), HEADS)
    return merge_heads(torch.matmul(weights, v4)), weights


def _merged(q, blocks, biases=None):
    """The engine's fast path: one attention per key block, merged by log-sum-exp."""
    q4 = split_heads(q, HEADS)
    o, lse = None, None
    for i, (k, v) in enumerate(blocks):
        o_b, l_b = attention_with_lse(q4, split_heads(k, HEADS), split_heads(v, HEADS))
        if biases is not None and biases[i] is not None:
            l_b = l_b + biases[i].unsqueeze(1)
        if o is None:
            o, lse = o_b, l_b
        else:
            o, lse = merge_into(o, lse, o_b, l_b)
    return merge_heads(o)


def test_lse_kernel_matches_explicit_logsumexp():
    q, k, v = _rand(2, 40, C, seed=1), _rand(2, 23, C, seed=2), _rand(2, 23, C, seed=3)
    o, lse = attention_with_lse(split_heads(q, HEADS), split_heads(k, HEADS), split_heads(v, HEADS))
    logits = torch.matmul(split_heads(q, HEADS), split_heads(k, HEADS).transpose(-1, -2)) / math.sqrt(C // HEADS)
    assert torch.allclose(lse, torch.logsumexp(logits, -1), atol=1e-5)
    assert torch.allclose(merge_heads(o), sdpa(q, k, v, HEADS), atol=1e-6)


@pytest.mark.parametrize("n_text,n_face", [(77, 64), (7, 300)])
def test_joint_attention_equals_explicit_concatenated_softmax(n_text, n_face):
    q = _rand(2, 64, C, seed=1)
    k_c, v_c = _rand(2, n_text, C, seed=2), _rand(2, n_text, C, seed=3)
    k_f, v_f = _rand(1, n_face, C, seed=4), _rand(1, n_face, C, seed=5)   # one reference, shared by both rows
    explicit, weights = _explicit(q, torch.cat([k_c, k_f.expand(2, -1, -1)], 1), torch.cat([v_c, v_f.expand(2, -1, -1)], 1))
    assert weights.shape[-1] == n_text + n_face                           # S is Nh x (Nc + Nh)
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
    fast = _merged(q, [(k_c, v_c), (k_f, v_f)])
    assert torch.allclose(fast, explicit, atol=1e-5), (fast - explicit).abs().max()
    concat = joint_attention_concat(q, [k_c, k_f], [v_c, v_f], HEADS)
    assert torch.allclose(concat, explicit, atol=1e-5)


def test_multi_reference_equals_eq6_in_order():
    q = _rand(1, 50, C, seed=1)
    k_c, v_c = _rand(1, 77, C, seed=2), _rand(1, 77, C, seed=3)
    refs_k = [_rand(1, 30, C, seed=10 + i) for i in range(3)]
    refs_v = [_rand(1, 30, C, seed=20 + i) for i in range(3)]
    eq6, _ = _explicit(q, torch.cat([k_c] + refs_k, 1), torch.cat([v_c] + refs_v, 1))
    # the engine concatenates an identity's references into one block (Eq. 6) ...
    block = _merged(q, [(k_c, v_c), (torch.cat(refs_k, 1), torch.cat(refs_v, 1))])
    assert torch.allclose(block, eq6, atol=1e-5)
    # ... which equals merging them one by one: the softmax is over all keys at once
    separate = _merged(q, [(k_c, v_c)] + list(zip(refs_k, refs_v, strict=True)))
    assert torch.allclose(separate, eq6, atol=1e-5)
    # and differs from a single reference (the references really contribute)
    single, _ = _explicit(q, torch.cat([k_c, refs_k[0]], 1), torch.cat([v_c, refs_v[0]], 1))
    assert not torch.allclose(single, eq6, atol=1e-3)


def test_weight_is_a_log_bias_on_the_face_block():
    q = _rand(1, 20, C, seed=1)
    k_c, v_c, k_f, v_f = (_rand(1, n, C, seed=s) for n, s in ((77, 2), (77, 3), (40, 4), (40, 5)))
    w = 0.3
    mask = torch.cat([torch.zeros(20, 77), torch.full((20, 40), math.log(w))], 1).unsqueeze(0)
    explicit, weights = _explicit(q, torch.cat([k_c, k_f], 1), torch.cat([v_c, v_f], 1), mask)
    fast = _merged(q, [(k_c, v_c), (k_f, v_f)], [None, torch.full((1, 20), math.log(w))])
    assert torch.allclose(fast, explicit, atol=1e-5)
    plain = joint_attention_weights(q, torch.cat([k_c, k_f], 1), HEADS)
    # face mass scaled by w relative to the text mass
    ratio = (weights[..., 77:].sum(-1) / weights[..., :77].sum(-1)) / (plain[..., 77:].sum(-1) / plain[..., :77].sum(-1))
    assert torch.allclose(ratio, torch.full_like(ratio, w), atol=1e-4)


def test_eq7_blocks_other_identities_exactly():
    # 6x6 token grid; identity A's mask = left half, B's = right half, both overlap column 2..3
    grid = torch.zeros(2, 6, 6, dtype=torch.bool)
    grid[0, :, :3] = True
    grid[1, :, 3:] = True
    grid[1, 0, 2] = True          # one query inside both masks
    inside = grid.reshape(2, 36)
    inside[:, 35] = False         # one query inside no mask
    allowed = eq7_allowed(inside)
    n_text, n_a, n_b = 5, 7, 9
    mask = eq7_additive_mask(inside, n_text, [n_a, n_b])
    assert mask.shape == (36, n_text + n_a + n_b)
    q = _rand(1, 36, C, seed=1)
    k = _rand(1, n_text + n_a + n_b, C, seed=2)
    v = _rand(1, n_text + n_a + n_b, C, seed=3)
    explicit, weights = _explicit(q, k, v, mask.unsqueeze(0))
    a_keys, b_keys = slice(n_text, n_text + n_a), slice(n_text + n_a, None)
    only_a = inside[0] & ~inside[1]
    only_b = inside[1] & ~inside[0]
    both = inside[0] & inside[1]
    assert only_a.any() and only_b.any() and both.any()
    # a query inside A's mask puts exactly zero weight on B's keys (and vice versa)
    assert torch.all(weights[0, :, only_a][..., b_keys] == 0)
    assert torch.all(weights[0, :, only_b][..., a_keys] == 0)
    assert torch.all(weights[0, :, only_a][..., a_keys] > 0)
    # inside both: neither identity; outside all masks: both identities
    assert torch.all(weights[0, :, both][..., n_text:] == 0)
    assert torch.all(weights[0, :, 35][..., n_text:] > 0)
    assert allowed[:, 35].all()
    # the engine's fast path (per-identity query bias, merged) equals the explicit masked softmax
    bias = eq7_bias(inside)
    fast = _merged(q, [(k[:, :n_text], v[:, :n_text]), (k[:, a_keys], v[:, a_keys]), (k[:, b_keys], v[:, b_keys])],
                   [None, bias[0:1], bias[1:2]])
    assert torch.allclose(fast, explicit, atol=1e-5)
    # changing B's values never changes the outputs at queries only inside A's mask
    v2 = v.clone()
    v2[:, b_keys] += 100.0
    fast2 = _merged(q, [(k[:, :n_text], v2[:, :n_text]), (k[:, a_keys], v2[:, a_keys]), (k[:, b_keys], v2[:, b_keys])],
                    [None, bias[0:1], bias[1:2]])
    assert torch.equal(fast2[0, only_a], fast[0, only_a])


def test_concat_path_with_bias_is_differentiable_and_matches():
    q = _rand(2, 16, C, seed=1).requires_grad_()
    k_c, v_c = _rand(2, 5, C, seed=2), _rand(2, 5, C, seed=3)
    k_f, v_f = _rand(1, 8, C, seed=4).requires_grad_(), _rand(1, 8, C, seed=5)
    bias = torch.zeros(2, 16)
    bias[0, :4] = float("-inf")
    out = joint_attention_concat(q, [k_c, k_f], [v_c, v_f], HEADS, [None, bias])
    out.sum().backward()
    assert k_f.grad is not None and torch.isfinite(k_f.grad).all()
    with torch.no_grad():
        fast = _merged(q.detach(), [(k_c, v_c), (k_f.detach(), v_f)], [None, bias])
    assert torch.allclose(out.detach(), fast, atol=1e-5)


def test_pooling_window_and_reference_grid():
    from likeness.attention_patches.kernels import pooling_window, reference_grid

    assert [pooling_window(n, 2, (64, 64)) for n in (1, 2, 3, 4, 8, 16)] == [
        (1, 1), (1, 1), (1, 2), (1, 2), (2, 2), (2, 4)]
    assert pooling_window(8, 0, (64, 64)) == (1, 1)              # 0 = no limit
    assert pooling_window(64, 1, (2, 2)) == (2, 2)               # never beyond the grid
    assert reference_grid(4096, (64, 64)) == (64, 64) and reference_grid(64, (64, 64)) == (8, 8)
    assert reference_grid(20, (9, 7)) == (5, 4)                  # odd sizes round up like stride-2 convs
    assert reference_grid(7, (8, 8)) is None


def test_pooled_keys_with_log_bias_equal_full_attention_on_constant_windows():
    """ToDo-style key pooling + ToMe proportional attention is exact when each window's keys/values are equal."""
    from likeness.attention_patches.kernels import joint_attention_concat, pool_key_grid

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 10, 16, generator=g)
    k_text, v_text = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    coarse_k, coarse_v = torch.randn(1, 16, 3, 3, generator=g), torch.randn(1, 16, 3, 3, generator=g)
    full = [c.repeat_interleave(2, 2).repeat_interleave(2, 3).flatten(2).transpose(1, 2) for c in (coarse_k, coarse_v)]
    pooled = [pool_key_grid(x, (6, 6), (2, 2)) for x in full]
    assert pooled[0].shape == (1, 9, 16)
    exact = joint_attention_concat(q, [k_text, full[0]], [v_text, full[1]], heads=2)
    bias = torch.full((1, 10), math.log(4.0))
    approx = joint_attention_concat(q, [k_text, pooled[0]], [v_text, pooled[1]], heads=2, block_bias=[None, bias])
    torch.testing.assert_close(approx, exact, rtol=1e-5, atol=1e-5)


def test_reference_self_attention_downsampling_is_exact_on_constant_windows():
    """ToDo in the reference pass: with 2x2-constant tokens the pooled self-attention equals the full one
    (the uniform log 4 bias cancels in the softmax); queries keep every token."""
    from likeness.attention_patches.capture import ReferenceKeyDownsampling
    from likeness.attention_patches.kernels import sdpa

    torch.manual_seed(0)
    coarse = torch.randn(2, 16, 8, 8)
    n = F.interpolate(coarse, scale_factor=2, mode="nearest").flatten(2).transpose(1, 2)   # [2, 256, 16]
    pool = ReferenceKeyDownsampling(2, tokens=256)
    q, k, v = pool(n, n, n, {"activations_shape": [2, 16, 16, 16]})
    assert q is n and k.shape == (2, 64, 16) and v is k
    torch.testing.assert_close(sdpa(q, k, v, heads=2), sdpa(n, n, n, heads=2), rtol=1e-5, atol=1e-5)


def test_reference_self_attention_downsampling_leaves_other_calls_alone():
    from likeness.attention_patches.capture import ReferenceKeyDownsampling

    n = torch.randn(1, 63, 8)
    context = torch.randn(1, 77, 8)
    pool = ReferenceKeyDownsampling(2, tokens=63)
    extra = {"activations_shape": [1, 8, 7, 9]}
    assert pool(n, context, context, extra)[1] is context                    # cross-attention context
    smaller = torch.randn(1, 16, 8)
    assert pool(smaller, smaller, smaller, {"activations_shape": [1, 8, 4, 4]})[1] is smaller  # lower level
    assert pool(n, n, n, {})[1] is n                                          # grid unknown
    k = pool(n, n, n, extra)[1]
    assert k.shape == (1, 4 * 5, 8)                                            # odd grid: ceil windows
    assert ReferenceKeyDownsampling(1, tokens=63)(n, n, n, extra)[1] is n
    with pytest.raises(ValueError):
        ReferenceKeyDownsampling(0, tokens=63)
