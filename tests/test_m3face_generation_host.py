"""M3Face generation on the real host: a diffusers FaceControlNet through ComfyUI's stock ControlNetLoader and Apply
ControlNet, and the AltDiffusion base (UNet through ComfyUI's key conversion, multilingual CONDITIONING) sampled by
the stock KSampler."""
from __future__ import annotations

import pytest
import torch

import host_support
from m3face_generation_support import (
    ALT_FOLDER,
    build_sd15_width_model,
    tiny_unet_diffusers_config,
    write_face_controlnet,
)

pytestmark = pytest.mark.host
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def alt_folder(host_env):
    from m3face_generation_support import write_tiny_altdiffusion_folder

    return write_tiny_altdiffusion_folder(host_env.models)


def _sd_shaped_diffusers_keys(**config) -> dict:
    """A diffusers UNet2DConditionModel state dict built on the meta device (shapes only)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config).state_dict()


@pytest.mark.parametrize("layout", ["sd15", "sd21"])
def test_unet_config_agrees_with_comfyui_detection(comfy_ready, layout):
    from likeness.host.controlnet import diffusers_unet_config
    from likeness.techniques.m3face.altdiffusion import unet_config_from_diffusers

    config = {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
              "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
              "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    if layout == "sd21":
        config.update(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
    detected = diffusers_unet_config(_sd_shaped_diffusers_keys(**config))
    ours = unet_config_from_diffusers(config)
    assert detected is not None
    for key, value in ours.items():
        if key in detected:
            assert detected[key] == value, key


def test_altdiffusion_unet_equals_the_diffusers_unet(comfy_ready, alt_folder):
    from diffusers import UNet2DConditionModel

    from likeness.host.diffusers_models import build_unet
    from likeness.techniques.m3face import altdiffusion as alt

    state = alt.read_weights(alt_folder, "unet")
    patcher = build_unet(state, alt.unet_config_from_diffusers(alt.read_config(alt_folder, "unet")), "epsilon", "unet")
    reference = UNet2DConditionModel.from_pretrained(f"{alt_folder}/unet").eval()
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 64, generator=generator)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        ours = patcher.model.diffusion_model(x, timesteps=t, context=context)
        expected = reference(x, t, encoder_hidden_states=context).sample
    assert expected.abs().mean() > 1e-3
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert tiny_unet_diffusers_config()["use_linear_projection"]  # the SD2-style layout is what was compared


def test_a_text_encoder_of_another_width_is_refused(comfy_ready, host_env):
    from likeness.errors import CheckpointLayoutError
    from likeness.techniques.m3face.altdiffusion import load_altdiffusion
    from m3face_generation_support import write_tiny_altdiffusion_folder

    folder = write_tiny_altdiffusion_folder(host_env.models, "AltDiffusion-mismatch", project_dim=48)
    with pytest.raises(CheckpointLayoutError, match="projects to 48 channels but the UNet attends to 64"):
        load_altdiffusion(folder)


def _alt_prompt(text_a: str, text_b: str) -> dict:
    prompt = {
        "1": {"class_type": "LikenessM3FaceAltDiffusionLoader",
              "inputs": {"folder": ALT_FOLDER, "prediction": "auto", "max_length": 0}},
        "2": {"class_type": "LikenessM3FaceMultilingualTextEncode",
              "inputs": {"text_encoder": ["1", 1], "text": text_a, "attention_mask": "auto"}},
        "3": {"class_type": "LikenessM3FaceMultilingualTextEncode",
              "inputs": {"text_encoder": ["1", 1], "text": text_b, "attention_mask": "auto"}},
        "4": {"class_type": "LikenessM3FaceMultilingualTextEncode",
              "inputs": {"text_encoder": ["1", 1], "text": "", "attention_mask": "off"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    for sampler, positive, decode, stats in (("6", "2", "7", "8"), ("9", "3", "10", "11")):
        prompt[sampler] = {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": [positive, 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": 3, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
        prompt[decode] = {"class_type": "VAEDecode", "inputs": {"samples": [sampler, 0], "vae": ["1", 2]}}
        prompt[stats] = {"class_type": "LikenessTestImageStats", "inputs": {"image": [decode, 0]}}
    return prompt


def test_altdiffusion_samples_with_multilingual_conditioning(execute_prompt, host_test_nodes, alt_folder):
    outputs = execute_prompt(_alt_prompt("cette femme a les yeux étroits", "this man has rosy cheeks"))
    (french,), (english,) = outputs["8"]["stats"], outputs["11"]["stats"]
    for stats in (french, english):
        assert stats["finite"] and stats["shape"] == [1, 64, 64, 3] and stats["std"] > 1e-3
    assert abs(french["mean"] - english["mean"]) + abs(french["std"] - english["std"]) > 1e-5  # the text matters


def test_text_encode_node_equals_the_official_encoder(comfy_ready, pack_loaded, alt_folder):
    import nodes

    from m3face_generation_support import build_official_text_encoder, tiny_text_encoder_config

    _model, bundle, _vae = nodes.NODE_CLASS_MAPPINGS["LikenessM3FaceAltDiffusionLoader"]().load(ALT_FOLDER, "auto", 0)
    (cond,) = nodes.NODE_CLASS_MAPPINGS["LikenessM3FaceMultilingualTextEncode"]().encode(bundle, "diese frau", "auto")
    ids, mask = bundle.tokenizer(["diese frau"])
    with torch.no_grad():
        expected = build_official_text_encoder(tiny_text_encoder_config(), seed=2)(ids, attention_mask=mask)[0]
    assert cond[0][0].shape == (1, 77, 64)
    torch.testing.assert_close(cond[0][0], expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_face_controlnet_loads_with_the_stock_loader_and_changes_the_sample(comfy_ready, host_env):
    import nodes

    name = "m3face_test_controlnet.safetensors"
    write_face_controlnet(host_env.models, name)
    (controlnet,) = nodes.NODE_CLASS_MAPPINGS["ControlNetLoader"]().load_controlnet(name)
    model = build_sd15_width_model()
    positive, negative = host_support.conditioning(768, seed=1), host_support.conditioning(768, seed=2)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    apply = nodes.NODE_CLASS_MAPPINGS["ControlNetApplyAdvanced"]()
    latent = torch.zeros(1, 4, 8, 8)
    samples = {}
    for strength in (0.0, 1.0):
        pos, neg = apply.apply_controlnet(positive, negative, controlnet, hint, strength, 0.0, 1.0)
        samples[strength] = host_support.sample_tiny(model, steps=1, cfg=1.0, positive=pos, negative=neg,
                                                     latent=latent)
    plain = host_support.sample_tiny(model, steps=1, cfg=1.0, positive=positive, negative=negative, latent=latent)
    torch.testing.assert_close(samples[0.0], plain)  # strength 0 attaches nothing
    assert (samples[1.0] - samples[0.0]).abs().max() > 1e-4
    del model
    import comfy.model_management

    comfy.model_management.unload_all_models()


def test_pack_loader_equals_the_diffusers_controlnet(pack_loaded, host_env):
    import nodes
    from diffusers import ControlNetModel

    from m3face_generation_support import controlnet_state_dict, tiny_sd15_controlnet_config

    state = controlnet_state_dict(tiny_sd15_controlnet_config(), seed=5, dtype=torch.float32)
    name = "m3face_tiny_sd15_controlnet.safetensors"
    write_face_controlnet(host_env.models, name, seed=5, config=tiny_sd15_controlnet_config())
    with pytest.raises(Exception):  # noqa: B017 - the stock loader cannot size a scaled-down diffusers ControlNet
        nodes.NODE_CLASS_MAPPINGS["ControlNetLoader"]().load_controlnet(name)
    (controlnet,) = nodes.NODE_CLASS_MAPPINGS["LikenessM3FaceControlNetLoader"]().load(name, "auto")
    reference = ControlNetModel(**tiny_sd15_controlnet_config()).eval()
    reference.load_state_dict({k: v.half().float() for k, v in state.items()})  # the file is fp16
    generator = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 64, generator=generator)
    hint, t = torch.rand(1, 3, 64, 64, generator=generator), torch.tensor([500.0])
    with torch.no_grad():
        ours = controlnet.control_model(x=x, hint=hint, timesteps=t, context=context)
        down, mid = reference(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    assert len(ours["output"]) == len(down) == 12
    for got, expected in zip(ours["output"] + ours["middle"], list(down) + [mid], strict=True):
        torch.testing.assert_close(got.float(), expected, atol=1e-4, rtol=1e-4)


def test_pack_loaded_controlnet_changes_the_tiny_sd15_sample(pack_loaded, host_env):
    import nodes

    from m3face_generation_support import tiny_sd15_controlnet_config

    name = "m3face_tiny_sd15_controlnet_b.safetensors"
    write_face_controlnet(host_env.models, name, seed=6, config=tiny_sd15_controlnet_config())
    model = host_support.build_tiny_sd15()
    (controlnet,) = nodes.NODE_CLASS_MAPPINGS["LikenessM3FaceControlNetLoader"]().load(name, "auto", model)
    positive, negative = host_support.conditioning(seed=1), host_support.conditioning(seed=2)
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(4))
    apply = nodes.NODE_CLASS_MAPPINGS["ControlNetApplyAdvanced"]()
    pos, neg = apply.apply_controlnet(positive, negative, controlnet, hint, 1.0, 0.0, 1.0)
    plain = host_support.sample_tiny(model, positive=positive, negative=negative)
    controlled = host_support.sample_tiny(model, positive=pos, negative=neg)
    assert (controlled - plain).abs().max() > 1e-4


def test_multilingual_face_controlnet_graph_runs_end_to_end(execute_prompt, host_test_nodes, alt_folder, host_env):
    from m3face_generation_support import tiny_alt_controlnet_config

    name = "m3face_tiny_alt_controlnet.safetensors"
    write_face_controlnet(host_env.models, name, seed=7, config=tiny_alt_controlnet_config())
    prompt = _alt_prompt("cette femme a les yeux étroits", "cette femme a les yeux étroits")
    prompt.update({
        "20": {"class_type": "LikenessM3FaceControlNetLoader",
               "inputs": {"control_net_name": name, "heads": "auto", "model": ["1", 0]}},
        "21": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xFF8040}},
        "22": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["3", 0], "negative": ["4", 0], "control_net": ["20", 0], "image": ["21", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
    })
    prompt["9"]["inputs"].update(positive=["22", 0], negative=["22", 1])
    outputs = execute_prompt(prompt)
    (plain,), (controlled,) = outputs["8"]["stats"], outputs["11"]["stats"]
    assert controlled["finite"] and controlled["std"] > 1e-3
    assert abs(plain["mean"] - controlled["mean"]) + abs(plain["std"] - controlled["std"]) > 1e-5
