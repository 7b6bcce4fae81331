"""Face Fusion in real ComfyUI sampling on the tiny SD1.5/SDXL models: capture modes, exact no-ops,
multi-reference, two identities with masks (SDXL extra conds), stacking with a decoupled injector,
and a differentiable forward for the trainer."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host


def _sample(model, steps=2, cfg=5.0, positive=None, negative=None, latent=None, seed=0, sdxl=False):
    from host_support import sample_tiny

    return sample_tiny(model, steps, cfg, positive, negative, latent, seed, sdxl)


def _refs(n, seed=0, size=16):
    return torch.randn(n, 4, size, size, generator=torch.Generator().manual_seed(seed))


def _fusion(model, identities=None, engine=None, **kw):
    """Face Fusion on a clone of ``model``; returns ``(clone, its patch with stats attached, adapter)``.
    ``engine``: options of the identity-attention patch (installed first on an intermediate clone)."""
    from likeness.attention_patches import attach_stats, find_patch, install
    from likeness.techniques.face_fusion import FusionAdapter, FusionIdentityLatents, apply_face_fusion

    adapter = FusionAdapter.from_model(model)
    identities = identities or [FusionIdentityLatents(_refs(1))]
    if engine:
        model = model.clone()
        install(model, **engine)
    patched = apply_face_fusion(model, adapter, identities, **kw)
    attach_stats(patched)
    return patched, find_patch(patched), adapter


def test_per_step_capture_runs_once_per_step_and_reaches_every_site(tiny_sd15):
    model, patch, _ = _fusion(tiny_sd15, capture_mode="per_step")
    reference = _sample(tiny_sd15.clone(), steps=3)
    seen = []
    original = patch.injectors[0].on_captured
    patch.injectors[0].on_captured = lambda states, p: (seen.append(set(states.states)), original(states, p))
    out = _sample(model, steps=3)
    assert patch.stats.capture_passes == 3
    assert sum(patch.stats.site_calls.values()) == 16 * 3  # every site got the face keys on every step
    assert seen == [set(range(16))] * 3                    # early stop after the last site lost nothing
    assert patch.captures == {}                             # per-step states are freed after sampling
    assert (out - reference).abs().max().item() > 1e-4


def test_cached_capture_runs_once_per_clone(tiny_sd15):
    model, patch, _ = _fusion(tiny_sd15, capture_mode="cached_clean")
    first = _sample(model, steps=2)
    second = _sample(model, steps=2)
    assert patch.stats.capture_passes == 1
    assert torch.equal(first, second)
    (states,) = patch.captures.values()
    assert states.states == {} and len(states.derived) == 16   # only the projected K/V are kept
    sigma_model, sigma_patch, _ = _fusion(tiny_sd15, capture_mode="cached_sigma", capture_percent=0.5)
    _sample(sigma_model, steps=2)
    assert sigma_patch.stats.capture_passes == 1


@pytest.mark.parametrize("kind", ["weight0", "out_of_range"])
def test_fusion_no_op_is_identical_and_skips_capture(tiny_sd15, kind):
    reference = _sample(tiny_sd15.clone(), steps=3)
    if kind == "weight0":
        model, patch, _ = _fusion(tiny_sd15, weight=0.0)
    else:
        model, patch, _ = _fusion(tiny_sd15, start_at=0.05, end_at=0.3)   # between the 3 steps' sigmas
    out = _sample(model, steps=3)
    assert (out - reference).abs().max().item() <= 1e-6
    assert patch.stats.capture_passes == 0


def test_multi_reference_changes_the_result(tiny_sd15):
    from likeness.techniques.face_fusion import FusionIdentityLatents

    one, _, _ = _fusion(tiny_sd15, [FusionIdentityLatents(_refs(1))], capture_mode="cached_clean")
    three, patch, _ = _fusion(tiny_sd15, [FusionIdentityLatents(_refs(3))], capture_mode="cached_clean")
    a, b = _sample(one), _sample(three)
    (states,) = patch.captures.values()
    k, _ = next(iter(states.derived.values()))
    assert k.shape[0] == 3
    assert (a - b).abs().max().item() > 1e-5


def test_two_identities_with_masks_on_sdxl(tiny_sdxl):
    from likeness.techniques.face_fusion import FusionIdentityLatents

    left, right = torch.zeros(1, 64, 64), torch.zeros(1, 64, 64)
    left[:, :, :32] = 1
    right[:, :, 32:] = 1
    model, patch, _ = _fusion(tiny_sdxl, [FusionIdentityLatents(_refs(1, 1), left),
                                          FusionIdentityLatents(_refs(2, 2), right)], capture_mode="per_step")
    out = _sample(model, steps=2, sdxl=True)
    assert torch.isfinite(out).all()
    assert patch.stats.capture_passes == 2
    assert sum(patch.stats.site_calls.values()) == len(patch.sites) * 2


def test_fusion_stacked_with_decoupled_both_apply(tiny_sd15):
    from likeness.attention_patches import DecoupledInjector, add_injector, attach_stats, find_patch, find_sites

    calls = []
    sites = find_sites(tiny_sd15)
    g = torch.Generator().manual_seed(3)
    tokens = {s.index: (torch.randn(1, 4, s.channels, generator=g), torch.randn(1, 4, s.channels, generator=g))
              for s in sites}

    def provider(site, kind):
        calls.append((site.index, kind))
        return tokens[site.index] if kind == 0 else None

    fusion_only, _, _ = _fusion(tiny_sd15, capture_mode="cached_clean")
    both = fusion_only.clone()
    add_injector(both, DecoupledInjector("faceid", provider, weight=1.0))
    stats = attach_stats(both)                              # this clone's work only
    decoupled_only = tiny_sd15.clone()
    add_injector(decoupled_only, DecoupledInjector("faceid", provider, weight=1.0))
    patch = find_patch(both)
    assert [i.name for i in patch.injectors] == ["face_fusion", "faceid"]
    out_both, out_fusion, out_dec = _sample(both), _sample(fusion_only), _sample(decoupled_only)
    assert stats.capture_passes == 1 and calls
    assert find_patch(fusion_only).stats.capture_passes == 1   # its own capture only
    assert (out_both - out_fusion).abs().max().item() > 1e-5
    assert (out_both - out_dec).abs().max().item() > 1e-5
    assert len(find_patch(fusion_only).injectors) == 1


def test_fusion_applied_twice_stacks_like_the_other_techniques(tiny_sd15):
    from likeness.attention_patches import attach_stats, find_patch
    from likeness.techniques.face_fusion import FusionIdentityLatents, apply_face_fusion

    first, _, adapter = _fusion(tiny_sd15, [FusionIdentityLatents(_refs(1, 1))], capture_mode="cached_clean")
    second = [FusionIdentityLatents(_refs(1, 2))]
    twice = apply_face_fusion(first, adapter, second, capture_mode="cached_clean")
    patch = find_patch(twice)
    stats = attach_stats(twice)
    assert [i.name for i in patch.injectors] == ["face_fusion", "face_fusion#2"]
    assert len(find_patch(first).injectors) == 1                      # the input model keeps one application
    second_only = apply_face_fusion(tiny_sd15, adapter, second, capture_mode="cached_clean")
    out_twice, out_first, out_second = _sample(twice), _sample(first), _sample(second_only)
    assert stats.capture_passes == 2                                   # each application has its references
    assert (out_twice - out_first).abs().max().item() > 1e-5
    assert (out_twice - out_second).abs().max().item() > 1e-5          # the first is not dropped
    off = apply_face_fusion(first, adapter, second, weight=0.0, capture_mode="cached_clean")
    assert (_sample(off) - out_first).abs().max().item() <= 1e-6       # a second one at weight 0 changes nothing


def test_training_forward_is_differentiable(tiny_sd15):
    """What the trainer does: a direct apply_model with the wrappers merged, autograd on."""
    from likeness.host.attention import forward_transformer_options
    from likeness.techniques.face_fusion import FusionIdentityLatents

    model, patch, adapter = _fusion(tiny_sd15, [FusionIdentityLatents(_refs(2))], capture_mode="per_step",
                                    per_row=True)
    adapter.requires_grad_(True)
    base = model.model
    x = torch.randn(2, 4, 16, 16)
    sigma = torch.tensor([3.0, 1.0])
    context = torch.randn(2, 77, 64)
    out = base.apply_model(x, sigma, c_crossattn=context, transformer_options=forward_transformer_options(model))
    out.pow(2).mean().backward()
    grads = [p.grad for p in adapter.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert patch.stats.capture_passes == 1
    (states,) = patch.captures.values()
    assert states.key[1:] == ("rows", (3.0, 1.0))
    patch.injectors[0].set_identities([FusionIdentityLatents(_refs(2, seed=9))])   # next training step
    base.apply_model(x, sigma, c_crossattn=context, transformer_options=forward_transformer_options(model))
    assert patch.stats.capture_passes == 2                 # same sigmas, new references: captured again


def test_capture_in_bounded_batches_matches_one_pass(tiny_sd15):
    from likeness.techniques.face_fusion import FusionIdentityLatents

    one, patch_one, _ = _fusion(tiny_sd15, [FusionIdentityLatents(_refs(3))], capture_mode="cached_clean")
    split, patch_split, _ = _fusion(tiny_sd15, [FusionIdentityLatents(_refs(3))], capture_mode="cached_clean",
                                    engine={"capture_batch": 2})
    assert patch_one.capture_batch == 4 and patch_split.capture_batch == 2
    from likeness.attention_patches import install

    with pytest.raises(TypeError, match="installed"):          # options belong to the patch's installation
        install(split, capture_batch=3)
    a, b = _sample(one, steps=1), _sample(split, steps=1)
    assert patch_one.stats.capture_passes == 1 and patch_split.stats.capture_passes == 2
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-3)   # batch-size dependent GEMM rounding only


def _attn1_key_tokens(model):
    """Record (batch, query tokens, key tokens) of every self-attention call of ``model``'s UNet."""
    seen = []
    unet = model.model.diffusion_model
    handles = []
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            def hook(mod, args, kwargs, out):
                context = kwargs.get("context")
                seen.append((args[0].shape[0], args[0].shape[1], (context if context is not None else args[0]).shape[1]))
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return seen, handles


def test_reference_pass_pools_top_level_self_attention_keys(tiny_sd15, caplog):
    """Default reference_downsample 2: only the reference pass's highest-resolution self-attention sees 2x2
    pooled keys; queries (and so every captured h_f) keep all tokens; the sampling batch is untouched."""
    pooled, patch_p, _ = _fusion(tiny_sd15, capture_mode="per_step")
    exact, patch_e, _ = _fusion(tiny_sd15, capture_mode="per_step", reference_downsample=1)
    assert patch_p.injectors[0].reference_downsample == 2
    calls = {}
    for label, model in (("pooled", pooled), ("exact", exact)):
        seen, handles = _attn1_key_tokens(model)
        try:
            out, states = _captured_states(model, patch_p if model is pooled else patch_e)
        finally:
            for h in handles:
                h.remove()
        calls[label] = (seen, out, states)
    seen_p, out_p, states_p = calls["pooled"]
    seen_e, out_e, states_e = calls["exact"]
    top = 16 * 16
    reference_top = [(q, k) for b, q, k in seen_p if b == 1 and q == top]
    sampling = [(q, k) for b, q, k in seen_p if b == 2]
    assert reference_top and all(k == top // 4 for q, k in reference_top)
    assert all(q == k for q, k in sampling)                                   # the real batch: every key
    assert all(q == k for b, q, k in seen_p if b == 1 and q != top)           # lower levels: every key
    assert all(q == k for b, q, k in seen_e)                                  # reference_downsample=1: exact
    for step_p, step_e in zip(states_p, states_e, strict=True):
        assert set(step_p) == set(step_e)
        for site, h in step_p.items():
            assert h.shape == step_e[site].shape
    assert torch.isfinite(out_p).all() and not torch.equal(out_p, out_e)

    # another pack replaces self-attention: no pooling (it may not expect fewer keys), said once
    other = pooled.clone()
    other.set_model_attn1_replace(lambda q, k, v, extra_options: q, "input", 1)
    seen, handles = _attn1_key_tokens(other)
    try:
        with caplog.at_level("WARNING", logger="likeness"):
            _sample(other, steps=1)
    finally:
        for h in handles:
            h.remove()
    assert "reference_downsample ignored" in caplog.text


def test_reference_downsample_is_validated(tiny_sd15):
    from likeness.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="reference_downsample"):
        _fusion(tiny_sd15, reference_downsample=0)


def _captured_states(model, patch, steps=2):
    seen = []
    original = patch.injectors[0].on_captured
    patch.injectors[0].on_captured = lambda states, p: (seen.append(dict(states.states)), original(states, p))
    out = _sample(model, steps=steps)
    return out, seen


def test_reference_pass_trims_text_attention_exactly(tiny_sd15):
    """Zero text context: the reference pass runs attn2 on one query token (to_out's bias, broadcast); the
    captured h_f and the sampled result equal the untrimmed pass."""
    trimmed, patch_t, _ = _fusion(tiny_sd15, capture_mode="per_step")
    full, patch_f, _ = _fusion(tiny_sd15, capture_mode="per_step", engine={"trim_reference_text_attention": False})
    tokens = []
    for model in (trimmed, full):
        def count(n, extra_options, model=model):
            tokens.append((model is trimmed, extra_options.get("likeness_identity_pass").recorder is not None,
                           n.shape[1]))
            return n
        count.likeness_token_safe = True
        model.set_model_attn2_output_patch(count)
    a, states_t = _captured_states(trimmed, patch_t)
    b, states_f = _captured_states(full, patch_f)
    assert len(states_t) == len(states_f) == 2 and set(states_t[0]) == set(states_f[0]) and len(states_t[0]) == 16
    for step_t, step_f in zip(states_t, states_f, strict=True):
        for site, h in step_t.items():
            torch.testing.assert_close(h, step_f[site], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ref_tokens = {(t, n) for t, in_ref, n in tokens if in_ref}
    assert {n for t, n in ref_tokens if t} == {1}              # trimmed: one token at every site
    assert min(n for t, n in ref_tokens if not t) > 1          # untrimmed: the full grid


def test_reference_pass_keeps_full_tokens_for_foreign_output_patches(tiny_sd15):
    """Another pack's attn2 output patch may need every token: then the reference pass is not trimmed."""
    model, patch, _ = _fusion(tiny_sd15, capture_mode="per_step")
    shapes = []

    def foreign(n, extra_options):
        if extra_options.get("likeness_identity_pass") is not None and \
                extra_options["likeness_identity_pass"].recorder is not None:
            shapes.append(n.shape[1])
        return n

    model.set_model_attn2_output_patch(foreign)
    _sample(model, steps=1)
    assert shapes and min(shapes) > 1 and patch.stats.capture_passes == 1


def test_reference_budget_pools_every_site_for_many_references(tiny_sd15):
    from likeness.techniques.face_fusion import FusionIdentityLatents

    refs = _refs(4, seed=5)
    pooled, patch_p, _ = _fusion(tiny_sd15, [FusionIdentityLatents(refs)], capture_mode="cached_clean")
    exact, patch_e, _ = _fusion(tiny_sd15, [FusionIdentityLatents(refs)], capture_mode="cached_clean",
                                reference_budget=0)
    plain = _sample(tiny_sd15, steps=2)
    a, b = _sample(pooled, steps=2), _sample(exact, steps=2)
    (states,) = patch_p.captures.values()
    windows = {slot[0]: (slot[3], kv[0].shape[1]) for slot, kv in states.derived.items() if slot[1] == "pooled"}
    full = {slot[0]: kv[0].shape[1] for slot, kv in states.derived.items() if slot[1] == "kv"}
    assert set(windows) == set(full) and len(windows) == 16                       # every site pooled...
    assert all(w == (1, 2) and n * 2 == 4 * full[s] for s, (w, n) in windows.items())  # ...to 2 refs' worth
    (states_e,) = patch_e.captures.values()
    assert not any(slot[1] == "pooled" for slot in states_e.derived)
    assert not torch.equal(a, b) and (a - b).abs().mean() < (b - plain).abs().mean()
