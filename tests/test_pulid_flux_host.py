"""PuLID-FLUX on a tiny FLUX.1 built from ComfyUI's own Flux class (4 double + 8 single blocks, width 64) with a
tiny IDFormer / cross-attention set of the released architecture: the official block schedule and CA index mapping,
weight 0 = unpatched, one mask per person, another pack's ``dit`` patch, cond/uncond rows, refused inputs."""
from __future__ import annotations

import pytest
import torch

from pulid_support import TINY_CA, tiny_pulid
from test_attention_dit_host import BlockSpy, _call

pytestmark = pytest.mark.host

ALL_BLOCKS = [("double_block", i) for i in range(4)] + [("single_block", i) for i in range(8)]
SCHEDULED = {("double_block", 0): 0, ("double_block", 2): 1, ("single_block", 0): 2, ("single_block", 4): 3}


def make_embeds(seed: int = 0, tokens: int = 4):
    from likeness.techniques.pulid_flux.embeds import PulidFluxEmbeds

    g = torch.Generator().manual_seed(seed)
    return PulidFluxEmbeds(torch.randn(1, tokens, TINY_CA.id_dim, generator=g),
                           torch.randn(1, tokens, TINY_CA.id_dim, generator=g) * 0.1, "tiny")


@pytest.fixture(scope="module")
def pulid():
    return tiny_pulid(seed=1, count=4)


def spy_all(model, keys=ALL_BLOCKS):
    replaces = model.model_options["transformer_options"]["patches_replace"]["dit"]
    spies = {key: BlockSpy(replaces[key]) for key in keys}
    for key, spy in spies.items():
        model.set_model_patch_replace(spy, "dit", key[0], key[1])
    return spies


def image_part(stream: torch.Tensor, key, txt: int = 16) -> torch.Tensor:
    return stream if key[0] == "double_block" else stream[:, txt:]


def test_the_schedule_of_the_release_on_flux1_dev():
    """19 double + 38 single blocks: CA 0..9 after double blocks 0, 2, .., 18, CA 10..19 after single 0, 4, .., 36."""
    from likeness.attention_patches import DitSite
    from likeness.techniques.pulid_flux.injector import ca_schedule

    sites = [DitSite(i, "double", i, 3072, 24, 128) for i in range(19)]
    sites += [DitSite(19 + i, "single", i, 3072, 24, 128) for i in range(38)]
    schedule = ca_schedule(sites)
    assert len(schedule) == 20
    assert [sites[i].block_id for i in schedule if sites[i].kind == "double"] == list(range(0, 19, 2))
    assert [sites[i].block_id for i in schedule if sites[i].kind == "single"] == list(range(0, 38, 4))
    assert list(schedule.values()) == list(range(20))
    assert schedule[19] == 10 and schedule[19 + 36] == 19


def test_weight_zero_is_the_unpatched_model(tiny_flux, pulid):
    from likeness.techniques.pulid_flux.injector import apply_pulid_flux

    reference = _call(tiny_flux)
    patched = apply_pulid_flux(tiny_flux, pulid, make_embeds(), weight=0.0)
    assert torch.equal(_call(patched), reference)
    assert not torch.allclose(_call(apply_pulid_flux(tiny_flux, pulid, make_embeds(), weight=1.0)), reference)


def test_residual_only_at_the_scheduled_blocks_with_the_official_ca_index(tiny_flux, pulid):
    from likeness.techniques.pulid_flux.injector import apply_pulid_flux

    embeds = make_embeds(2)
    model = apply_pulid_flux(tiny_flux, pulid, embeds, weight=0.7)
    spies = spy_all(model)
    _call(model)
    for key, spy in spies.items():
        out, bare = spy.records[0]
        delta = image_part(out, key) - image_part(bare, key)
        if key not in SCHEDULED:
            assert float(delta.abs().max()) == 0.0, key
            continue
        if key[0] == "single_block":
            assert float((out - bare)[:, :16].abs().max()) == 0.0   # text tokens untouched
        ca = pulid.cross_attentions[SCHEDULED[key]]
        with torch.no_grad():
            expected = 0.7 * ca(embeds.tokens, image_part(bare, key))
        torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)
        others = [pulid.cross_attentions[i](embeds.tokens, image_part(bare, key)) for i in range(4)
                  if i != SCHEDULED[key]]
        assert all(not torch.allclose(delta, 0.7 * o, atol=1e-4) for o in others), key


def _halves():
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1.0
    return left, 1.0 - left


def test_two_people_with_disjoint_masks_each_change_only_their_tokens(tiny_flux, pulid):
    from likeness.attention_patches import find_patch
    from likeness.techniques.pulid_flux.injector import apply_pulid_flux

    left, right = _halves()
    a, b = make_embeds(3), make_embeds(4)
    one = apply_pulid_flux(tiny_flux, pulid, a, weight=1.0, mask=left)
    two = apply_pulid_flux(one, pulid, b, weight=1.5, mask=right)
    assert [i.name for i in find_patch(two).injectors] == ["pulid_flux", "pulid_flux#2"]
    spies = spy_all(two, list(SCHEDULED))
    _call(two)
    for key, spy in spies.items():
        out, bare = spy.records[0]
        img = image_part(bare, key)
        delta = (image_part(out, key) - img).view(1, 4, 4, -1)
        ca = pulid.cross_attentions[SCHEDULED[key]]
        with torch.no_grad():
            from_a = ca(a.tokens, img).view(1, 4, 4, -1)
            from_b = 1.5 * ca(b.tokens, img).view(1, 4, 4, -1)
        torch.testing.assert_close(delta[:, :, :2], from_a[:, :, :2], atol=1e-5, rtol=1e-4)   # person a: left
        torch.testing.assert_close(delta[:, :, 2:], from_b[:, :, 2:], atol=1e-5, rtol=1e-4)   # person b: right
        assert float(from_a[:, :, 2:].abs().max()) > 1e-3   # a would have changed the right half without its mask


def test_a_foreign_dit_patch_and_ours_both_run(tiny_flux, pulid):
    from likeness.techniques.pulid_flux.injector import apply_pulid_flux

    calls = []

    def foreign(args, extra):   # another pack's replacement of a scheduled block: scales its image output
        calls.append(1)
        out = extra["original_block"](args)
        return {**out, "img": out["img"] * 1.5}

    foreign_only = tiny_flux.clone()
    foreign_only.set_model_patch_replace(foreign, "dit", "double_block", 2)
    with_foreign = _call(foreign_only)
    both = apply_pulid_flux(foreign_only, pulid, make_embeds(), weight=1.0)
    calls.clear()
    result = _call(both)
    assert len(calls) == 1
    ours_only = _call(apply_pulid_flux(tiny_flux, pulid, make_embeds(), weight=1.0))
    assert not torch.allclose(result, with_foreign) and not torch.allclose(result, ours_only)


@pytest.mark.parametrize("uncond", ["zero_id", "none"])
def test_negative_rows_get_the_zero_id_tokens_or_nothing(tiny_flux, pulid, uncond):
    from likeness.techniques.pulid_flux.injector import apply_pulid_flux

    embeds = make_embeds(5)
    model = apply_pulid_flux(tiny_flux, pulid, embeds, weight=1.0, uncond=uncond)
    spy = spy_all(model, [("double_block", 0)])[("double_block", 0)]
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3)).repeat(2, 1, 1, 1)
    _call(model, x=x, cond_or_uncond=[1, 0])   # negative chunk first, as ComfyUI batches real CFG
    out, bare = spy.records[0]
    ca = pulid.cross_attentions[0]
    with torch.no_grad():
        torch.testing.assert_close(out[1] - bare[1], ca(embeds.tokens, bare[1:2])[0], atol=1e-5, rtol=1e-4)
        if uncond == "none":
            assert torch.equal(out[0], bare[0])
        else:
            torch.testing.assert_close(out[0] - bare[0], ca(embeds.uncond_tokens, bare[0:1])[0], atol=1e-5,
                                       rtol=1e-4)


def test_start_end_outside_the_call_sigma_is_the_unpatched_model(tiny_flux, pulid):
    from likeness.techniques.pulid_flux.injector import apply_pulid_flux

    reference = _call(tiny_flux, sigma=0.9)
    late = apply_pulid_flux(tiny_flux, pulid, make_embeds(), weight=1.0, start_at=0.6, end_at=1.0)
    assert torch.equal(_call(late, sigma=0.9), reference)
    assert not torch.allclose(_call(late, sigma=0.05), _call(tiny_flux, sigma=0.05))


def test_refused_inputs(tiny_flux, tiny_sd15, pulid):
    from likeness.errors import IncompatibleEmbedsError, InvalidInputError, UnsupportedModelError
    from likeness.techniques.pulid_flux.embeds import PulidFluxEmbeds
    from likeness.techniques.pulid_flux.encoders import CrossAttentionConfig
    from likeness.techniques.pulid_flux.injector import apply_pulid_flux

    with pytest.raises(UnsupportedModelError, match="UNet"):
        apply_pulid_flux(tiny_sd15, pulid, make_embeds())
    narrow = tiny_pulid(count=4, ca=CrossAttentionConfig(dim=32, dim_head=8, heads=4, id_dim=24))
    with pytest.raises(UnsupportedModelError, match="width 32.*\\[64\\] wide"):
        apply_pulid_flux(tiny_flux, narrow, make_embeds())
    with pytest.raises(UnsupportedModelError, match="4 blocks on PuLID's schedule.*2 ID cross-attentions"):
        apply_pulid_flux(tiny_flux, tiny_pulid(count=2), make_embeds())
    wrong = PulidFluxEmbeds(torch.zeros(1, 4, 16), torch.zeros(1, 4, 16), "other.safetensors")
    with pytest.raises(IncompatibleEmbedsError, match="24-wide"):
        apply_pulid_flux(tiny_flux, pulid, wrong)
    with pytest.raises(InvalidInputError, match="start"):
        apply_pulid_flux(tiny_flux, pulid, make_embeds(), start_at=0.8, end_at=0.2)
    with pytest.raises(InvalidInputError, match="PuLID-FLUX Loader"):
        apply_pulid_flux(tiny_flux, object(), make_embeds())


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_sampling_loads_the_cross_attentions_with_the_model(tiny_flux, pulid, cfg):
    """Through ComfyUI's sampler: the cross-attentions' ModelPatcher is one of the patch's models (loaded with the
    DiT), cfg 1 (one conditional pass) and real CFG (negative rows get the zero-ID tokens) both sample."""
    from host_support import flux_conditioning, sample_tiny
    from likeness.attention_patches import find_patch
    from likeness.techniques.pulid_flux.injector import apply_pulid_flux

    model = apply_pulid_flux(tiny_flux, pulid, make_embeds(6), weight=1.0)
    assert find_patch(model).models() == [pulid.patcher] and pulid.patcher.model is pulid.cross_attentions
    latent = torch.zeros(1, 16, 8, 8)
    kwargs = dict(steps=2, cfg=cfg, positive=flux_conditioning(1), negative=flux_conditioning(2), latent=latent)
    patched = sample_tiny(model, **kwargs)
    import comfy.model_management

    assert any(loaded.model is pulid.patcher for loaded in comfy.model_management.current_loaded_models)
    plain = sample_tiny(tiny_flux, **kwargs)
    assert torch.isfinite(patched).all() and not torch.allclose(patched, plain)


def test_blocks_off_the_schedule_are_not_touched_by_the_engine(tiny_flux, pulid):
    """Only the 4 scheduled blocks of the tiny Flux (of 12) go through the engine's residual path."""
    from likeness.attention_patches import attach_stats
    from likeness.techniques.pulid_flux.injector import apply_pulid_flux

    model = apply_pulid_flux(tiny_flux, pulid, make_embeds(), weight=1.0)
    stats = attach_stats(model)
    _call(model)
    touched = {index for index, calls in stats.site_calls.items() if calls}
    assert touched == {0, 2, 4, 8}   # double 0, 2 and single 0, 4 (sites 4 + block id)
