"""Face Fusion on a Flux DiT inside real ComfyUI (a tiny FLUX.1 from ComfyUI's own ``Flux`` class): the adapter derived
from the model (identity when untrained) and its file, the reference through the same DiT in every capture mode,
exact no-ops, two identities with disjoint masks (attention probabilities), real CFG rows, the key budget, and the
nodes' refusal of an adapter made for the other kind of model."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host


def _refs(n, seed=0, size=8):
    """Reference latents in the Flux VAE's space ``[n, 16, size, size]`` (a 8x8 latent = a 4x4 token grid)."""
    return torch.randn(n, 16, size, size, generator=torch.Generator().manual_seed(seed))


def _call(model, x=None, sigma=0.7, cond_or_uncond=None, seed=0):
    """One DiT call through the patcher's wrappers, as the sampler makes it (rows = chunks of ``cond_or_uncond``)."""
    from host_support import flux_conditioning
    from likeness.host.attention import forward_transformer_options

    chunks = len(cond_or_uncond or [0])
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed)).repeat(chunks, 1, 1, 1) \
        if x is None else x
    context, extra = flux_conditioning(seed)[0]
    options = forward_transformer_options(model)
    if cond_or_uncond is not None:
        options["cond_or_uncond"] = cond_or_uncond
    rows = x.shape[0]
    with torch.no_grad():
        return model.model.apply_model(x, torch.full((rows,), sigma), c_crossattn=context.expand(rows, -1, -1),
                                       y=extra["pooled_output"].expand(rows, -1), guidance=torch.full((rows,), 3.5),
                                       transformer_options=options)


def _fusion(model, identities=None, adapter=None, **kw):
    from likeness.attention_patches import attach_stats, find_patch
    from likeness.techniques.face_fusion import FusionIdentityLatents, apply_face_fusion, new_fusion_adapter

    adapter = adapter or new_fusion_adapter(model)
    patched = apply_face_fusion(model, adapter, identities or [FusionIdentityLatents(_refs(1))], **kw)
    attach_stats(patched)
    return patched, find_patch(patched), adapter


class GroupSpy:
    """Records every (call, key groups) the Fusion injector hands the engine at ``site_index``."""

    def __init__(self, injector, site_index=0):
        self.records = []
        original = injector.key_groups

        def spy(call, weight):
            groups = original(call, weight)
            if call.site.index == site_index:
                self.records.append((call, groups))
            return groups

        injector.key_groups = spy


def _trained_like(adapter, seed=3, scale=0.5):
    """``adapter`` with random ``up`` weights (as if trained), so K_f differs from the captured keys."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in adapter.blocks():
            for part in (block.to_k_f, block.to_v_f):
                part.up.weight.copy_(scale * torch.randn(part.up.weight.shape, generator=generator))
    return adapter


def test_adapter_sites_come_from_the_model_and_an_untrained_one_joins_the_plain_reference_keys(tiny_flux):
    from likeness.attention_patches import find_sites
    from likeness.techniques.face_fusion import FluxFusionAdapter, new_fusion_adapter

    adapter = new_fusion_adapter(tiny_flux)
    assert isinstance(adapter, FluxFusionAdapter)
    assert (len(adapter.double_blocks), len(adapter.single_blocks), adapter.hidden) == (4, 8, 64)
    assert adapter.metadata["base"] == "flux" and adapter.metadata["heads"] == "4"
    adapter.check_sites(find_sites(tiny_flux))
    model, patch, _ = _fusion(tiny_flux, capture_mode="cached_clean")
    injector = patch.injectors[0]
    spy = GroupSpy(injector, site_index=5)   # a single block
    _call(model)
    (call, groups), = spy.records
    k_ref, v_ref = patch.captures[injector.uid].derived[(5, "kv")]
    assert len(groups) == 1 and groups[0].k.shape == (1, 16, 64)
    # untrained = identity: the keys that join are the reference's own keys from the same block of the same DiT
    assert torch.equal(groups[0].k, k_ref.reshape(1, -1, 64)) and torch.equal(groups[0].v, v_ref.reshape(1, -1, 64))
    plain = tiny_flux.clone()
    plain_out = _call(plain)
    assert not torch.allclose(_call(model), plain_out)


def test_flux_adapter_file_round_trip_with_its_layout_marker(tiny_flux, tmp_path):
    from likeness.techniques.face_fusion import FluxFusionAdapter, load_fusion_adapter, new_fusion_adapter
    from likeness.techniques.face_fusion.adapter import save_fusion_adapter

    adapter = _trained_like(new_fusion_adapter(tiny_flux, rank=4))
    path = save_fusion_adapter(adapter, str(tmp_path / "flux_face.safetensors"))
    loaded = load_fusion_adapter(path)
    assert isinstance(loaded, FluxFusionAdapter) and loaded.rank == 4
    assert loaded.metadata["layout"] == "dit" and loaded.metadata["format"] == "likeness.face_fusion"
    for (name, a), (_, b) in zip(adapter.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert sorted(adapter.file_state_dict())[0] == "fusion_dit.double_blocks.0.to_k_f.down.weight"


@pytest.mark.parametrize("mode", ["cached_clean", "cached_sigma"])
def test_cached_modes_run_one_capture_pass_in_sampling(tiny_flux, mode):
    from host_support import flux_conditioning, sample_tiny

    model, patch, _ = _fusion(tiny_flux, capture_mode=mode)
    latent = torch.zeros(1, 16, 8, 8)
    out = sample_tiny(model, steps=3, cfg=2.0, positive=flux_conditioning(1), negative=flux_conditioning(2),
                      latent=latent)
    plain = sample_tiny(tiny_flux.clone(), steps=3, cfg=2.0, positive=flux_conditioning(1),
                        negative=flux_conditioning(2), latent=latent)
    assert patch.stats.capture_passes == 1
    assert not torch.allclose(out, plain)


def test_per_step_capture_runs_once_per_step(tiny_flux):
    from host_support import flux_conditioning, sample_tiny

    model, patch, _ = _fusion(tiny_flux, capture_mode="per_step")
    sample_tiny(model, steps=3, cfg=1.0, positive=flux_conditioning(1), negative=flux_conditioning(2),
                latent=torch.zeros(1, 16, 8, 8))
    assert patch.stats.capture_passes == 3


def test_weight_zero_is_the_unpatched_model_and_skips_the_capture(tiny_flux):
    model, patch, _ = _fusion(tiny_flux, capture_mode="per_step", weight=0.0)
    assert torch.equal(_call(model), _call(tiny_flux.clone()))
    assert patch.stats.capture_passes == 0


def test_two_identities_with_disjoint_masks_are_invisible_outside_them(tiny_flux):
    """Person a's mask is the left half of the image, b's the right half: the attention probability of every query
    outside a person's mask (text queries included) on that person's keys is exactly 0, inside it is positive; the
    engine's merged attention equals one explicit softmax over [text+image keys; a; b] with those masks."""
    from likeness.attention_patches.joint import concatenated_joint, merged_joint
    from likeness.attention_patches.kernels import joint_attention_weights
    from likeness.techniques.face_fusion import FusionIdentityLatents, new_fusion_adapter

    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1.0
    people = [FusionIdentityLatents(_refs(1, 1), left), FusionIdentityLatents(_refs(1, 2), 1.0 - left)]
    adapter = _trained_like(new_fusion_adapter(tiny_flux))
    model, patch, _ = _fusion(tiny_flux, people, adapter=adapter, capture_mode="cached_clean")
    spy = GroupSpy(patch.injectors[0], site_index=2)
    _call(model)
    (call, groups), = spy.records
    assert [g.tag for g in groups] == ["fusion:0", "fusion:1"]
    start, stop = call.image_span
    n_q, n_text = call.q.shape[1], call.k_text.shape[1]
    assert (start, stop) == (16, 32) and n_q == 32 and n_text == 32
    mask = torch.cat([torch.zeros(1, n_q, n_text)] + [g.query_bias.unsqueeze(-1).expand(-1, -1, g.k.shape[1])
                                                       for g in groups], dim=2)
    probs = joint_attention_weights(call.q, torch.cat([call.k_text] + [g.k for g in groups], dim=1), call.heads, mask)
    grid_left = torch.zeros(4, 4, dtype=torch.bool)
    grid_left[:, :2] = True
    inside = {0: torch.zeros(n_q, dtype=torch.bool), 1: torch.zeros(n_q, dtype=torch.bool)}
    inside[0][start:stop] = grid_left.flatten()
    inside[1][start:stop] = ~grid_left.flatten()
    for i, group in enumerate(groups):
        first = n_text + sum(g.k.shape[1] for g in groups[:i])
        to_person = probs[..., first:first + group.k.shape[1]]
        assert float(to_person[:, :, ~inside[i]].abs().max()) == 0.0
        assert float(to_person[:, :, inside[i]].sum(-1).min()) > 0.0
    merged, _ = merged_joint(call, groups)
    assert torch.allclose(merged, concatenated_joint(call, groups), atol=1e-5)


def test_real_cfg_rows_uncond_none_leaves_the_negative_row_as_plain(tiny_flux):
    """A real-CFG batch (negative chunk first): with uncond 'none' only the positive row gets the face keys; with
    'zeros' the negative row gets blank keys and changes."""
    plain = _call(tiny_flux.clone(), cond_or_uncond=[1, 0])
    none, _, adapter = _fusion(tiny_flux, capture_mode="cached_clean", uncond="none")
    out = _call(none, cond_or_uncond=[1, 0])
    assert torch.equal(out[0], plain[0]) and not torch.allclose(out[1], plain[1])
    zeros, _, _ = _fusion(tiny_flux, adapter=adapter, capture_mode="cached_clean", uncond="zeros")
    out_zeros = _call(zeros, cond_or_uncond=[1, 0])
    assert not torch.allclose(out_zeros[0], plain[0]) and torch.allclose(out_zeros[1], out[1])


def test_many_references_stay_within_the_key_budget(tiny_flux):
    from likeness.techniques.face_fusion import FusionIdentityLatents

    model, patch, _ = _fusion(tiny_flux, [FusionIdentityLatents(_refs(4, size=16))], capture_mode="cached_clean",
                              reference_budget=2)
    spy = GroupSpy(patch.injectors[0], site_index=0)
    _call(model)
    (call, groups), = spy.records
    # 4 references of an 8x8 token grid (256 keys) pooled 1x2 to 2 references' worth, each key weighted log 2
    assert groups[0].k.shape == (1, 128, 64) and groups[0].log_weight == pytest.approx(float(torch.log(torch.tensor(2.0))))
    exact, exact_patch, _ = _fusion(tiny_flux, [FusionIdentityLatents(_refs(4, size=16))], capture_mode="cached_clean",
                                    reference_budget=0)
    spy_exact = GroupSpy(exact_patch.injectors[0], site_index=0)
    _call(exact)
    assert spy_exact.records[0][1][0].k.shape == (1, 256, 64)


def test_layers_choice_must_name_dit_blocks(tiny_flux):
    from likeness.attention_patches import SiteWeights
    from likeness.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="double, single"):
        _fusion(tiny_flux, site_weights=SiteWeights(mode="output"))
    model, patch, _ = _fusion(tiny_flux, site_weights=SiteWeights(mode="single", others=0.0), capture_mode="cached_clean")
    _call(model)
    assert set(patch.captures[patch.injectors[0].uid].derived) == {(i, "kv") for i in range(4, 12)}


def test_nodes_make_a_flux_adapter_and_refuse_one_made_for_the_other_model(tiny_flux, tiny_sd15):
    from host_support import build_tiny_flux_vae
    from likeness.errors import CheckpointLayoutError
    from likeness.nodes.face_fusion import ApplyFaceFusion, FusionAdapterNew
    from likeness.techniques.face_fusion import FluxFusionAdapter, FusionAdapter

    flux_adapter, = FusionAdapterNew().create(tiny_flux)
    sd_adapter, = FusionAdapterNew().create(tiny_sd15)
    assert isinstance(flux_adapter, FluxFusionAdapter) and isinstance(sd_adapter, FusionAdapter)
    face = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    node = ApplyFaceFusion()
    common = dict(weight=1.0, start_at=0.0, end_at=1.0, capture="cached: clean reference", reference=face,
                  reference_size=64)
    model, = node.apply(tiny_flux, flux_adapter, build_tiny_flux_vae(), **common)
    assert not torch.allclose(_call(model), _call(tiny_flux.clone()))
    with pytest.raises(CheckpointLayoutError, match="made for an SD1.5/SDXL UNet .* the MODEL is a Flux-family DiT"):
        node.apply(tiny_flux, sd_adapter, build_tiny_flux_vae(), **common)
    with pytest.raises(CheckpointLayoutError, match="made for a Flux-family DiT .* the MODEL is an SD1.5/SDXL UNet"):
        node.apply(tiny_sd15, flux_adapter, build_tiny_flux_vae(), **common)
    other, = FusionAdapterNew().create(__import__("host_support").build_tiny_flux(depth=2, depth_single=3))
    with pytest.raises(CheckpointLayoutError, match="2 double \\+ 3 single blocks"):
        node.apply(tiny_flux, other, build_tiny_flux_vae(), **common)


def test_a_bf16_flux_with_an_fp32_adapter(comfy_ready):
    """ComfyUI runs FLUX in bf16: the fp32 adapter's weights are cast to the keys' dtype (cached), the reference pass
    and the merged joint attention run in bf16, and the result stays close to the same model in fp32."""
    from host_support import build_tiny_flux
    from likeness.techniques.face_fusion import FusionIdentityLatents, new_fusion_adapter

    fp32 = build_tiny_flux(seed=4, cached=False)
    bf16 = build_tiny_flux(seed=4, cached=False)
    bf16.model.to(torch.bfloat16)
    bf16.model.diffusion_model.dtype = torch.bfloat16
    bf16.model.manual_cast_dtype = None
    people = [FusionIdentityLatents(_refs(1, 5))]
    adapter = _trained_like(new_fusion_adapter(fp32), scale=0.2)
    out_fp32 = _call(_fusion(fp32, people, adapter=adapter, capture_mode="cached_clean")[0])
    model, patch, _ = _fusion(bf16, people, adapter=adapter, capture_mode="cached_clean")
    out_bf16 = _call(model)
    k, _ = patch.captures[patch.injectors[0].uid].derived[(0, "kv")]
    assert k.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in adapter.parameters())
    assert torch.isfinite(out_bf16).all()
    assert float((out_bf16.float() - out_fp32).abs().max()) < 0.1 * float(out_fp32.abs().max())


def test_an_untrained_adapter_joins_the_keys_kontext_gives_the_reference(tiny_flux):
    """Plain reference-joining, FLUX.1 Kontext style: at the first block the keys an untrained adapter joins are the
    keys Kontext gives the same (clean) latent as a reference image in the same call."""
    from host_support import flux_conditioning
    from likeness.attention_patches.kernels import merge_heads
    from likeness.host.attention import forward_transformer_options
    from likeness.techniques.face_fusion import FusionIdentityLatents

    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    base = tiny_flux.model
    model, patch, _ = _fusion(tiny_flux, [FusionIdentityLatents(base.process_latent_out(latent))],
                              capture_mode="cached_clean")
    spy = GroupSpy(patch.injectors[0], site_index=0)
    context, extra = flux_conditioning(0)[0]
    keys = []

    def foreign_override(func, q, k, v, heads, *args, **kwargs):
        keys.append(k)
        return func(q, k, v, heads, *args, **kwargs)

    options = forward_transformer_options(model)
    options["optimized_attention_override"] = foreign_override
    with torch.no_grad():
        base.apply_model(torch.randn(1, 16, 8, 8), torch.zeros(1), c_crossattn=context, y=extra["pooled_output"],
                         guidance=torch.full((1,), 3.5), ref_latents=[latent], transformer_options=options)
    (call, groups), = spy.records
    kontext = merge_heads(next(k for k in keys if k.shape[2] == 48)[:, :, 32:])
    assert groups[0].k.shape == kontext.shape and torch.allclose(groups[0].k, kontext, atol=1e-5)


def test_an_adapter_for_the_real_flux_dev_blocks_on_meta(comfy_ready):
    """FLUX.1 dev's structure (19 double + 38 single blocks of width 3072, 24 heads) on the meta device: the adapter is
    derived from it without touching a weight; rank 16 gives 11.2 M fp32 parameters (45 MB)."""
    import comfy.supported_models

    from likeness.techniques.face_fusion import new_fusion_adapter
    from test_attention_dit_host import FLUX_DEV_CONFIG

    config = comfy.supported_models.Flux(dict(FLUX_DEV_CONFIG))
    config.set_inference_dtype(torch.bfloat16, None)
    adapter = new_fusion_adapter(config.get_model({}, device=torch.device("meta")))
    assert (len(adapter.double_blocks), len(adapter.single_blocks), adapter.hidden) == (19, 38, 3072)
    assert adapter.metadata["heads"] == "24" and adapter.metadata["base"] == "flux"
    assert sum(p.numel() for p in adapter.parameters()) == 57 * 4 * 3072 * 16
