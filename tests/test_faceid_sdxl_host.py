"""Host: the SDXL FaceID chains and InstantID end to end on the tiny SDXL-shaped UNet (pooled and size conds),
the IdentityNet built by ComfyUI and fed the ID tokens, base-model mismatches named, and the separate LoRA file
through ComfyUI's stock LoRA loader equal to the LoRA inside the .bin."""
from __future__ import annotations

import pytest
import torch

import host_support
from faceid_support import (
    FACEID,
    FACEID_SDXL,
    INSTANTID_CONTROLNET,
    random_faceid_checkpoint,
    random_instantid_checkpoint,
    read_layout,
    state_dict_from_layout,
)
from likeness.errors import CheckpointLayoutError
from likeness.techniques.faceid.controlnet_layout import ControlNetShape, expected_controlnet_shapes
from test_consistentid_encode import fake_faces

pytestmark = pytest.mark.host

# comfy/supported_models.py SDXL as model_detection finds it: 70 transformer blocks, 2048-d context
SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False}
SD15_UNET = host_support.sd15_unet_config(model_channels=320, context_dim=768)

# A scaled-down IdentityNet for the tiny SDXL (its encoder widths, 2 transformer layers, SDXL's added conds)
TINY_SDXL_CONTROLNET = ControlNetShape(
    in_channels=4, conditioning_channels=3, block_out_channels=(32, 64, 128), blocks_with_attention=(False, True, True),
    transformer_depth=(0, 2, 2), mid_transformer_depth=2, layers_per_block=2, time_embed_dim=128,
    cross_attention_dim=64, linear_projection=True, embedding_channels=(16, 32, 96, 256),
    addition_embed_dim=host_support.TINY_SDXL_POOLED_DIM + 6 * 256)


@pytest.fixture(autouse=True)
def _unload_models():
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()


def _sample(model, positive=None, negative=None, seed=0):
    import comfy.sample

    positive = positive or host_support.sdxl_conditioning(seed=1)
    negative = negative or host_support.sdxl_conditioning(seed=2)
    latent = torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), 2, 5.0, "euler", "normal",
                                   positive, negative, latent, seed=seed, disable_pbar=True)


def antelope_faces():
    """The test FACES as if analysed with antelopev2 (what InstantID was trained on: no model warning)."""
    import dataclasses

    return dataclasses.replace(fake_faces(), model_id="insightface:antelopev2/glintr100")


def _channels(model) -> list[int]:
    from likeness.techniques.faceid.lora import transformer_blocks

    return [r.channels for r in transformer_blocks(model)]


def _arcface(seed: int = 4) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("variant_name, tokens, with_lora", [("faceid", 4, True), ("faceid_portrait", 16, False)])
def test_faceid_sdxl_chain_runs_and_zero_weights_are_unpatched(tiny_sdxl, variant_name, tokens, with_lora):
    from likeness.techniques.faceid.apply import apply_faceid_adapter, encode_id_tokens
    from likeness.techniques.faceid.checkpoint import load_faceid_state_dict

    groups = random_faceid_checkpoint(_channels(tiny_sdxl), 64, kind="mlp", rank=4, num_tokens=tokens,
                                      with_lora=with_lora)
    checkpoint = load_faceid_state_dict(groups, source=f"tiny-{variant_name}_sdxl.bin")
    assert checkpoint.variant.value == variant_name and checkpoint.num_tokens == tokens
    assert len(checkpoint.adapter.processors) == 2 * len(_channels(tiny_sdxl))
    id_tokens = encode_id_tokens(checkpoint, _arcface())
    base = _sample(tiny_sdxl)
    off = _sample(apply_faceid_adapter(tiny_sdxl, checkpoint, id_tokens, weight=0.0, lora_strength=0.0))
    on = _sample(apply_faceid_adapter(tiny_sdxl, checkpoint, id_tokens, weight=1.0, lora_strength=1.0))
    id_only = _sample(apply_faceid_adapter(tiny_sdxl, checkpoint, id_tokens, weight=1.0, lora_strength=0.0))
    assert torch.equal(off, base)
    assert (on - base).abs().max() > 1e-4 and (id_only - base).abs().max() > 1e-4
    assert torch.equal(on, id_only) != with_lora          # the LoRA acts where the file has one


def test_plusv2_sdxl_through_the_apply_node(tiny_sdxl, tiny_clip_vision):
    from likeness.nodes.faceid import FaceIDApply
    from likeness.techniques.faceid.checkpoint import Variant, load_faceid_state_dict

    hidden = host_support.clip_vision_width(tiny_clip_vision)
    groups = random_faceid_checkpoint(_channels(tiny_sdxl), 64, clip_dim=hidden, rank=4)
    checkpoint = load_faceid_state_dict(groups, source="tiny-faceid-plusv2_sdxl.bin")
    assert checkpoint.variant == Variant.FACEID_PLUSV2
    image = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        (model,) = FaceIDApply().apply(tiny_sdxl, checkpoint, image, fake_faces(), 1.0, 1.0, 1.0, 0.0, 1.0,
                                       clip_vision=tiny_clip_vision)
        (off,) = FaceIDApply().apply(tiny_sdxl, checkpoint, image, fake_faces(), 0.0, 1.0, 0.0, 0.0, 1.0,
                                     clip_vision=tiny_clip_vision)
    base = _sample(tiny_sdxl)
    assert (_sample(model) - base).abs().max() > 1e-4
    assert torch.equal(_sample(off), base)


def test_an_adapter_for_the_other_base_model_is_refused_naming_both(tiny_sdxl, tiny_sd15):
    from likeness.techniques.faceid.apply import IDTokens, apply_faceid_adapter
    from likeness.techniques.faceid.checkpoint import load_faceid_state_dict
    from likeness.techniques.faceid.lora import check_adapter_fits, transformer_blocks_from_config
    from likeness.techniques.faceid.processors import parse_adapter

    # the released layouts against the real UNets (meta device)
    sdxl_blocks, sd15_blocks = transformer_blocks_from_config(SDXL_UNET), transformer_blocks_from_config(SD15_UNET)
    assert len(sdxl_blocks) == 70 and len(sd15_blocks) == 16
    sd15_adapter = parse_adapter(state_dict_from_layout(FACEID)["ip_adapter"])
    sdxl_adapter = parse_adapter(state_dict_from_layout(FACEID_SDXL)["ip_adapter"])
    check_adapter_fits(sdxl_adapter, sdxl_blocks)
    check_adapter_fits(sd15_adapter, sd15_blocks)
    with pytest.raises(CheckpointLayoutError, match=r"ip-adapter-faceid_sd15\.bin .*for SD1\.5.* model is SDXL"):
        check_adapter_fits(sd15_adapter, sdxl_blocks, "ip-adapter-faceid_sd15.bin")
    with pytest.raises(CheckpointLayoutError, match=r"for SDXL.* model is SD1\.5"):
        check_adapter_fits(sdxl_adapter, sd15_blocks, "ip-adapter-faceid_sdxl.bin")
    # and through the apply function, before anything is patched
    small = load_faceid_state_dict(random_faceid_checkpoint(_channels(tiny_sd15), 64, kind="mlp"), source="sd15.bin")
    tokens = IDTokens(torch.zeros(1, 4, 64), torch.zeros(1, 4, 64))
    with pytest.raises(CheckpointLayoutError, match=r"sd15\.bin has 32 attention processors, an adapter for SD1\.5"):
        apply_faceid_adapter(tiny_sdxl, small, tokens)


def _comfy_diffusers_names(model) -> dict[str, str]:
    """ComfyUI weight key -> diffusers module name, from ComfyUI's own map for this model's config."""
    import comfy.utils

    names = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {f"diffusion_model.{comfy}": diffusers[:-len(".weight")] for diffusers, comfy in names.items()
            if diffusers.endswith(".weight")}


def test_separate_lora_file_through_the_stock_loader_equals_the_bin_lora(tiny_sdxl):
    """The ``_lora.safetensors`` files are the .bin's LoRA in webui key names (lora_unet_<diffusers name>): loaded by
    ComfyUI's LoRA loader they patch exactly the weights our .bin path patches, with the same values."""
    from likeness.host.weights import add_lora_state_dict
    from likeness.techniques.faceid.checkpoint import load_faceid_state_dict
    from likeness.techniques.faceid.lora import apply_lora, lora_factors, transformer_blocks

    checkpoint = load_faceid_state_dict(random_faceid_checkpoint(_channels(tiny_sdxl), 64, kind="mlp", rank=4),
                                        source="tiny-faceid_sdxl.bin")
    names = _comfy_diffusers_names(tiny_sdxl)
    webui = {}
    for key, (up, down) in lora_factors(checkpoint.adapter, transformer_blocks(tiny_sdxl)).items():
        prefix = "lora_unet_" + names[key].replace(".", "_")
        webui |= {f"{prefix}.lora_up.weight": up, f"{prefix}.lora_down.weight": down,
                  f"{prefix}.alpha": torch.tensor(float(up.shape[1]))}
    stock = add_lora_state_dict(tiny_sdxl, webui, 0.8)
    ours = apply_lora(tiny_sdxl, checkpoint.adapter, 0.8)
    assert set(stock.patches) == set(ours.patches) and len(ours.patches) == 4 * 2 * len(_channels(tiny_sdxl))
    torch.testing.assert_close(_sample(stock), _sample(ours), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# InstantID

def tiny_identitynet(seed: int = 5):
    from likeness.techniques.faceid.controlnet import build_id_controlnet
    from likeness.techniques.faceid.controlnet_layout import validate_controlnet_state_dict

    generator = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=generator) * (0.02 if len(s) > 1 else 0.1)
          for k, s in expected_controlnet_shapes(TINY_SDXL_CONTROLNET).items()}
    return build_id_controlnet(sd, validate_controlnet_state_dict(sd, "IdentityNet"), "IdentityNet")


def _context_lengths(module: torch.nn.Module, lengths: list[int]) -> list:
    def hook(_mod, args, kwargs):
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        lengths.append(int(context.shape[1]))
    return [m.register_forward_pre_hook(hook, with_kwargs=True)
            for name, m in module.named_modules() if name.endswith("attn2")]


def test_instantid_chain_end_to_end(tiny_sdxl):
    import comfy.controlnet

    from likeness.nodes.faceid import InstantIDApply
    from likeness.techniques.faceid.checkpoint import Variant, load_faceid_state_dict

    checkpoint = load_faceid_state_dict(random_instantid_checkpoint(_channels(tiny_sdxl), 64), source="ip-adapter.bin")
    assert checkpoint.variant == Variant.INSTANTID and checkpoint.raw_arcface
    control_net = tiny_identitynet()
    image = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(3))
    positive, negative = host_support.sdxl_conditioning(seed=1), host_support.sdxl_conditioning(seed=2)
    with torch.inference_mode():
        model, pos, neg = InstantIDApply().apply(tiny_sdxl, checkpoint, control_net, image, antelope_faces(), positive,
                                                 negative, 0.8, 0.8, 0.0, 1.0)
        adapter_only, _, _ = InstantIDApply().apply(tiny_sdxl, checkpoint, control_net, image, antelope_faces(), positive,
                                                    negative, 0.8, 0.0, 0.0, 1.0)
        off = InstantIDApply().apply(tiny_sdxl, checkpoint, control_net, image, antelope_faces(), positive, negative,
                                     0.0, 0.0, 0.0, 1.0)
    control = pos[0][1]["control"]
    assert isinstance(control, comfy.controlnet.ControlNet) and control is not neg[0][1]["control"]
    assert pos[0][1]["cross_attn_controlnet"].shape == (1, 16, 64)
    assert not torch.equal(pos[0][1]["cross_attn_controlnet"], neg[0][1]["cross_attn_controlnet"])
    assert "control" not in positive[0][1]

    lengths: list[int] = []
    hooks = _context_lengths(control.control_model, lengths)
    try:
        out = _sample(model, pos, neg)
    finally:
        for h in hooks:
            h.remove()
    assert lengths and set(lengths) == {16}                        # the IdentityNet attends to the 16 ID tokens
    base = _sample(tiny_sdxl, positive, negative)
    assert (out - _sample(adapter_only, positive, negative)).abs().max() > 1e-5   # the IdentityNet contributes
    assert (_sample(adapter_only, positive, negative) - base).abs().max() > 1e-5  # so do the ID tokens
    assert torch.equal(_sample(off[0], off[1], off[2]), base)                    # all zero: unpatched


def test_instantid_refuses_a_controlnet_of_another_width(tiny_sdxl):
    from likeness.errors import InvalidInputError
    from likeness.techniques.faceid.apply import IDTokens, apply_instantid
    from likeness.techniques.faceid.checkpoint import load_faceid_state_dict

    checkpoint = load_faceid_state_dict(random_instantid_checkpoint(_channels(tiny_sdxl), 64), source="ip-adapter.bin")
    tokens = IDTokens(torch.zeros(1, 16, 32), torch.zeros(1, 16, 32))   # tokens narrower than the net's context
    with pytest.raises(InvalidInputError, match="attends to 64-d context but InstantID's ID tokens are 32-d"):
        apply_instantid(tiny_sdxl, checkpoint, tokens, [], [], torch.zeros(1, 8, 8, 3), tiny_identitynet(),
                        weight=0.0)


def test_real_identitynet_layout_maps_onto_comfys_sdxl_controlnet(comfy_ready):
    """The official IdentityNet layout (meta tensors) is detected by ComfyUI as an SDXL ControlNet and every key
    lands on a parameter of comfy's ControlNet with the same shape."""
    import comfy.cldm.cldm
    import comfy.ops

    from likeness.host.controlnet import diffusers_unet_config
    from likeness.techniques.faceid.controlnet import diffusers_to_comfy_keys

    layout = read_layout(INSTANTID_CONTROLNET)["groups"][""]
    sd = {k: torch.empty(spec["shape"], device="meta") for k, spec in layout.items()}
    config = diffusers_unet_config(sd)
    assert config is not None and config["context_dim"] == 2048 and config["adm_in_channels"] == 2816
    key_map = diffusers_to_comfy_keys(sd, config)
    assert set(sd) <= set(key_map)
    config = dict(config, operations=comfy.ops.disable_weight_init, device="meta", hint_channels=3)
    config.pop("out_channels")
    target = comfy.cldm.cldm.ControlNet(**config).state_dict()
    converted = {key_map[k]: tuple(v.shape) for k, v in sd.items()}
    assert set(converted) == set(target)
    assert all(tuple(target[k].shape) == shape for k, shape in converted.items())
