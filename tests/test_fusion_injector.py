"""FusionInjector at one site with plain tensors: Eq. 3/6/7 through the real engine, uncond modes,
per-row references, capture requests."""
from __future__ import annotations

import math

import pytest
import torch

from likeness.attention_patches import (
    PASS_KEY,
    AttentionSite,
    CapturedStates,
    ChunkLayout,
    IdentityAttentionPatch,
    PassContext,
)
from likeness.attention_patches.kernels import joint_attention_weights, sdpa
from likeness.attention_patches.masks import eq7_additive_mask
from likeness.errors import InvalidInputError
from likeness.techniques.face_fusion import FusionAdapter, FusionIdentityLatents, FusionInjector

C, HEADS, GRID = 16, 2, (4, 4)
SITE = AttentionSite(index=0, block=("input", 1), block_index=0, transformer_index=0, channels=C, heads=HEADS,
                     dim_head=C // HEADS, context_dim=C, order=0, level=0)
N_H = 6  # reference tokens per image at this site (toy)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _adapter():
    adapter = FusionAdapter({1: C})
    with torch.no_grad():
        adapter.sites["1"].to_k_f.weight.copy_(_rand(C, C, seed=1) * 0.3)
        adapter.sites["1"].to_v_f.weight.copy_(_rand(C, C, seed=2) * 0.3)
    adapter.requires_grad_(False)
    return adapter


def _identity(n, mask=None, seed=0):
    return FusionIdentityLatents(_rand(n, 4, 8, 8, seed=seed), mask)


def _run(injector, h_f, cond_or_uncond=(1, 0), chunk=1, seed=3):
    patch = IdentityAttentionPatch([SITE])
    patch.add(injector)
    states = CapturedStates(("step", 1.0), {0: h_f})
    ctx = PassContext(1.0, None, patch.active_at(1.0, None), {injector.uid: states})
    batch = chunk * len(cond_or_uncond)
    q, k, v = _rand(batch, 16, C, seed=seed), _rand(batch, 5, C, seed=seed + 1), _rand(batch, 5, C, seed=seed + 2)
    opts = {"block": SITE.block, "block_index": 0, "n_heads": HEADS, "cond_or_uncond": list(cond_or_uncond),
            "activations_shape": [batch, C, *GRID], PASS_KEY: ctx}
    with torch.no_grad():
        return patch(q, k, v, opts), (q, k, v)


def _kv(adapter, h):
    return h @ adapter.sites["1"].to_k_f.weight.T, h @ adapter.sites["1"].to_v_f.weight.T


def test_one_reference_is_eq3_on_positive_rows_only():
    adapter = _adapter()
    h_f = _rand(1, N_H, C, seed=9)
    out, (q, k, v) = _run(FusionInjector(adapter, [_identity(1)]), h_f)
    k_f, v_f = _kv(adapter, h_f)
    assert torch.allclose(out[0], sdpa(q[:1], k[:1], v[:1], HEADS)[0], atol=1e-5)     # negative: text only
    joint = sdpa(q[1:], torch.cat([k[1:], k_f], 1), torch.cat([v[1:], v_f], 1), HEADS)
    assert torch.allclose(out[1:], joint, atol=1e-5)


def test_multi_reference_is_eq6():
    adapter = _adapter()
    h_f = _rand(3, N_H, C, seed=9)
    out, (q, k, v) = _run(FusionInjector(adapter, [_identity(3)], reference_budget=0), h_f, cond_or_uncond=(0,))
    k_f, v_f = _kv(adapter, h_f)
    eq6 = sdpa(q, torch.cat([k, k_f[0:1], k_f[1:2], k_f[2:3]], 1), torch.cat([v, v_f[0:1], v_f[1:2], v_f[2:3]], 1), HEADS)
    assert torch.allclose(out, eq6, atol=1e-5)


def _run_with_states(injector, h_f, seed=3):
    patch = IdentityAttentionPatch([SITE])
    patch.add(injector)
    states = CapturedStates(("step", 1.0), {0: h_f})
    ctx = PassContext(1.0, None, patch.active_at(1.0, None), {injector.uid: states})
    q, k, v = _rand(1, 16, C, seed=seed), _rand(1, 5, C, seed=seed + 1), _rand(1, 5, C, seed=seed + 2)
    opts = {"block": SITE.block, "block_index": 0, "n_heads": HEADS, "cond_or_uncond": [0],
            "activations_shape": [1, C, *GRID], PASS_KEY: ctx}
    with torch.no_grad():
        return patch(q, k, v, opts), states


def test_reference_budget_pools_keys_with_proportional_attention():
    """4 references over a budget of 2: each reference's 4x4 token grid is pooled by 1x2 windows with a log 2
    bias. Exact when the two tokens of every window are equal; a close approximation otherwise."""
    adapter = _adapter()
    coarse = _rand(4, 4, 2, C, seed=9)                                   # refs, grid rows, half the columns
    h_pairs = coarse.repeat_interleave(2, dim=2).reshape(4, 16, C)      # equal tokens in each 1x2 window
    exact, _ = _run_with_states(FusionInjector(adapter, [_identity(4)], reference_budget=0), h_pairs)
    pooled, states = _run_with_states(FusionInjector(adapter, [_identity(4)], reference_budget=2), h_pairs)
    ((slot, (k_p, v_p)),) = [(s, kv) for s, kv in states.derived.items() if s[1] == "pooled"]
    assert slot[3] == (1, 2) and k_p.shape == (1, 4 * 8, C) == v_p.shape   # 2 references' worth of keys
    torch.testing.assert_close(pooled, exact, rtol=1e-5, atol=1e-5)
    h_rand = _rand(4, 16, C, seed=11)
    exact, _ = _run_with_states(FusionInjector(adapter, [_identity(4)], reference_budget=0), h_rand)
    approx, _ = _run_with_states(FusionInjector(adapter, [_identity(4)], reference_budget=2), h_rand)
    text_only, _ = _run_with_states(FusionInjector(adapter, [_identity(4)], weight=0.0), h_rand)
    assert (approx - exact).norm() < 0.5 * (text_only - exact).norm()   # far closer than dropping the face
    within, _ = _run_with_states(FusionInjector(adapter, [_identity(2)], reference_budget=2), h_rand[:2])
    exact2, _ = _run_with_states(FusionInjector(adapter, [_identity(2)], reference_budget=0), h_rand[:2])
    assert torch.equal(within, exact2)                                  # within budget: Eq. 6 untouched
    with pytest.raises(InvalidInputError):
        FusionInjector(adapter, [_identity(1)], reference_budget=-1)


def test_uncond_modes():
    adapter = _adapter()
    h_f = _rand(1, N_H, C, seed=9)
    same, (q, k, v) = _run(FusionInjector(adapter, [_identity(1)], uncond="same"), h_f)
    k_f, v_f = _kv(adapter, h_f)
    assert torch.allclose(same[0], sdpa(q[:1], torch.cat([k[:1], k_f], 1), torch.cat([v[:1], v_f], 1), HEADS)[0], atol=1e-5)
    zeros, _ = _run(FusionInjector(adapter, [_identity(1)], uncond="zeros"), h_f)
    zk = torch.zeros(1, N_H, C)
    assert torch.allclose(zeros[0], sdpa(q[:1], torch.cat([k[:1], zk], 1), torch.cat([v[:1], zk], 1), HEADS)[0], atol=1e-5)
    assert torch.allclose(zeros[1], same[1], atol=1e-6)


def test_two_identities_with_masks_follow_eq7():
    adapter = _adapter()
    left, right = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    left[:, :, :4] = 1
    right[:, :, 4:] = 1
    h_f = _rand(2, N_H, C, seed=9)   # identity A's reference, then B's
    injector = FusionInjector(adapter, [_identity(1, left), _identity(1, right, seed=1)])
    out, (q, k, v) = _run(injector, h_f, cond_or_uncond=(0,))
    k_f, v_f = _kv(adapter, h_f)
    inside = torch.stack([torch.tensor([x < 2 for y in range(4) for x in range(4)]),
                          torch.tensor([x >= 2 for y in range(4) for x in range(4)])])
    mask = eq7_additive_mask(inside, 5, [N_H, N_H]).unsqueeze(0)
    keys = torch.cat([k, k_f[0:1], k_f[1:2]], 1)
    explicit = sdpa(q, keys, torch.cat([v, v_f[0:1], v_f[1:2]], 1), HEADS, mask)
    assert torch.allclose(out, explicit, atol=1e-5)
    weights = joint_attention_weights(q, keys, HEADS, mask)
    assert torch.all(weights[0, :, inside[0]][..., 5 + N_H:] == 0)    # A's queries: zero weight on B's keys
    assert torch.all(weights[0, :, inside[1]][..., 5:5 + N_H] == 0)


def test_single_identity_mask_limits_face_keys_to_the_region():
    adapter = _adapter()
    mask = torch.zeros(1, 8, 8)
    mask[:, :4] = 1                                              # top half
    out, (q, k, v) = _run(FusionInjector(adapter, [_identity(1, mask)]), _rand(1, N_H, C, seed=9), cond_or_uncond=(0,))
    top = torch.arange(16) < 8
    assert torch.allclose(out[0, ~top], sdpa(q, k, v, HEADS)[0, ~top], atol=1e-5)
    assert not torch.allclose(out[0, top], sdpa(q, k, v, HEADS)[0, top], atol=1e-3)


def test_weight_zero_is_exact_and_weight_scales_face_mass():
    adapter = _adapter()
    h_f = _rand(1, N_H, C, seed=9)
    off, (q, k, v) = _run(FusionInjector(adapter, [_identity(1)], weight=0.0), h_f)
    patch = IdentityAttentionPatch([SITE])
    assert torch.equal(off, sdpa(q, k, v, HEADS))
    strong, _ = _run(FusionInjector(adapter, [_identity(1)], weight=3.0), h_f)
    k_f, v_f = _kv(adapter, h_f)
    bias = torch.cat([torch.zeros(16, 5), torch.full((16, N_H), math.log(3.0))], 1).unsqueeze(0)
    assert torch.allclose(strong[1:], sdpa(q[1:], torch.cat([k[1:], k_f], 1), torch.cat([v[1:], v_f], 1), HEADS, bias),
                          atol=1e-5)
    del patch


def test_per_row_references_for_training():
    adapter = _adapter()
    h_f = _rand(2, N_H, C, seed=9)
    injector = FusionInjector(adapter, [_identity(2)], per_row=True)
    out, (q, k, v) = _run(injector, h_f, cond_or_uncond=(0,), chunk=2)
    k_f, v_f = _kv(adapter, h_f)
    for row in range(2):
        expected = sdpa(q[row:row + 1], torch.cat([k[row:row + 1], k_f[row:row + 1]], 1),
                        torch.cat([v[row:row + 1], v_f[row:row + 1]], 1), HEADS)
        assert torch.allclose(out[row:row + 1], expected, atol=1e-5)


def test_capture_requests_per_mode():
    adapter = _adapter()
    layout = ChunkLayout((1, 0), 1)
    t = torch.tensor([7.0, 7.0])

    class Sampling:
        def percent_to_sigma(self, p):
            return 10.0 * (1 - p)

    per_step = FusionInjector(adapter, [_identity(2)]).capture_request(t, 7.0, layout, Sampling())
    assert per_step.key[1:] == ("step", 7.0) and not per_step.cached and per_step.template_row == 1
    assert per_step.sigma.tolist() == [7.0, 7.0]
    clean = FusionInjector(adapter, [_identity(1)], capture_mode="cached_clean").capture_request(t, 7.0, layout, None)
    assert clean.cached and clean.sigma.tolist() == [0.0]
    fixed = FusionInjector(adapter, [_identity(1)], capture_mode="cached_sigma", capture_percent=0.25)
    request = fixed.capture_request(t, 7.0, layout, Sampling())
    assert request.sigma.tolist() == [7.5] and request.key[1:] == ("sigma", 0.25, 7.5)
    version = fixed.capture_request(t, 7.0, layout, Sampling()).key[0]
    fixed.set_identities([_identity(1, seed=5)])
    assert fixed.capture_request(t, 7.0, layout, Sampling()).key[0] != version   # new references: new capture


def test_invalid_options():
    adapter = _adapter()
    with pytest.raises(InvalidInputError):
        FusionInjector(adapter, [_identity(1)], capture_mode="sometimes")
    with pytest.raises(InvalidInputError):
        FusionInjector(adapter, [_identity(1)], uncond="maybe")
    with pytest.raises(InvalidInputError):
        FusionInjector(adapter, [])
    with pytest.raises(InvalidInputError):
        FusionInjector(adapter, [_identity(1), FusionIdentityLatents(torch.zeros(1, 4, 16, 16))])


def test_to_moves_what_the_injector_owns_and_a_shared_adapter_stays_with_the_loaded_model():
    adapter = _adapter()
    mask = torch.ones(1, 8, 8)
    loaded = FusionInjector(adapter, [_identity(1, mask)], reference_context=_rand(1, 7, C, seed=5))
    other = FusionInjector(adapter, [_identity(1, seed=4)])
    meta, cpu = torch.device("meta"), torch.device("cpu")       # meta stands for the accelerator here
    assert loaded.to(meta) is loaded                           # this model is loaded
    other.to(cpu)                                              # the other model is detached meanwhile
    assert all(p.is_meta for p in adapter.parameters())        # ... and leaves the shared adapter in place
    refs = loaded.references
    assert refs.latents.is_meta and refs.noise.is_meta and loaded.reference_context.is_meta
    assert loaded.masks[0].mask.is_meta and other.references.latents.device == cpu
