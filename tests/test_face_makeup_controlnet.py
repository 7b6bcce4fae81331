"""Face-MakeUp's pose ControlNet: built through ComfyUI's ControlNet classes, fed the ID tokens (host tests),
plus the plain-tensor config derivation."""
from __future__ import annotations

import pytest
import torch

import host_support
from faceid_support import random_faceid_checkpoint
from likeness.techniques.faceid.controlnet_layout import ControlNetShape, expected_controlnet_shapes

TINY_SHAPE = ControlNetShape(in_channels=4, conditioning_channels=3, block_out_channels=(32, 64, 128, 128),
                             blocks_with_attention=(True, True, True, False), transformer_depth=(1, 1, 1, 0),
                             mid_transformer_depth=1, layers_per_block=2, time_embed_dim=128,
                             cross_attention_dim=64, linear_projection=False, embedding_channels=(16, 32, 96, 256))


def random_controlnet_group(shape: ControlNetShape = TINY_SHAPE, seed: int = 5) -> dict[str, torch.Tensor]:
    """A scaled-down diffusers ControlNet (tiny SD1.5 widths) with random, non-zero weights."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator) * (0.02 if len(s) > 1 else 0.1)
            for k, s in expected_controlnet_shapes(shape).items()}


def tiny_face_makeup_groups(model, clip_vision) -> dict:
    """Nested state dict of a scaled-down Face-MakeUp (adapter + ControlNet) for the tiny UNet / CLIP vision."""
    from likeness.techniques.faceid.lora import transformer_blocks

    channels = [r.channels for r in transformer_blocks(model)]
    hidden = host_support.clip_vision_width(clip_vision)
    groups = random_faceid_checkpoint(channels, 64, clip_dim=hidden, rank=4)
    groups["controlnet"] = random_controlnet_group()
    return groups


def tiny_face_makeup(model, clip_vision):
    from likeness.techniques.faceid.checkpoint import load_faceid_state_dict

    return load_faceid_state_dict(tiny_face_makeup_groups(model, clip_vision), source="tiny-face-makeup.bin")


def test_unet_config_from_shape_matches_sd15_layout():
    from likeness.techniques.faceid.controlnet import unet_config_from_shape

    config = unet_config_from_shape(TINY_SHAPE)
    assert config["channel_mult"] == [1, 2, 4, 4]
    assert config["num_res_blocks"] == [2, 2, 2, 2]
    assert config["transformer_depth"] == [1, 1, 1, 1, 1, 1, 0, 0]
    assert config["transformer_depth_output"] == [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert config["context_dim"] == 64 and config["model_channels"] == 32


@pytest.fixture
def _unload_models():
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()


def _sample(model, positive, negative, seed=0):
    import comfy.sample

    latent = torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), 2, 5.0, "euler", "normal",
                                   positive, negative, latent, seed=seed, disable_pbar=True)


def _attn2_context_lengths(module: torch.nn.Module, lengths: list[int]) -> list:
    """Forward pre-hooks recording the context length every attn2 receives."""
    def hook(_mod, args, kwargs):
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        lengths.append(int(context.shape[1]))
    return [m.register_forward_pre_hook(hook, with_kwargs=True)
            for name, m in module.named_modules() if name.endswith("attn2")]


@pytest.mark.host
def test_controlnet_built_by_comfy_and_fed_the_id_tokens(tiny_sd15, tiny_clip_vision, _unload_models):
    import comfy.controlnet

    from host_support import conditioning
    from likeness.nodes.faceid import FaceMakeUpApply
    from test_consistentid_encode import fake_faces

    checkpoint = tiny_face_makeup(tiny_sd15, tiny_clip_vision)
    assert checkpoint.variant.value and checkpoint.controlnet_shape == TINY_SHAPE
    image = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(3))
    positive, negative = conditioning(seed=1), conditioning(seed=2)
    with torch.inference_mode():
        model, pos, neg = FaceMakeUpApply().apply(tiny_sd15, checkpoint, tiny_clip_vision, image, fake_faces(),
                                                  positive, negative, 0.6, 1.0, 1.0, 0.2, 0.0, 1.0)
    control = pos[0][1]["control"]
    assert isinstance(control, comfy.controlnet.ControlNet)
    assert control is not neg[0][1]["control"]
    assert pos[0][1]["cross_attn_controlnet"].shape == (1, 4, 64)
    assert not torch.equal(pos[0][1]["cross_attn_controlnet"], neg[0][1]["cross_attn_controlnet"])
    assert "control" not in positive[0][1]                          # inputs not modified

    control_lengths, unet_lengths = [], []
    hooks = _attn2_context_lengths(control.control_model, control_lengths)
    counted = model.clone()       # the engine replaces attn2; an attn2_patch sees the context it is given

    def count(n, context, value, extra_options):
        unet_lengths.append(int(context.shape[1]))
        return n, context, value
    counted.set_model_attn2_patch(count)
    try:
        out = _sample(counted, pos, neg)
        adapter_only = _sample(model, positive, negative)
    finally:
        for h in hooks:
            h.remove()
    assert control_lengths and set(control_lengths) == {4}          # the ControlNet attends to the 4 ID tokens
    assert unet_lengths and set(unet_lengths) == {77}               # UNet attn2 keeps the text; ID via the injector
    from likeness.attention_patches.patch import find_patch_in_options

    patch = find_patch_in_options(model.model_options["transformer_options"])
    assert patch is not None and len(patch.injectors) == 1          # + the 4 ID tokens, decoupled
    assert patch.injectors[0].provider.kv[(0, 0)][0].shape[-2] == 4   # keys of the positive ID tokens, site 0
    assert (out - adapter_only).abs().max() > 1e-5                 # the ControlNet contributes


@pytest.mark.host
def test_all_zero_strengths_give_the_unpatched_output(tiny_sd15, tiny_clip_vision, _unload_models):
    from host_support import conditioning
    from likeness.nodes.faceid import FaceMakeUpApply
    from test_consistentid_encode import fake_faces

    checkpoint = tiny_face_makeup(tiny_sd15, tiny_clip_vision)
    image = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(3))
    positive, negative = conditioning(seed=1), conditioning(seed=2)
    pose = torch.rand(1, 96, 96, 3)
    with torch.inference_mode():
        model, pos, neg = FaceMakeUpApply().apply(tiny_sd15, checkpoint, tiny_clip_vision, image, fake_faces(),
                                                  positive, negative, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, pose_map=pose)
    assert torch.equal(_sample(model, pos, neg), _sample(tiny_sd15, positive, negative))


@pytest.mark.host
def test_real_face_makeup_layout_maps_onto_comfys_controlnet(comfy_ready):
    """The full-size group (meta tensors, from the official layout) is detected by ComfyUI as SD1.5 and every key
    lands on a parameter of comfy's ControlNet with the same shape."""
    import comfy.cldm.cldm
    import comfy.model_detection
    import comfy.ops

    from faceid_support import FACE_MAKEUP, read_layout
    from likeness.techniques.faceid.controlnet import diffusers_to_comfy_keys

    layout = read_layout(FACE_MAKEUP)["groups"]["controlnet"]
    sd = {k: torch.empty(spec["shape"], device="meta") for k, spec in layout.items()}
    config = comfy.model_detection.unet_config_from_diffusers_unet(sd)
    assert config is not None and config["model_channels"] == 320 and config["context_dim"] == 768
    key_map = diffusers_to_comfy_keys(sd, config)
    assert set(sd) <= set(key_map)
    config = dict(config, operations=comfy.ops.disable_weight_init, device="meta", hint_channels=3)
    config.pop("out_channels")
    target = comfy.cldm.cldm.ControlNet(**config).state_dict()
    converted = {key_map[k]: tuple(v.shape) for k, v in sd.items()}
    assert set(converted) == set(target)
    assert all(tuple(target[k].shape) == shape for k, shape in converted.items())


def test_face_makeup_apply_refuses_a_plain_faceid_file():
    from likeness.errors import InvalidInputError
    from likeness.techniques.faceid.apply import IDTokens, apply_face_makeup
    from likeness.techniques.faceid.checkpoint import load_faceid_state_dict

    checkpoint = load_faceid_state_dict(random_faceid_checkpoint([32, 64], 64), source="tiny-faceid-plusv2.bin")
    tokens = IDTokens(torch.zeros(1, 4, 64), torch.zeros(1, 4, 64))
    with pytest.raises(InvalidInputError, match="not Face-MakeUp"):
        apply_face_makeup(object(), checkpoint, tokens, [], [], torch.zeros(1, 8, 8, 3))
