"""ConsistentID-SDXL encode end to end on the real host: a tiny SDXL-shaped UNet (pooled and size conds), a tiny
SDXL CLIP (the real SDXL tokenizer, CLIP-L + CLIP-G text models), tiny CLIP vision, the landmark face parser and a
scaled-down ConsistentID of the SDXL architecture with random weights."""
from __future__ import annotations

import pytest
import torch

import host_support
from faceid_support import random_faceid_checkpoint
from test_consistentid_encode import _sample, fake_faces

pytestmark = pytest.mark.host


@pytest.fixture(autouse=True)
def _unload_patched_models():
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()


def tiny_checkpoint(model, clip_vision, source: str):
    from likeness.techniques.consistentid.loader import load_consistentid_state_dict
    from likeness.techniques.faceid.lora import transformer_blocks

    channels = [r.channels for r in transformer_blocks(model)]
    groups = random_faceid_checkpoint(channels, 64, clip_dim=host_support.clip_vision_width(clip_vision), rank=4,
                                      facial_encoder=True)
    return load_consistentid_state_dict(groups, source=source)


POOLED = host_support.TINY_CONTEXT_DIM // 2       # the tiny CLIP-G's pooled width


@pytest.fixture
def sdxl_clip(comfy_ready):
    return host_support.build_tiny_sdxl_clip()


@pytest.fixture
def tiny_sdxl(comfy_ready):
    """The tiny SDXL UNet whose ``y`` takes the tiny SDXL CLIP's pooled output."""
    return host_support.build_tiny_sdxl(adm_in_channels=host_support.TINY_SDXL_CLIP_ADM)


@pytest.fixture
def node_inputs(tiny_sdxl, sdxl_clip, tiny_clip_vision):
    from likeness.face_analysis.parsing.parser import landmark_parser

    image = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(5))
    return dict(model=tiny_sdxl, clip=sdxl_clip, clip_vision=tiny_clip_vision,
                consistentid=tiny_checkpoint(tiny_sdxl, tiny_clip_vision, "tiny-consistentid-sdxl.bin"),
                image=image, faces=fake_faces(), parser=landmark_parser(), prompt="a photo of a woman",
                negative="blurry", id_weight=1.0, merge_at=0.5, lora_strength=1.0)


def _encode(node_inputs, **overrides):
    from likeness.nodes.consistentid import ConsistentIDEncode

    with torch.inference_mode():
        return ConsistentIDEncode().encode(**{**node_inputs, **overrides})


def test_tiny_sdxl_checkpoint_is_detected_as_sdxl(node_inputs):
    from likeness.techniques.consistentid.loader import consistentid_base, model_base

    checkpoint = node_inputs["consistentid"]
    assert consistentid_base(checkpoint) == model_base(node_inputs["model"])
    assert consistentid_base(checkpoint).base == "SDXL" and checkpoint.shortcut


def test_sdxl_conditioning_both_encoders_pooled_and_fused_rows(node_inputs, sdxl_clip):
    from likeness.techniques.consistentid.tokens import tokenize_facial_prompt

    model, positive, negative, text = _encode(node_inputs)
    assert "; Detail:" in text and "and a mouth" in text and text.count("<|facial|>") >= 3
    (plain, plain_opts), (fused, fused_opts) = positive
    assert plain.shape == fused.shape == negative[0][0].shape == (1, 77, 64)      # cat(CLIP-L 32, CLIP-G 32)
    for opts in (plain_opts, fused_opts, negative[0][1]):
        assert opts["pooled_output"].shape == (1, POOLED)
    with torch.inference_mode():
        user_only, user_pooled = sdxl_clip.encode_from_tokens(sdxl_clip.tokenize("a photo of a woman"),
                                                              return_pooled=True)
        marked, marked_pooled = sdxl_clip.encode_from_tokens(
            tokenize_facial_prompt(sdxl_clip, text).tokens, return_pooled=True)
    # text only = the user's prompt alone (the SDXL pipeline's encode_prompt(prompt)), with its pooled output
    torch.testing.assert_close(plain, user_only)
    torch.testing.assert_close(plain_opts["pooled_output"], user_pooled)
    torch.testing.assert_close(fused_opts["pooled_output"], marked_pooled)
    # fused = the marked text's encoding with only the feature-word rows replaced, over both encoders' columns
    changed = (marked - fused).abs().amax(dim=-1)[0].nonzero().flatten().tolist()
    positions = tokenize_facial_prompt(sdxl_clip, text).flat_positions
    assert changed == positions
    assert bool(((marked - fused)[0, positions, :32].abs().amax(-1) > 0).all())       # CLIP-L columns
    assert bool(((marked - fused)[0, positions, 32:].abs().amax(-1) > 0).all())       # CLIP-G columns


def test_sdxl_sampling_changes_with_the_adapter_and_weight_zero_equals_unpatched(node_inputs, tiny_sdxl):
    model, positive, negative, _ = _encode(node_inputs)
    base = _sample(tiny_sdxl, positive, negative)
    patched = _sample(model, positive, negative)
    assert torch.isfinite(patched).all() and (patched - base).abs().max() > 1e-4
    off, *_ = _encode(node_inputs, id_weight=0.0, lora_strength=0.0)
    assert torch.equal(_sample(off, positive, negative), base)


def test_merge_step_switches_context_and_pooled_output(node_inputs):
    """The UNet sees the plain context and its pooled ``y`` before merge_at, the fused ones after."""
    model, positive, negative, _ = _encode(node_inputs)
    (plain, plain_opts), (fused, fused_opts) = positive
    seen = []

    def wrapper(apply_model, args):
        c = args["c"]
        for chunk, kind in enumerate(args["cond_or_uncond"]):
            if kind == 0:
                rows = c["c_crossattn"].shape[0] // len(args["cond_or_uncond"])
                ctx = c["c_crossattn"][chunk * rows:(chunk + 1) * rows][:1, :77].cpu()
                pooled = c["y"][chunk * rows:(chunk + 1) * rows][:1, :POOLED].cpu()
                which = ("plain" if torch.allclose(ctx, plain) and torch.allclose(pooled, plain_opts["pooled_output"])
                         else "fused" if torch.allclose(ctx, fused)
                         and torch.allclose(pooled, fused_opts["pooled_output"]) else "?")
                seen.append(which)
        return apply_model(args["input"], args["timestep"], **c)

    _sample(model, positive, negative, wrapper=wrapper, steps=4)
    assert seen == ["plain", "plain", "fused", "fused"]


def test_file_and_model_of_different_bases_fail_naming_both(node_inputs, tiny_sd15, tiny_clip, tiny_clip_vision):
    from likeness.errors import ModelFileError

    sd15_file = tiny_checkpoint(tiny_sd15, tiny_clip_vision, "tiny-consistentid-sd15.bin")
    with pytest.raises(ModelFileError, match=r"SD1\.5 .*SDXL"):                     # SD1.5 file, SDXL model
        _encode(node_inputs, consistentid=sd15_file)
    with pytest.raises(ModelFileError, match=r"SDXL .*SD1\.5"):                     # SDXL file, SD1.5 model
        _encode(node_inputs, model=tiny_sd15, clip=tiny_clip)


def test_sd15_clip_on_sdxl_is_refused(node_inputs, comfy_ready):
    from likeness.errors import InvalidInputError

    narrow = host_support.build_tiny_clip(hidden=32)
    with pytest.raises(InvalidInputError, match="32-d text"):
        _encode(node_inputs, clip=narrow)


def real_sdxl_unet():
    """The real SDXL base UNet's module tree on the meta device (no weights)."""
    from likeness.host.weights import meta_unet

    return meta_unet(dict(host_support.sdxl_unet_config(model_channels=320, context_dim=2048),
                          transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                          transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], num_head_channels=64))


def real_sd15_unet():
    from likeness.host.weights import meta_unet

    return meta_unet(host_support.sd15_unet_config(model_channels=320, context_dim=768))


def test_official_layouts_fit_their_own_base_and_name_both_otherwise(comfy_ready):
    """ConsistentID_SDXL-v1.bin / ConsistentID-v1.bin layouts against the real SDXL / SD1.5 UNets."""
    from faceid_support import CONSISTENTID, state_dict_from_layout
    from likeness.errors import ModelFileError
    from likeness.techniques.consistentid.loader import check_base_matches, load_consistentid_state_dict

    sdxl_file = load_consistentid_state_dict(state_dict_from_layout("consistentid_sdxl_v1.json"),
                                             source="ConsistentID_SDXL-v1.bin")
    sd15_file = load_consistentid_state_dict(state_dict_from_layout(CONSISTENTID), source="ConsistentID-v1.bin")
    sdxl_unet, sd15_unet = real_sdxl_unet(), real_sd15_unet()
    assert check_base_matches(sdxl_file, sdxl_unet).describe() == "SDXL (70 transformer blocks, 2048-d text)"
    assert check_base_matches(sd15_file, sd15_unet).describe() == "SD1.5 (16 transformer blocks, 768-d text)"
    with pytest.raises(ModelFileError, match=r"ConsistentID-v1\.bin is a ConsistentID SD1\.5 .* the model is SDXL .*"
                       r"use ConsistentID_SDXL-v1\.bin"):
        check_base_matches(sd15_file, sdxl_unet)
    with pytest.raises(ModelFileError, match=r"ConsistentID_SDXL-v1\.bin is a ConsistentID SDXL .* the model is "
                       r"SD1\.5 .*use ConsistentID-v1\.bin"):
        check_base_matches(sdxl_file, sd15_unet)


def test_sdxl_localization_sites_are_the_official_three_blocks(comfy_ready):
    """The SDXL trainer hooks down_blocks.2 (2 x 10 blocks), mid_block (10) and up_blocks.1 (3 x 2) of the real
    SDXL UNet; SD1.5 keeps every site below full resolution (11)."""
    from likeness.attention_patches import find_sites
    from likeness.techniques.consistentid.localization import localization_sites

    sites = find_sites(real_sdxl_unet())
    chosen = localization_sites(sites, sdxl=True)
    assert len(sites) == 70 and len(chosen) == 36
    assert {(s.block[0], s.block[1]) for s in chosen} == (
        {("input", 7), ("input", 8), ("middle", 0), ("output", 3), ("output", 4), ("output", 5)})
    sd15 = find_sites(real_sd15_unet())
    assert len(localization_sites(sd15)) == 11
