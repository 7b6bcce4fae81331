"""The engine on a Flux DiT inside real ComfyUI (a tiny FLUX.1 from ComfyUI's own ``Flux`` class): sites derived from
the model, exact no-ops, residuals after the chosen blocks, joint keys inside the block attention, one mask per
person, another pack's ``dit`` patch chained, cond/uncond rows, reference capture and per-block checkpointing."""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.host

# comfy/model_detection.py (v0.3.64) flux branch for FLUX.1-dev (dtype left out)
FLUX_DEV_CONFIG = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
                   "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
                   "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
                   "guidance_embed": True}


def _call(model, x=None, sigma=0.7, batch=1, seed=0, cond_or_uncond=None, extra_options=None):
    """One DiT call through the patcher's wrappers (as the sampler makes it)."""
    from host_support import flux_conditioning
    from likeness.host.attention import forward_transformer_options

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 8, 8, generator=generator) if x is None else x
    context, extra = flux_conditioning(seed)[0]
    options = forward_transformer_options(model)
    options.update(extra_options or {})
    if cond_or_uncond is not None:
        options["cond_or_uncond"] = cond_or_uncond
    t = torch.full((x.shape[0],), sigma)
    with torch.no_grad():
        return model.model.apply_model(x, t, c_crossattn=context.expand(x.shape[0], -1, -1),
                                       y=extra["pooled_output"].expand(x.shape[0], -1),
                                       guidance=torch.full((x.shape[0],), 3.5), transformer_options=options)


class ConstantResidual:
    """A residual injector adding ``value`` at the listed blocks (rows of ``kind`` only when given)."""

    @staticmethod
    def make(name, value, blocks=None, kind=None, **kw):
        from likeness.attention_patches import ResidualInjector

        class Injector(ResidualInjector):
            def residual(self, call, weight):
                self.seen.append((call.site.key, call.grid, call.txt_tokens, call.img.shape))
                if blocks is not None and call.site.key not in blocks:
                    return []
                rows = list(range(call.img.shape[0])) if kind is None else call.layout.rows_of_kind(kind)
                return [(rows, torch.full((len(rows),) + tuple(call.img.shape[1:]), value * weight))] if rows else []

        injector = Injector(name, **kw)
        injector.seen = []
        return injector


class BlockSpy:
    """A foreign ``dit`` block patch that chains whatever was at its key and records the stream it returned next to
    the bare block's on the same inputs (so their difference is exactly what the chained patch added)."""

    def __init__(self, previous=None):
        self.previous = previous
        self.records = []

    def __call__(self, args, extra):
        # Flux's blocks add to their inputs in place: the bare block gets its own copy of them
        copied = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        out = self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        bare = extra["original_block"](copied)
        self.records.append((out["img"].clone(), bare["img"].clone()))
        return out


def test_sites_of_the_real_flux_dev_config_on_meta(comfy_ready):
    import comfy.supported_models

    from likeness.attention_patches import find_sites, find_unet_sites
    from likeness.errors import UnsupportedModelError

    config = comfy.supported_models.Flux(dict(FLUX_DEV_CONFIG))
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model({}, device=torch.device("meta"))
    sites = find_sites(model)
    assert len(sites) == 57
    assert [s.key for s in sites[:2]] == [("double_block", 0), ("double_block", 1)]
    assert sites[19].key == ("single_block", 0) and sites[-1].key == ("single_block", 37)
    assert {(s.hidden, s.heads, s.dim_head) for s in sites} == {(3072, 24, 128)}
    assert [s.index for s in sites] == list(range(57))
    with pytest.raises(UnsupportedModelError, match="Flux"):
        find_unet_sites(model)


def test_sites_of_a_chroma_config_on_meta(comfy_ready):
    """Chroma keeps FLUX's double/single blocks (its modulations come from a separate approximator)."""
    import comfy.supported_models

    from likeness.attention_patches import find_sites

    config = dict(FLUX_DEV_CONFIG, image_model="chroma", in_channels=64, out_channels=64, in_dim=64, out_dim=3072,
                  hidden_dim=5120, n_layers=5)
    for key in ("vec_in_dim", "guidance_embed"):
        config.pop(key)
    model_config = comfy.supported_models.Chroma(config)
    model_config.set_inference_dtype(torch.bfloat16, None)
    sites = find_sites(model_config.get_model({}, device=torch.device("meta")))
    assert len(sites) == 57 and {(s.hidden, s.heads) for s in sites} == {(3072, 24)}
    assert sites[-1].key == ("single_block", 37)


def test_install_puts_one_entry_per_block_and_weight_zero_is_the_unpatched_model(tiny_flux):
    from likeness.attention_patches import add_injector, find_patch, find_sites

    sites = find_sites(tiny_flux)
    assert [s.key for s in sites] == [("double_block", i) for i in range(4)] + [("single_block", i) for i in range(8)]
    reference = _call(tiny_flux)
    patched = tiny_flux.clone()
    add_injector(patched, ConstantResidual.make("zero", 1.0, weight=0.0))
    replaces = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(replaces) == {s.key for s in sites}
    assert all(entry.patch is find_patch(patched) for entry in replaces.values())
    assert torch.equal(_call(patched), reference)
    assert "patches_replace" not in tiny_flux.model_options.get("transformer_options", {})   # the parent is untouched


def _wrap_entries(model, keys):
    """A foreign pack installed after ours at ``keys`` that chains our entries (records ours vs the bare block)."""
    replaces = model.model_options["transformer_options"]["patches_replace"]["dit"]
    spies = {key: BlockSpy(replaces[key]) for key in keys}
    for key, spy in spies.items():
        model.set_model_patch_replace(spy, "dit", key[0], key[1])
    return spies


def test_residual_lands_after_the_chosen_blocks_only(tiny_flux):
    from likeness.attention_patches import add_injector

    model = tiny_flux.clone()
    injector = ConstantResidual.make("pulid-like", 0.5, blocks={("double_block", 2), ("single_block", 4)})
    add_injector(model, injector)
    spies = _wrap_entries(model, [("double_block", 2), ("double_block", 3), ("single_block", 4), ("single_block", 5)])
    _call(model)
    # every block was offered the call: an 8x8 latent is a 4x4 token grid behind 16 text tokens
    assert {seen[0] for seen in injector.seen} == {("double_block", i) for i in range(4)} | \
        {("single_block", i) for i in range(8)}
    assert {(seen[1], seen[2]) for seen in injector.seen} == {((4, 4), 16)}
    assert {tuple(seen[3]) for seen in injector.seen} == {(1, 16, 64)}
    deltas = {key: spy.records[0][0] - spy.records[0][1] for key, spy in spies.items()}
    assert torch.allclose(deltas[("double_block", 2)], torch.full((1, 16, 64), 0.5), atol=1e-5)
    single = deltas[("single_block", 4)]   # the single stream is [text; image]: only the image part changes
    assert single.shape == (1, 32, 64) and float(single[:, :16].abs().max()) == 0.0
    assert torch.allclose(single[:, 16:], torch.full((1, 16, 64), 0.5), atol=1e-5)
    assert float(deltas[("double_block", 3)].abs().max()) == 0.0 and float(deltas[("single_block", 5)].abs().max()) == 0.0


def test_another_packs_dit_patch_and_ours_both_run(tiny_flux):
    from likeness.attention_patches import add_injector

    calls = []

    def foreign(args, extra):   # another pack's block replacement: scales the block's image output
        calls.append(1)
        out = extra["original_block"](args)
        return {**out, "img": out["img"] * 1.5}

    reference = _call(tiny_flux)
    foreign_only = tiny_flux.clone()
    foreign_only.set_model_patch_replace(foreign, "dit", "double_block", 1)
    with_foreign = _call(foreign_only)
    assert calls and not torch.allclose(with_foreign, reference)
    both = foreign_only.clone()
    add_injector(both, ConstantResidual.make("ours", 0.25, blocks={("double_block", 1), ("single_block", 0)}))
    calls.clear()
    result = _call(both)
    assert len(calls) == 1   # the foreign patch still runs, once
    ours_only = tiny_flux.clone()
    add_injector(ours_only, ConstantResidual.make("ours", 0.25, blocks={("double_block", 1), ("single_block", 0)}))
    assert not torch.allclose(result, with_foreign) and not torch.allclose(result, _call(ours_only))


def _masked_pair(model):
    """Two residual injectors with disjoint masks (left / right half of the image) on ``model``."""
    from likeness.attention_patches import add_injector

    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1.0
    right = 1.0 - left
    add_injector(model, ConstantResidual.make("person-a", 1.0, blocks={("double_block", 0)}, region=left))
    add_injector(model, ConstantResidual.make("person-b", -2.0, blocks={("double_block", 0)}, region=right))


def test_one_mask_per_person_on_residual_injectors(tiny_flux):
    model = tiny_flux.clone()
    _masked_pair(model)
    spy = _wrap_entries(model, [("double_block", 0)])[("double_block", 0)]
    _call(model)
    out, bare = spy.records[0]
    delta = (out - bare).view(1, 4, 4, 64)
    assert torch.allclose(delta[:, :, :2], torch.ones_like(delta[:, :, :2]), atol=1e-5)      # person a: left half
    assert torch.allclose(delta[:, :, 2:], torch.full_like(delta[:, :, 2:], -2.0), atol=1e-5)  # person b: right half


def test_cond_and_uncond_rows_of_a_real_cfg_batch(tiny_flux):
    from likeness.attention_patches import POSITIVE, add_injector

    model = tiny_flux.clone()
    add_injector(model, ConstantResidual.make("positive-only", 1.0, blocks={("double_block", 0)}, kind=POSITIVE))
    spy = _wrap_entries(model, [("double_block", 0)])[("double_block", 0)]
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3)).repeat(2, 1, 1, 1)
    _call(model, x=x, cond_or_uncond=[1, 0])   # negative chunk first, as ComfyUI batches real CFG
    out, bare = spy.records[0]
    assert torch.allclose(out[0], bare[0]) and torch.allclose(out[1] - bare[1], torch.ones_like(bare[1]), atol=1e-5)


def _joint_injector(groups_for, name="joint", **kw):
    from likeness.attention_patches import JointInjector

    class Injector(JointInjector):
        def key_groups(self, call, weight):
            self.calls.append(call)
            return groups_for(call, weight)

    injector = Injector(name, **kw)
    injector.calls = []
    return injector


def test_joint_keys_with_one_mask_per_person_are_invisible_outside_it(tiny_flux):
    from likeness.attention_patches import KeyGroup, add_injector, dit_query_bias, eq7_bias
    from likeness.attention_patches.kernels import joint_attention_weights

    generator = torch.Generator().manual_seed(5)
    keys = {name: (torch.randn(1, 6, 64, generator=generator), torch.randn(1, 6, 64, generator=generator))
            for name in ("a", "b")}
    inside = torch.zeros(2, 16, dtype=torch.bool)   # person a: top half of the 4x4 grid, b: bottom half
    inside[0, :8] = True
    inside[1, 8:] = True
    kept = {}

    def groups(call, weight):
        biases = eq7_bias(inside)    # [identities, h*w]: 0 inside, -inf outside
        found = []
        for i, name in enumerate(("a", "b")):
            bias = dit_query_bias(call, biases[i:i + 1], masked=True)
            found.append(KeyGroup(*keys[name], rows=[0], query_bias=bias, tag=name))
        kept["call"], kept["groups"] = call, found
        return found

    model = tiny_flux.clone()
    injector = _joint_injector(groups, site_weights=None)
    add_injector(model, injector)
    base = _call(tiny_flux)
    out = _call(model)
    assert not torch.allclose(out, base)
    call, found = kept["call"], kept["groups"]
    start, stop = call.image_span
    assert (start, stop) == (16, 32) and call.q.shape[1] == 32
    k_all = torch.cat([call.k_text] + [g.k for g in found], dim=1)
    mask = torch.cat([torch.zeros(1, 32, call.k_text.shape[1])] +
                     [g.query_bias.unsqueeze(-1).expand(-1, -1, 6) for g in found], dim=2)
    probs = joint_attention_weights(call.q, k_all, call.heads, mask)   # [1, H, Nq, Nk]
    n = call.k_text.shape[1]
    to_a, to_b = probs[..., n:n + 6], probs[..., n + 6:]
    queries_a = torch.zeros(32, dtype=torch.bool)
    queries_a[start:start + 8] = True
    queries_b = torch.zeros(32, dtype=torch.bool)
    queries_b[start + 8:stop] = True
    assert float(to_a[:, :, ~queries_a].abs().max()) == 0.0 and float(to_a[:, :, queries_a].min()) > 0.0
    assert float(to_b[:, :, ~queries_b].abs().max()) == 0.0 and float(to_b[:, :, queries_b].min()) > 0.0


def test_joint_merge_equals_one_softmax_over_the_joined_keys(tiny_flux):
    """The override's merged attention equals attention over [block keys; identity keys] computed explicitly."""
    from likeness.attention_patches import KeyGroup, add_injector
    from likeness.attention_patches.joint import concatenated_joint

    generator = torch.Generator().manual_seed(9)
    k, v = torch.randn(1, 5, 64, generator=generator), torch.randn(1, 5, 64, generator=generator)
    seen = []

    def groups(call, weight):
        group = KeyGroup(k, v, rows=[0], log_weight=math.log(weight))
        seen.append((call, group))
        return [group]

    model = tiny_flux.clone()
    add_injector(model, _joint_injector(groups, weight=0.6))
    _call(model)
    call, group = seen[-1]
    from likeness.attention_patches.joint import merged_joint

    merged, _ = merged_joint(call, [group])
    assert torch.allclose(merged, concatenated_joint(call, [group]), atol=1e-5)


def test_reference_capture_records_keys_and_values_per_block_and_stops_early(tiny_flux):
    from likeness.attention_patches import (
        CaptureRequest,
        JointInjector,
        KeyGroup,
        ReferenceLatents,
        add_injector,
        attach_stats,
    )

    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))

    class Capturing(JointInjector):
        needs_capture = True

        def capture_request(self, t, sigma, layout, model_sampling):
            return CaptureRequest(ReferenceLatents(latents), torch.zeros(1), key="clean", cached=True,
                                  sites=frozenset({0, 5}))

        def key_groups(self, call, weight):
            states = call.captured(self)
            if states is None or call.site.index not in states.states:
                return []
            k, v = states.states[call.site.index]
            self.shapes.append((call.site.index, tuple(k.shape), tuple(v.shape)))
            return [KeyGroup(k.reshape(1, -1, k.shape[-1]), v.reshape(1, -1, v.shape[-1]), rows=[0])]

    injector = Capturing("capture")
    injector.shapes = []
    model = tiny_flux.clone()
    stats = attach_stats(model)
    add_injector(model, injector)
    first = _call(model)
    assert stats.capture_passes == 1
    assert sorted(set(injector.shapes)) == [(0, (2, 16, 64), (2, 16, 64)), (5, (2, 16, 64), (2, 16, 64))]
    assert torch.equal(_call(model), first) and stats.capture_passes == 1   # cached: no second reference pass


def test_training_through_the_dit_checkpointed_blocks_give_plain_autograds_gradient(tiny_flux):
    """While autograd records, Flux's in-place stream additions are made out of place (plain autograd would refuse
    them) and the blocks are recomputed in the backward pass by default: the gradient of a joint key equals plain
    autograd's (activations kept) in float64."""
    from host_support import build_tiny_flux, flux_conditioning
    from likeness.attention_patches import DIT_CHECKPOINT_KEY, KeyGroup, add_injector
    from likeness.host.attention import forward_transformer_options

    key = 3.0 * torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = build_tiny_flux(seed=7, cached=False)   # a private model, made float64
    model.model.to(torch.float64)
    model.model.diffusion_model.dtype = torch.float64
    holder = {}
    add_injector(model, _joint_injector(lambda call, weight: [KeyGroup(holder["key"], holder["key"] * 0.5, rows=[0])]))
    context, extra = flux_conditioning()[0]
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def gradient(recompute):
        holder["key"] = key.clone().requires_grad_(True)
        options = forward_transformer_options(model)
        options[DIT_CHECKPOINT_KEY] = recompute
        with torch.inference_mode(False), torch.enable_grad():
            out = model.model.apply_model(x, torch.full((1,), 0.6, dtype=torch.float64), c_crossattn=context.double(),
                                          y=extra["pooled_output"].double(),
                                          guidance=torch.full((1,), 3.5, dtype=torch.float64), transformer_options=options)
            out.square().mean().backward()
        return holder["key"].grad

    kept, recomputed = gradient(False), gradient(True)
    assert float(kept.abs().max()) > 0
    assert torch.allclose(recomputed, kept, rtol=1e-10, atol=1e-16)


def test_unet_techniques_refuse_a_dit_with_a_clear_message(tiny_flux):
    from likeness.attention_patches import DecoupledInjector, add_injector
    from likeness.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="Flux-family DiT"):
        add_injector(tiny_flux.clone(), DecoupledInjector("faceid", provider=lambda site, kind: None))


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_sigma_range_in_sampling_guidance_distilled_and_real_cfg(tiny_flux, cfg):
    """Sampling a Flux dev model: cfg 1 is one conditional pass per step (guidance-distilled), cfg 3 batches the
    negative chunk with it; the injector acts only inside its start/end range and only on positive rows."""
    from host_support import flux_conditioning, sample_tiny
    from likeness.attention_patches import POSITIVE, SigmaRange, add_injector

    model = tiny_flux.clone()
    injector = ConstantResidual.make("late", 0.1, blocks={("double_block", 0)}, kind=POSITIVE,
                                     sigma_range=SigmaRange(0.5, 1.0))
    add_injector(model, injector)
    latent = torch.zeros(1, 16, 8, 8)
    sample_tiny(model, steps=4, cfg=cfg, positive=flux_conditioning(1), negative=flux_conditioning(2), latent=latent)
    layouts = {(tuple(seen[3]),) for seen in injector.seen}
    assert layouts == {((1, 16, 64),)} if cfg == 1.0 else {((2, 16, 64),)}
    sigmas = model.get_model_object("model_sampling").percent_to_sigma
    calls = len([s for s in injector.seen if s[0] == ("double_block", 0)])
    assert 0 < calls < 4, f"{calls} of 4 steps inside [{sigmas(0.5):.3f}, 0]"


@pytest.mark.parametrize("index", [0, 1])
def test_reference_positions_are_kontexts_reference_index(tiny_flux, index):
    """A capture with ``dit_position_index=1`` records at the first block exactly the keys FLUX.1 Kontext gives the same
    latent as a reference image (its tokens at index 1, same rows and columns) in the same call; index 0 (the
    generation's own positions) records other keys."""
    from host_support import flux_conditioning
    from likeness.attention_patches import CaptureRequest, JointInjector, ReferenceLatents, add_injector
    from likeness.attention_patches.kernels import merge_heads
    from likeness.host.attention import forward_transformer_options

    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    model = tiny_flux.clone()
    base = model.model

    class Capturing(JointInjector):
        needs_capture = True

        def capture_request(self, t, sigma, layout, model_sampling):
            return CaptureRequest(ReferenceLatents(base.process_latent_out(latent)), torch.zeros(1), key="clean",
                                  cached=True, sites=frozenset({0}), dit_position_index=index)

        def key_groups(self, call, weight):
            return []

    injector = Capturing("capture")
    add_injector(model, injector)
    keys = []

    def spy(func, q, k, v, heads, *args, **kwargs):   # another override the engine chains: sees every block's keys
        keys.append(k)
        return func(q, k, v, heads, *args, **kwargs)

    context, extra = flux_conditioning(0)[0]
    options = forward_transformer_options(model)
    options["optimized_attention_override"] = spy
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():   # sigma 0: the generation's timestep is the clean reference's
        base.apply_model(x, torch.zeros(1), c_crossattn=context, y=extra["pooled_output"], guidance=torch.full((1,), 3.5),
                         ref_latents=[latent], transformer_options=options)
    captured_k = find_captured(model, injector)[0]
    kontext_first_block = next(k for k in keys if k.shape[2] == 16 + 16 + 16)   # text, image, Kontext reference
    kontext_k = merge_heads(kontext_first_block[:, :, 32:])
    assert captured_k.shape == kontext_k.shape == (1, 16, 64)
    if index == 1:
        assert torch.allclose(captured_k, kontext_k, atol=1e-5)
    else:
        assert not torch.allclose(captured_k, kontext_k, atol=1e-3)


def find_captured(model, injector):
    from likeness.attention_patches import find_patch

    return find_patch(model).captures[injector.uid].states[0]
