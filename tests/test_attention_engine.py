"""The patch object and injectors with plain tensors (no host): batching, gating, stacking, clones."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from likeness.attention_patches import (
    PASS_KEY,
    AttentionSite,
    CapturedStates,
    ChunkLayout,
    DecoupledInjector,
    EngineStats,
    IdentityAttentionPatch,
    JointInjector,
    KeyGroup,
    PassContext,
    SigmaRange,
    SiteWeights,
)
from likeness.attention_patches.kernels import sdpa
from likeness.attention_patches.sites import sites_by_key
from likeness.errors import InvalidInputError

HEADS = 2
C = 16


def _site(index=0, block=("input", 1), block_index=0, group_order=0):
    return AttentionSite(index=index, block=block, block_index=block_index, transformer_index=index, channels=C,
                         heads=HEADS, dim_head=C // HEADS, context_dim=C, order=group_order, level=0)


SITES = (_site(0, ("input", 1)), _site(1, ("middle", 0)), _site(2, ("output", 3)))


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _options(site, cond_or_uncond=(0,), ctx=None, grid=(4, 4)):
    opts = {"block": site.block, "block_index": site.block_index, "n_heads": HEADS,
            "activations_shape": [1, C, grid[0], grid[1]], "cond_or_uncond": list(cond_or_uncond)}
    if ctx is not None:
        opts[PASS_KEY] = ctx
    return opts


def _qkv(batch, n_q=16, n_k=6, seed=0):
    return _rand(batch, n_q, C, seed=seed), _rand(batch, n_k, C, seed=seed + 1), _rand(batch, n_k, C, seed=seed + 2)


class TokenProvider:
    """Distinct identity tokens per chunk kind; counts calls."""

    def __init__(self, n_tokens=4, uncond=True):
        self.kv = {0: (_rand(1, n_tokens, C, seed=50), _rand(1, n_tokens, C, seed=51)),
                   1: (_rand(1, n_tokens, C, seed=60), _rand(1, n_tokens, C, seed=61))}
        self.uncond = uncond
        self.calls = 0

    def __call__(self, site, kind):
        self.calls += 1
        if kind == 1 and not self.uncond:
            return None
        return self.kv[kind]


def _patch(*injectors):
    patch = IdentityAttentionPatch(SITES)
    for injector in injectors:
        patch.add(injector)
    return patch


def _ctx(patch, sigma=1.0, captures=None):
    return PassContext(sigma, None, patch.active_at(sigma, None), captures or {})


def test_chunk_layout_rows_and_kinds():
    layout = ChunkLayout.from_options({"cond_or_uncond": [1, 0, 0]}, 6)
    assert layout.chunk_size == 2 and layout.rows_of_kind(0) == [2, 3, 4, 5] and layout.rows_of_kind(1) == [0, 1]
    assert ChunkLayout.from_options({}, 3).cond_or_uncond == (0,)          # direct apply_model: all positive
    assert ChunkLayout.from_options({"cond_or_uncond": [0, 1]}, 3).chunk_size == 3   # inconsistent: one chunk


@pytest.mark.parametrize("cond_or_uncond", [(0, 1), (1, 0), (0,), (1, 0, 0), (0, 1, 0), (0, 0, 1)])
def test_each_chunk_gets_its_own_identity(cond_or_uncond):
    chunk = 2                                             # two latents per chunk ("several conds per chunk")
    batch = chunk * len(cond_or_uncond)
    provider = TokenProvider()
    injector = DecoupledInjector("faceid", provider, weight=0.7)
    patch = _patch(injector)
    q, k, v = _qkv(batch)
    site = SITES[0]
    out = patch(q, k, v, _options(site, cond_or_uncond, _ctx(patch)))
    base = sdpa(q, k, v, HEADS)
    for c, kind in enumerate(cond_or_uncond):
        rows = slice(c * chunk, (c + 1) * chunk)
        k_id, v_id = provider.kv[kind]
        expected = base[rows] + 0.7 * sdpa(q[rows], k_id, v_id, HEADS)
        assert torch.allclose(out[rows], expected, atol=1e-6), (cond_or_uncond, c)


def test_uncond_none_leaves_negative_rows_untouched():
    provider = TokenProvider(uncond=False)
    patch = _patch(DecoupledInjector("faceid", provider, weight=1.0))
    q, k, v = _qkv(3)
    out = patch(q, k, v, _options(SITES[0], (1, 0, 0), _ctx(patch)))
    base = sdpa(q, k, v, HEADS)
    assert torch.equal(out[0], base[0])
    assert not torch.allclose(out[1:], base[1:])


def test_weight_zero_and_sigma_outside_range_are_exactly_the_base():
    q, k, v = _qkv(2)
    base = sdpa(q, k, v, HEADS)
    off = DecoupledInjector("a", TokenProvider(), weight=0.0)
    ranged = DecoupledInjector("b", TokenProvider(), weight=1.0, sigma_range=SigmaRange(0.2, 0.6))

    class Sampling:   # sigma falls linearly from 10 to 0 over the schedule
        def percent_to_sigma(self, p):
            return 10.0 * (1.0 - p)

    ms = Sampling()
    patch = _patch(off, ranged)
    for sigma, active in ((9.0, False), (5.0, True), (3.0, False)):
        ctx = PassContext(sigma, ms, patch.active_at(sigma, ms), {})
        out = patch(q, k, v, _options(SITES[0], (0, 1), ctx))
        assert torch.equal(out, base) is (not active)
    assert ranged.sigma_range.sigmas(ms) == (8.0, 4.0)


def test_site_weights_scale_per_site():
    provider = TokenProvider()
    injector = DecoupledInjector("x", provider, weight=1.0, site_weights=SiteWeights.parse("output", others=0.0))
    patch = _patch(injector)
    q, k, v = _qkv(1)
    base = sdpa(q, k, v, HEADS)
    ctx = _ctx(patch)
    assert torch.equal(patch(q, k, v, _options(SITES[0], (0,), ctx)), base)      # input site: 0
    assert torch.equal(patch(q, k, v, _options(SITES[1], (0,), ctx)), base)      # middle: 0
    assert not torch.allclose(patch(q, k, v, _options(SITES[2], (0,), ctx)), base)
    custom = SiteWeights.parse("custom", "0:1, 2:0.5", others=0.0)
    assert [custom.weight(s) for s in SITES] == [1.0, 0.0, 0.5]
    assert [SiteWeights.parse("custom", "1, 0.25").weight(s) for s in SITES] == [1.0, 0.25, 0.25]
    with pytest.raises(InvalidInputError):
        SiteWeights.parse("custom", "a, b")


class FixedJoint(JointInjector):
    """A joint injector with fixed face keys for positive rows (stands in for Face Fusion)."""

    def __init__(self, k, v, **kw):
        super().__init__("fusion", **kw)
        self.k, self.v = k, v

    def key_groups(self, call, weight):
        return [KeyGroup(self.k, self.v, call.layout.rows_of_kind(0), self.log_weight(weight))]


def test_joint_and_decoupled_stack_at_one_site():
    k_f, v_f = _rand(1, 10, C, seed=70), _rand(1, 10, C, seed=71)
    provider = TokenProvider(uncond=False)
    joint = FixedJoint(k_f, v_f, weight=1.0)
    decoupled = DecoupledInjector("faceid", provider, weight=0.5)
    q, k, v = _qkv(2)
    opts = lambda p: _options(SITES[0], (1, 0), _ctx(p))  # noqa: E731
    both = _patch(joint, decoupled)
    out = both(q, k, v, opts(both))
    joint_only = _patch(joint)(q, k, v, opts(_patch(joint)))
    expected_pos = sdpa(q[1:], torch.cat([k[1:], k_f], 1), torch.cat([v[1:], v_f], 1), HEADS) \
        + 0.5 * sdpa(q[1:], *provider.kv[0], HEADS)
    assert torch.allclose(out[1:], expected_pos, atol=1e-5)        # both applied on the positive chunk
    assert torch.allclose(out[0], sdpa(q[:1], k[:1], v[:1], HEADS)[0], atol=1e-5)  # negative: text only
    assert not torch.allclose(out, joint_only)


def test_joint_under_autograd_uses_the_differentiable_path():
    k_f = _rand(1, 10, C, seed=70).requires_grad_()
    v_f = _rand(1, 10, C, seed=71)
    patch = _patch(FixedJoint(k_f, v_f, weight=2.0))
    q, k, v = _qkv(2)
    out = patch(q, k, v, _options(SITES[0], (0, 1), _ctx(patch)))
    out.sum().backward()
    assert k_f.grad is not None and k_f.grad.abs().sum() > 0
    with torch.no_grad():
        fast = patch(q, k, v, _options(SITES[0], (0, 1), _ctx(patch)))
    assert torch.allclose(out.detach(), fast, atol=1e-5)


def test_previous_patch_at_a_site_is_kept():
    calls = []

    def other_pack(q, k, v, extra_options):       # e.g. an IP-Adapter patch: text attention + something
        calls.append(1)
        return sdpa(q, k, v, HEADS) + 1.0

    k_f, v_f = _rand(1, 10, C, seed=70), _rand(1, 10, C, seed=71)
    patch = _patch(FixedJoint(k_f, v_f))
    patch.previous[0] = other_pack
    q, k, v = _qkv(1)
    out = patch(q, k, v, _options(SITES[0], (0,), _ctx(patch)))
    joint = sdpa(q, torch.cat([k, k_f], 1), torch.cat([v, v_f], 1), HEADS)
    assert calls and torch.allclose(out, joint + 1.0, atol=1e-5)
    off = IdentityAttentionPatch(SITES)
    off.previous[0] = other_pack
    assert torch.allclose(off(q, k, v, _options(SITES[0], (0,), _ctx(off))), sdpa(q, k, v, HEADS) + 1.0)


def test_deepcopy_gives_one_new_patch_per_clone_sharing_injectors():
    injector = DecoupledInjector("faceid", TokenProvider())
    patch = _patch(injector)
    patch.captures[123] = CapturedStates(("x",))
    options = {"transformer_options": {"patches_replace": {"attn2": {s.key: patch for s in SITES}},
                                       "patches": {"attn2_patch": [patch.attn2_input]}}}
    copied = copy.deepcopy(options)
    entries = list(copied["transformer_options"]["patches_replace"]["attn2"].values())
    new = entries[0]
    assert all(e is new for e in entries) and new is not patch
    assert copied["transformer_options"]["patches"]["attn2_patch"][0].__self__ is new
    assert new.injectors[0] is injector and new.injectors is not patch.injectors
    assert new.captures == {}                                  # per-clone caches start empty
    new.add(DecoupledInjector("other", TokenProvider()))
    assert len(patch.injectors) == 1                            # the parent is unchanged


def test_same_name_replaces():
    patch = _patch(DecoupledInjector("faceid", TokenProvider(), weight=1.0))
    patch.add(DecoupledInjector("faceid", TokenProvider(), weight=0.3))
    assert len(patch.injectors) == 1 and patch.injectors[0].weight == 0.3
    assert patch.remove("faceid") and not patch.injectors


def test_region_mask_weights_decoupled_output():
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1.0                                       # left half of the image
    provider = TokenProvider()
    patch = _patch(DecoupledInjector("faceid", provider, weight=1.0, region=mask))
    q, k, v = _qkv(1, n_q=16)
    out = patch(q, k, v, _options(SITES[0], (0,), _ctx(patch), grid=(4, 4)))
    base = sdpa(q, k, v, HEADS)
    left = torch.tensor([x < 2 for y in range(4) for x in range(4)])
    assert torch.equal(out[0, ~left], base[0, ~left])
    assert not torch.allclose(out[0, left], base[0, left])


def test_sites_by_key_has_both_key_forms():
    table = sites_by_key(SITES)
    assert table[("middle", 0, 0)] is SITES[1] and table[("middle", 0)] is SITES[1]


def test_sigma_range_validation():
    with pytest.raises(InvalidInputError):
        SigmaRange(0.8, 0.2)
    assert SigmaRange().contains(math.inf)


def test_merged_joint_equals_one_softmax_over_concatenated_keys():
    """The inference path (log-sum-exp merge of one attention per key block) against the literal Eq. 3 with a
    weight's log-bias on the face keys, on the rows that see them (positives of a [neg, pos, pos] batch)."""
    k_f, v_f = _rand(1, 10, C, seed=70), _rand(1, 10, C, seed=71)
    q, k, v = _qkv(3)
    for weight in (1.0, 0.4):
        patch = _patch(FixedJoint(k_f, v_f, weight=weight))
        with torch.no_grad():
            out = patch(q, k, v, _options(SITES[0], (1, 0, 0), _ctx(patch)))
        bias = torch.cat([torch.zeros(k.shape[1]), torch.full((10,), math.log(weight))]).view(1, 1, 1, -1)
        keys, values = torch.cat([k[1:], k_f.expand(2, -1, -1)], 1), torch.cat([v[1:], v_f.expand(2, -1, -1)], 1)
        torch.testing.assert_close(out[1:], sdpa(q[1:], keys, values, HEADS, bias), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[:1], sdpa(q[:1], k[:1], v[:1], HEADS), rtol=1e-6, atol=1e-6)


class MovableProvider(TokenProvider):
    """A provider that owns its tensors and holds a (stand-in) ModelPatcher, like a technique's provider."""

    def __init__(self, held=None):
        super().__init__()
        self.held = held

    def to(self, device):
        self.kv = {kind: (k.to(device), v.to(device)) for kind, (k, v) in self.kv.items()}
        return self

    def models(self):
        return [self.held] if self.held is not None else []


def test_to_moves_injectors_captures_and_the_previous_patch_and_ignores_dtypes():
    held = object()
    provider = MovableProvider(held)
    mask = torch.ones(1, 8, 8)
    injector = DecoupledInjector("faceid", provider, region=mask)
    patch = _patch(injector, DecoupledInjector("plain", TokenProvider()))
    patch.captures[1] = CapturedStates(("x",), {0: torch.ones(1, 4, C)}, cached=True,
                                       derived={(0, "kv"): (torch.ones(1, 4, C), torch.ones(1, 4, C))})
    moved = []

    class OtherPack:   # another pack's attn2 replace with the same protocol
        def __call__(self, q, k, v, extra_options):
            return sdpa(q, k, v, HEADS)

        def to(self, device_or_dtype):
            moved.append(device_or_dtype)
            return self

        def models(self):
            return [held]

    patch.previous[0] = OtherPack()
    assert patch.to(torch.float16) is patch and provider.kv[0][0].dtype == torch.float32   # dtype: ignored
    meta = torch.device("meta")
    assert patch.to(meta) is patch and patch.device == meta
    assert all(t.is_meta for kv in provider.kv.values() for t in kv) and injector.region.mask.is_meta
    states = patch.captures[1]
    assert states.states[0].is_meta and all(t.is_meta for t in states.derived[(0, "kv")])
    assert moved == [torch.float16, meta]
    assert patch.models() == [held]                           # from the provider and the other pack, once
    late = MovableProvider()
    patch.add(DecoupledInjector("late", late))                # added after the move: follows the patch's device
    assert late.kv[0][0].is_meta
    clone = copy.deepcopy(patch)
    assert clone.device == meta and clone.captures == {}


def test_stats_count_only_when_attached():
    patch = _patch(DecoupledInjector("faceid", TokenProvider()))
    q, k, v = _qkv(2)
    patch(q, k, v, _options(SITES[0], (0, 1), _ctx(patch)))
    assert patch.stats is None
    patch.stats = EngineStats()
    patch(q, k, v, _options(SITES[0], (0, 1), _ctx(patch)))
    patch(q, k, v, _options(SITES[2], (0, 1), _ctx(patch)))
    assert patch.stats.site_calls == {0: 1, 2: 1}
    assert copy.deepcopy(patch).stats is patch.stats           # clones of the model keep counting into it


def test_an_offloaded_clone_leaves_shared_injectors_with_a_loaded_sibling():
    """ComfyUI detaches clones on their own (also from ModelPatcher.__del__, at any time): the injectors the
    clones share stay where a live sibling was loaded until every clone is offloaded."""
    class Placed(TokenProvider):
        device = None

        def to(self, device):
            self.device = device
            return self

    provider = Placed()
    parent = _patch(DecoupledInjector("faceid", provider))
    child = copy.deepcopy(parent)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")   # devices are only recorded here
    child.to(gpu)                                            # the clone being sampled is loaded
    parent.to(cpu)                                           # a sibling is detached meanwhile
    assert provider.device == gpu and parent.device == cpu         # the shared provider stays with the child
    child.to(cpu)                                            # every clone offloaded: the tensors follow
    assert provider.device == cpu and child.device == cpu
    gone = copy.deepcopy(child)
    gone.to(gpu)
    del gone                                                 # a collected clone's request no longer counts
    child.to(cpu)
    assert provider.device == cpu
