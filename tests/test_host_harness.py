"""The real-host harness itself: tiny models built from ComfyUI's classes behave like the real ones."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.host


def _attn2_sites(patcher) -> list[str]:
    return [name for name, _ in patcher.model.diffusion_model.named_modules() if name.endswith(".attn2")]


def test_tiny_sd15_keeps_the_sd15_block_structure(tiny_sd15):
    import comfy.model_base
    import comfy.model_patcher

    assert isinstance(tiny_sd15, comfy.model_patcher.ModelPatcher)
    assert isinstance(tiny_sd15.model, comfy.model_base.BaseModel)
    assert type(tiny_sd15.model.model_config).__name__ == "SD15"
    sites = _attn2_sites(tiny_sd15)
    # SD1.5: input blocks 1,2,4,5,7,8 + middle + output blocks 3..11 -> 16 cross-attention sites
    assert len(sites) == 16
    assert sum(s.startswith("input_blocks.") for s in sites) == 6
    assert sum(s.startswith("middle_block.") for s in sites) == 1
    assert sum(s.startswith("output_blocks.") for s in sites) == 9


def test_tiny_sdxl_keeps_the_sdxl_block_structure(tiny_sdxl):
    assert type(tiny_sdxl.model.model_config).__name__ == "SDXL"
    sites = _attn2_sites(tiny_sdxl)
    blocks = {s.split(".transformer_blocks")[0] for s in sites}
    # SDXL: transformers in input blocks 4,5,7,8, the middle block and output blocks 0..5 (depth shrunk)
    assert blocks == {"input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1",
                      "middle_block.1", *(f"output_blocks.{i}.1" for i in range(6))}


def test_clones_are_fresh_and_weights_are_seeded(comfy_ready):
    import torch

    from host_support import build_tiny_sd15

    a, b = build_tiny_sd15(), build_tiny_sd15()
    assert a is not b and a.model is b.model  # clones share weights, not patches
    a.set_model_attn2_patch(lambda q, k, v, extra_options: (q, k, v))
    assert "attn2_patch" not in b.model_options["transformer_options"].get("patches", {})
    other = build_tiny_sd15(seed=1)
    first = next(a.model.diffusion_model.parameters())
    assert not torch.equal(first, next(other.model.diffusion_model.parameters()))
    uncached = build_tiny_sd15(cached=False)
    assert torch.equal(first, next(uncached.model.diffusion_model.parameters()))


def test_inpainting_shaped_variant(comfy_ready):
    from host_support import build_tiny_sd15

    model = build_tiny_sd15(in_channels=9)
    assert model.model.diffusion_model.input_blocks[0][0].in_channels == 9


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_tiny_models_sample_finite_latents(kind, comfy_ready):
    import comfy.sample
    import torch

    from host_support import build_tiny_sd15, build_tiny_sdxl, conditioning, sdxl_conditioning

    model = build_tiny_sd15() if kind == "sd15" else build_tiny_sdxl()
    cond = conditioning() if kind == "sd15" else sdxl_conditioning()
    latent = torch.zeros(1, 4, 8, 8)
    out = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), 2, 5.0, "euler", "normal",
                              cond, cond, latent, seed=0, disable_pbar=True)
    assert out.shape == latent.shape and torch.isfinite(out).all() and out.std() > 0


def test_tiny_clip_encodes_text_with_the_real_tokenizer(tiny_clip):
    import nodes

    (cond,) = nodes.CLIPTextEncode().encode(tiny_clip, "a portrait photo of a smiling woman")
    assert cond[0][0].shape == (1, 77, 64)
    long_text = " ".join(["face"] * 100)
    (cond_long,) = nodes.CLIPTextEncode().encode(tiny_clip, long_text)
    assert cond_long[0][0].shape == (1, 154, 64)  # 77 * k tokens
    assert "pooled_output" in cond[0][1]


def test_tiny_vae_round_trip(tiny_vae):
    import torch

    image = torch.rand(2, 64, 48, 3)
    with torch.inference_mode():  # as ComfyUI runs nodes; the cached VAE may hold inference-mode weights
        latent = tiny_vae.encode(image)
        decoded = tiny_vae.decode(latent)
    assert latent.shape == (2, 4, 8, 6)
    assert decoded.shape == (2, 64, 48, 3)
    assert torch.isfinite(decoded).all() and 0 <= decoded.min() and decoded.max() <= 1


def test_tiny_clip_vision_outputs_vit_h_like_shapes(tiny_clip_vision):
    import torch

    out = tiny_clip_vision.encode_image(torch.rand(2, 96, 80, 3))
    assert out["last_hidden_state"].shape == (2, 257, 64)  # 16x16 patches of 14 px + class token
    assert out["penultimate_hidden_states"].shape == (2, 257, 64)
    assert out["image_embeds"].shape == (2, 32)
    assert out["last_hidden_state"].dtype == torch.float32
    assert torch.isfinite(out["image_embeds"]).all()


def test_host_env_is_a_temp_base_directory(host_env):
    import os

    import folder_paths

    assert os.path.realpath(host_env.comfy_path) != os.path.realpath(host_env.base)
    assert folder_paths.get_output_directory().startswith(host_env.base)
    assert folder_paths.get_input_directory().startswith(host_env.base)
    assert folder_paths.get_folder_paths("checkpoints")[0].startswith(host_env.base)


def test_pack_loads_as_a_custom_node(pack_loaded):
    import nodes

    from likeness import NODE_CLASS_MAPPINGS

    assert pack_loaded is not None and hasattr(pack_loaded, "NODE_CLASS_MAPPINGS")
    for node_id in NODE_CLASS_MAPPINGS:
        assert node_id in nodes.NODE_CLASS_MAPPINGS
    # core nodes and comfy_extras are there too; nodes_images imports `server` (needs ComfyUI's `utils`
    # package imported before `nodes` shadows it with comfy/utils.py)
    assert {"KSampler", "CLIPTextEncode", "SaveImage", "SamplerCustomAdvanced", "ImageStitch",
            "GetImageSize"} <= set(nodes.NODE_CLASS_MAPPINGS)
