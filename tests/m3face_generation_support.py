"""Test support for M3Face generation: tiny models in the official diffusers layouts, written into a models folder.

- :func:`write_tiny_altdiffusion_folder`: ``models/likeness/m3face/<name>/`` with unet/ (diffusers
  ``UNet2DConditionModel``, SD2-style linear projections), vae/ (``AutoencoderKL``), text_encoder/ (diffusers'
  ``RobertaSeriesModelWithTransformation``), tokenizer/ (an XLM-R tokenizer over a tiny vocabulary, built
  offline) and scheduler/ (AltDiffusion-m18's PNDM settings), each saved by its own library's ``save_pretrained``.
- :func:`write_face_controlnet`: a diffusers ``ControlNetModel`` state dict as ``models/controlnet/<name>``. Its
  default config is the smallest one ComfyUI's stock ControlNetLoader detects (its diffusers detection only lists
  320-channel SD shapes): SD1.5 widths and 768-dim context, fp16, random weights.

Every model is seeded; nothing is downloaded. Used by the host tests and by example workflows run headless.
"""
from __future__ import annotations

import json
import os

import torch

ALT_CONTEXT_DIM = 64
ALT_FOLDER = "AltDiffusion-tiny"
TINY_WORDS = ("▁this", "▁woman", "▁man", "▁has", "▁narrow", "▁eyes", "▁rosy", "▁cheeks", "▁cette", "▁femme", "▁a",
              "▁les", "▁yeux", "▁étroits", "▁diese", "▁frau", "▁hat", "▁schmale", "▁augen", "▁and", "▁smiles", ".",
              ",", "▁")
# AltDiffusion-m18's scheduler/scheduler_config.json (facts: S15); no prediction_type key -> epsilon.
ALT_SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                        "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


def seeded(module: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Norm weights 1, biases 0, other parameters N(0, std): random and non-zero (zero-initialised diffusers
    layers such as a ControlNet's zero convolutions included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name.lower() or "LayerNorm" in name or name.endswith("pre_LN.weight"):
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


def tiny_text_encoder_config(project_dim: int = ALT_CONTEXT_DIM, has_pre_transformation: bool = True,
                             vocab_size: int = len(TINY_WORDS) + 5) -> dict:
    """A RobertaSeriesConfig dict of AltDiffusion's text encoder, shrunk (XLM-R large: 1024 wide, 24 layers)."""
    return {"architectures": ["RobertaSeriesModelWithTransformation"], "model_type": "roberta",
            "attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1, "hidden_act": "gelu", "hidden_size": 32, "intermediate_size": 64,
            "layer_norm_eps": 1e-5, "max_position_embeddings": 80, "num_attention_heads": 2,
            "num_hidden_layers": 3, "type_vocab_size": 1, "vocab_size": vocab_size, "project_dim": project_dim,
            "has_pre_transformation": has_pre_transformation, "pooler_fn": "cls", "learn_encoder": False,
            "use_attention_mask": True}


def build_official_text_encoder(config: dict, seed: int = 0):
    """diffusers' ``RobertaSeriesModelWithTransformation`` for ``config`` with seeded weights (eval mode)."""
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesConfig,
        RobertaSeriesModelWithTransformation,
    )

    values = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    model = RobertaSeriesModelWithTransformation(RobertaSeriesConfig(**values))
    return seeded(model, seed, std=0.2).eval()


def build_tiny_tokenizer():
    """An XLM-R tokenizer (transformers, sentencepiece-style unigram) over a tiny vocabulary, offline."""
    from transformers import XLMRobertaTokenizer

    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab = specials + [(word, -1.0 - i * 0.01) for i, word in enumerate(TINY_WORDS)] + [("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=77)


def tiny_unet_diffusers_config(context_dim: int = ALT_CONTEXT_DIM) -> dict:
    """A diffusers UNet2DConditionModel config of the SD layout with SD2-style attention (linear projections, 32-wide
    heads: per-level head counts), scaled down to 32 base channels."""
    return {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [32, 64, 128, 128],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "cross_attention_dim": context_dim, "attention_head_dim": [1, 2, 4, 4], "use_linear_projection": True,
            "norm_num_groups": 32}


def tiny_vae_diffusers_config() -> dict:
    """A diffusers AutoencoderKL config with the SD VAE's 8x downscale and 4 latent channels, 32 channels wide."""
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [32, 32, 32, 32],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "layers_per_block": 1, "norm_num_groups": 32, "sample_size": 64}


def write_tiny_altdiffusion_folder(models_dir: str, name: str = ALT_FOLDER, seed: int = 0,
                                   has_pre_transformation: bool = True, project_dim: int = ALT_CONTEXT_DIM) -> str:
    """Write a tiny AltDiffusion diffusers folder to ``models_dir/likeness/m3face/<name>``; returns its path."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = os.path.join(models_dir, "likeness", "m3face", name)
    unet = seeded(UNet2DConditionModel(**tiny_unet_diffusers_config()), seed, std=0.05)
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae = seeded(AutoencoderKL(**tiny_vae_diffusers_config()), seed + 1, std=0.05)
    vae.save_pretrained(os.path.join(folder, "vae"))
    encoder = build_official_text_encoder(tiny_text_encoder_config(project_dim, has_pre_transformation), seed + 2)
    encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    build_tiny_tokenizer().save_pretrained(os.path.join(folder, "tokenizer"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as handle:
        json.dump(ALT_SCHEDULER_CONFIG, handle)
    return folder


def stock_detected_controlnet_config() -> dict:
    """diffusers ControlNetModel config of the smallest ControlNet ComfyUI's ControlNetLoader detects: SD1.5."""
    return {"in_channels": 4, "conditioning_channels": 3, "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "layers_per_block": 2,
            "cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False}


def controlnet_state_dict(config: dict, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Seeded random weights in diffusers' ControlNetModel key layout (the class built on the meta device, so the
    full-size shapes cost no initialisation)."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ControlNetModel(**config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if "norm" in key and key.endswith("weight"):
            state[key] = torch.ones(shape, dtype=dtype)
        else:
            state[key] = uniform(shape, 0.02 if len(shape) > 1 else 0.01, generator).to(dtype)
    return state


def uniform(shape, std: float, generator: torch.Generator) -> torch.Tensor:
    """Seeded zero-mean uniform noise of standard deviation ``std`` (in place: several times faster than randn for
    the hundreds of millions of weights of an SD1.5-width model)."""
    bound = std * 3 ** 0.5
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def build_sd15_width_model(seed: int = 0):
    """A ComfyUI ``ModelPatcher`` of an SD1.5 UNet (320-1280 channels, context 768): the base the stock-detected
    ControlNet's residuals fit. Norm weights 1, biases 0, other weights seeded uniform noise of std 0.02."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    from host_support import sd15_unet_config

    model_config = comfy.supported_models.SD15(sd15_unet_config(model_channels=320, context_dim=768))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    generator = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for module in model.diffusion_model.modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, norms) or name == "bias":
                    param.fill_(1.0 if isinstance(module, norms) and name == "weight" else 0.0)
                else:
                    param.copy_(uniform(param.shape, 0.02, generator))
    return comfy.model_patcher.ModelPatcher(model.eval(), mm.get_torch_device(), mm.unet_offload_device())


def write_face_controlnet(models_dir: str, name: str = "m3face_tiny_controlnet.safetensors", seed: int = 0,
                          config: dict | None = None) -> str:
    """Write a diffusers-format ControlNet to ``models_dir/controlnet/<name>`` (stock-detected config unless
    ``config``); returns the path."""
    from safetensors.torch import save_file

    path = os.path.join(models_dir, "controlnet", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(controlnet_state_dict(config or stock_detected_controlnet_config(), seed), path)
    return path


def tiny_sd15_controlnet_config(context_dim: int = 64) -> dict:
    """diffusers ControlNetModel config matching ``host_support``'s tiny SD1.5 (32 base channels, 8 heads, context
    64): the stock loader does not detect it, ``M3Face FaceControlNet Loader`` does."""
    return {"in_channels": 4, "conditioning_channels": 3, "block_out_channels": [32, 64, 128, 128],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "layers_per_block": 2,
            "cross_attention_dim": context_dim, "attention_head_dim": 8, "use_linear_projection": False,
            "norm_num_groups": 32}


def tiny_alt_controlnet_config() -> dict:
    """diffusers ControlNetModel config of the tiny AltDiffusion UNet's encoder (what ``from_unet`` would copy)."""
    unet = tiny_unet_diffusers_config()
    return {"in_channels": 4, "conditioning_channels": 3, "block_out_channels": unet["block_out_channels"],
            "down_block_types": unet["down_block_types"], "layers_per_block": unet["layers_per_block"],
            "cross_attention_dim": unet["cross_attention_dim"], "attention_head_dim": unet["attention_head_dim"],
            "use_linear_projection": True, "norm_num_groups": 32}
