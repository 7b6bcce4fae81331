"""FaceID-family LoRA -> ComfyUI weight patches, and the ID-branch weights per cross-attention site.

Plain: the processor <-> block derivation on a stand-in UNet of SD1.5 structure. Host: on the tiny SD1.5 (and
SDXL) UNets, ``add_patches`` + patching gives exactly ``W + up @ down`` on every targeted weight, for all 32
processors, and the derivation agrees with the engine's site order.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from faceid_support import random_adapter_group
from likeness.errors import CheckpointLayoutError
from likeness.techniques.faceid.ip_weights import ip_site_weights, ip_weights_by_order
from likeness.techniques.faceid.lora import check_adapter_fits, lora_factors, transformer_blocks
from likeness.techniques.faceid.processors import parse_adapter


class _Attn(nn.Module):
    def __init__(self, c, ctx):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c, bias=False), nn.Linear(ctx, c, bias=False), \
            nn.Linear(ctx, c, bias=False)
        self.to_out = nn.Sequential(nn.Linear(c, c), nn.Dropout(0.0))


class _Basic(nn.Module):
    def __init__(self, c, ctx):
        super().__init__()
        self.attn1, self.attn2 = _Attn(c, c), _Attn(c, ctx)


class _Spatial(nn.Module):
    def __init__(self, c, ctx, depth=1):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(_Basic(c, ctx) for _ in range(depth))


class StandInUNet(nn.Module):
    """ComfyUI openaimodel layout of SD1.5 (which blocks hold a SpatialTransformer, at which child index)."""

    def __init__(self, base=8, ctx=16):
        super().__init__()
        widths_in = [None, base, base, None, 2 * base, 2 * base, None, 4 * base, 4 * base, None, None, None]
        self.input_blocks = nn.ModuleList(
            nn.Sequential(nn.Identity(), *([_Spatial(c, ctx)] if c else [])) for c in widths_in)
        self.middle_block = nn.Sequential(nn.Identity(), _Spatial(4 * base, ctx), nn.Identity())
        widths_out = [None] * 3 + [4 * base] * 3 + [2 * base] * 3 + [base] * 3
        self.output_blocks = nn.ModuleList(
            nn.Sequential(nn.Identity(), *([_Spatial(c, ctx)] if c else [])) for c in widths_out)


class StandInBaseModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.diffusion_model = StandInUNet()


def test_blocks_derived_in_diffusers_order():
    refs = transformer_blocks(StandInBaseModel())
    assert len(refs) == 16
    assert [r.block for r in refs] == ([("input", i) for i in (1, 2, 4, 5, 7, 8)]
                                       + [("output", i) for i in range(3, 12)] + [("middle", 0)])
    assert refs[0].prefix == "diffusion_model.input_blocks.1.1.transformer_blocks.0"
    assert refs[15].prefix == "diffusion_model.middle_block.1.transformer_blocks.0"
    assert [r.channels for r in refs] == [8, 8, 16, 16, 32, 32, 32, 32, 32, 16, 16, 16, 8, 8, 8, 32]
    assert (refs[6].attn1_processor, refs[6].attn2_processor, refs[6].patch_key) == (12, 13, ("output", 3, 0))


def test_lora_factor_keys_cover_every_processor():
    refs = transformer_blocks(StandInBaseModel())
    adapter = parse_adapter(random_adapter_group([r.channels for r in refs], context_dim=16, rank=4))
    factors = lora_factors(adapter, refs)
    assert len(factors) == 32 * 4
    key = "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    up, down = factors[key]
    assert torch.equal(down, adapter.processors[13].lora["to_k"][0])   # attn2 of block k=6 is processor 13
    assert up.shape == (32, 4) and down.shape == (4, 16)              # to_k takes the text context
    model_sd = StandInBaseModel().state_dict()
    for key, (up, down) in factors.items():
        assert tuple(model_sd[key].shape) == (up.shape[0], down.shape[1]), key


def test_ip_weights_per_site():
    refs = transformer_blocks(StandInBaseModel())
    adapter = parse_adapter(random_adapter_group([r.channels for r in refs], context_dim=16, rank=4))
    sites = ip_site_weights(adapter, refs)
    assert [s.processor_index for s in sites] == list(range(1, 32, 2))
    assert sites[15].block == ("middle", 0) and sites[15].patch_key == ("middle", 0, 0)
    assert torch.equal(sites[3].to_k_ip, adapter.processors[7].to_k_ip)
    assert set(ip_weights_by_order(adapter)) == set(range(16))


def test_adapter_for_another_model_is_refused():
    refs = transformer_blocks(StandInBaseModel())
    wrong_width = parse_adapter(random_adapter_group([r.channels * 2 for r in refs], context_dim=16, rank=4))
    with pytest.raises(CheckpointLayoutError, match="wrong base model"):
        check_adapter_fits(wrong_width, refs)
    sdxl_like = parse_adapter(random_adapter_group([8] * 70, context_dim=16, rank=4))
    with pytest.raises(CheckpointLayoutError, match="140 attention processors.*SDXL.*16 transformer blocks"):
        lora_factors(sdxl_like, refs)
    with pytest.raises(CheckpointLayoutError, match="not a UNet"):
        transformer_blocks(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------------------------
# Host

@pytest.mark.host
@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_comfy_weight_patches_equal_w_plus_up_down(which, tiny_sd15, tiny_sdxl):
    import comfy.model_management

    from likeness.attention_patches.sites import find_sites
    from likeness.techniques.faceid.lora import apply_lora, comfy_lora_patches

    comfy.model_management.unload_all_models()      # no other test's patches left in the shared tiny weights
    model = tiny_sd15 if which == "sd15" else tiny_sdxl
    refs = transformer_blocks(model)
    assert len(refs) == (16 if which == "sd15" else 22)               # tiny SDXL: depth 2 instead of 10
    # the derivation agrees with the engine's attn2 sites (order k <-> ComfyUI block)
    engine_order = {site.key: site.order for site in find_sites(model)}
    assert {r.patch_key: r.order for r in refs} == engine_order

    ctx_dim = model.model.model_config.unet_config["context_dim"]
    adapter = parse_adapter(random_adapter_group([r.channels for r in refs], ctx_dim, rank=4, std=0.1))
    patches = comfy_lora_patches(model, adapter)
    assert len(patches) == len(refs) * 2 * 4                          # every processor's q/k/v/out
    covered = {(key.rsplit(".attn", 1)[0], key.split(".attn")[1][0]) for key in patches}
    assert len(covered) == 2 * len(refs)

    original = {k: v.clone() for k, v in model.model.state_dict().items() if k in patches}
    patched = apply_lora(model, adapter, strength=1.0)
    patched.patch_model()
    try:
        state = patched.model.state_dict()
        for key, (up, down) in lora_factors(adapter, refs).items():
            torch.testing.assert_close(state[key], original[key] + up @ down, rtol=1e-5, atol=1e-6)
        untouched = "diffusion_model.out.2.weight"
        assert torch.equal(state[untouched], model.model.state_dict()[untouched])
    finally:
        patched.unpatch_model()
    for key, value in original.items():                               # unpatching restores the weights
        assert torch.equal(model.model.state_dict()[key], value)
    assert not apply_lora(model, adapter, strength=0.0).patches       # strength 0: nothing added


@pytest.mark.host
def test_sd15_adapter_on_sdxl_model_is_refused(tiny_sd15, tiny_sdxl):
    from likeness.techniques.faceid.lora import comfy_lora_patches

    refs = transformer_blocks(tiny_sd15)
    adapter = parse_adapter(random_adapter_group([r.channels for r in refs], 64, rank=4))
    with pytest.raises(CheckpointLayoutError, match="transformer blocks"):
        comfy_lora_patches(tiny_sdxl, adapter)


@pytest.mark.host
def test_blocks_from_config_match_the_model(tiny_sd15):
    from likeness.techniques.faceid.lora import transformer_blocks_from_config

    from_config = transformer_blocks_from_config(tiny_sd15.model.model_config.unet_config)
    assert from_config == transformer_blocks(tiny_sd15)


def test_identity_kv_provider_projects_and_memoises():
    from types import SimpleNamespace

    from likeness.techniques.faceid.ip_weights import IdentityKV

    refs = transformer_blocks(StandInBaseModel())
    adapter = parse_adapter(random_adapter_group([r.channels for r in refs], context_dim=16, rank=4))
    cond, uncond = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    provider = IdentityKV(adapter, cond, uncond)
    site = SimpleNamespace(order=6, channels=32, key=("output", 3, 0))
    k, v = provider(site, 0)
    torch.testing.assert_close(k, cond @ adapter.processors[13].to_k_ip.T)
    torch.testing.assert_close(provider(site, 1)[1], uncond @ adapter.processors[13].to_v_ip.T)
    assert provider(site, 0)[0] is k                                   # memoised per site and kind
    assert IdentityKV(adapter, cond, None)(site, 1) is None            # no ID for negative chunks
    with pytest.raises(CheckpointLayoutError, match="wrong base model"):
        provider(SimpleNamespace(order=6, channels=64, key=("output", 3, 0)), 0)
    with pytest.raises(CheckpointLayoutError, match="8"):
        IdentityKV(adapter, torch.randn(1, 4, 8), None)
