"""A diffusers AltDiffusion folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) read
into what ComfyUI needs: UNet and VAE configs in ComfyUI's terms, their weights, the multilingual text encoder.

ComfyUI's own diffusers detection only knows fixed model tables (every entry 320 channels wide), while the folder's
``config.json`` states the architecture exactly, so the configs are derived from it; the diffusers -> ComfyUI key
conversion itself is ComfyUI's (:mod:`host.diffusers_models`). Prediction type: the folder's scheduler config
(AltDiffusion-m18 has none, so diffusers' epsilon), unless the loader node overrides it.
"""
from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...deps import require
from ...errors import CheckpointLayoutError, ModelFileError
from ...safetensors_io import load_tensors
from .multilingual import MultilingualTextEncoder, PromptTokenizer, load_official_state_dict, prompt_length

WEIGHT_NAMES = {  # component folder -> weight file stems diffusers / transformers save
    "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
}
LEGACY_WEIGHT_STEMS = {"text_encoder": "pytorch_model"}
PREDICTION_TYPES = ("epsilon", "v_prediction")


def read_config(folder: str, component: str) -> dict:
    path = os.path.join(folder, component, "config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ModelFileError(f"'{path}' does not exist: {folder} is not a diffusers AltDiffusion folder") from None
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"'{path}' is not readable JSON ({exc})") from None


def _candidate_files(folder: str, component: str) -> list[str]:
    stems = [WEIGHT_NAMES[component]] + ([LEGACY_WEIGHT_STEMS[component]] if component in LEGACY_WEIGHT_STEMS else [])
    names = []
    for stem in stems:
        names += [f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.json",
                  f"{stem}.bin", f"{stem}.fp16.bin", f"{stem}.bin.index.json"]
    return [os.path.join(folder, component, name) for name in names]


def _torch_load(path: str):
    """``torch.load`` with ``weights_only``, memory-mapped (a 3.5 GB UNet pickle is not copied into RAM first)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # pickles older than the zip format cannot be memory-mapped: read them whole
        return torch.load(path, map_location="cpu", weights_only=True)


def read_weight_file(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file, or a PyTorch pickle read with ``weights_only`` (no code runs)."""
    if path.endswith(".safetensors"):
        return load_tensors(path, "weights file", "download it again")[0]
    try:
        state = _torch_load(path)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise ModelFileError(f"'{path}' is not a readable PyTorch weights file ({exc})") from exc
    return dict(state.get("state_dict", state))


def read_weights(folder: str, component: str) -> dict[str, torch.Tensor]:
    """The state dict of ``folder/component`` (safetensors preferred; fp16 variants and shard indexes read too)."""
    for path in _candidate_files(folder, component):
        if not os.path.isfile(path):
            continue
        if not path.endswith(".index.json"):
            return read_weight_file(path)
        with open(path, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_weight_file(os.path.join(os.path.dirname(path), shard)))
        return state
    raise ModelFileError(f"no weights found in '{os.path.join(folder, component)}' (looked for "
                         f"{', '.join(os.path.basename(p) for p in _candidate_files(folder, component))})")


def prediction_type(folder: str, override: str = "auto") -> str:
    """``override`` unless ``auto``; else the scheduler config's ``prediction_type`` (epsilon when absent)."""
    if override == "auto":
        path = os.path.join(folder, "scheduler", "scheduler_config.json")
        override = "epsilon"
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                override = json.load(handle).get("prediction_type", "epsilon")
    if override not in PREDICTION_TYPES:
        raise CheckpointLayoutError(f"prediction type {override!r} of {folder} is not one of {PREDICTION_TYPES}")
    return override


def _per_level(value, levels: int, what: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise CheckpointLayoutError(f"{what} has {len(values)} entries for {levels} UNet levels")
    return [int(v) for v in values]


def _head_setting(config: Mapping, channels: list[int]) -> dict:
    """ComfyUI's num_heads / num_head_channels. diffusers' ``attention_head_dim`` is the head COUNT per level
    (``num_attention_heads = num_attention_heads or attention_head_dim`` in UNet2DConditionModel)."""
    heads = _per_level(config.get("num_attention_heads") or config.get("attention_head_dim", 8), len(channels),
                       "attention_head_dim")
    if len(set(heads)) == 1:
        return {"num_heads": heads[0], "num_head_channels": -1}
    widths = {c // h for c, h in zip(channels, heads, strict=True)}
    if len(widths) != 1:
        raise CheckpointLayoutError(f"heads {heads} over widths {channels} give no constant head size")
    return {"num_heads": -1, "num_head_channels": widths.pop()}


def _check_supported(config: Mapping) -> None:
    extras = {k: config.get(k) for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim")
              if config.get(k) is not None}
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if extras or mid != "UNetMidBlock2DCrossAttn":
        raise CheckpointLayoutError(f"only text-conditioned SD-style UNets are supported, this one has "
                                    f"{extras or mid}")
    if isinstance(config.get("layers_per_block", 2), (list, tuple)):
        raise CheckpointLayoutError("per-level layers_per_block is not supported")


def unet_config_from_diffusers(config: Mapping) -> dict:
    """ComfyUI's UNet config (``model_detection`` keys) for a diffusers ``UNet2DConditionModel`` config."""
    _check_supported(config)
    channels = [int(c) for c in config["block_out_channels"]]
    levels, layers = len(channels), int(config.get("layers_per_block", 2))
    if not len(config["down_block_types"]) == len(config["up_block_types"]) == levels:
        raise CheckpointLayoutError(f"{levels} block_out_channels but {len(config['down_block_types'])} down and "
                                    f"{len(config['up_block_types'])} up blocks")
    depth = _per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    down = [d if "CrossAttn" in kind else 0 for d, kind in zip(depth, config["down_block_types"], strict=True)]
    up_kinds = list(reversed(config["up_block_types"]))  # up_block_types[0] is the deepest level
    up = [d if "CrossAttn" in kind else 0 for d, kind in zip(depth, up_kinds, strict=True)]
    # SD2.x-style UNets set upcast_attention: attention in float32, as ComfyUI runs its SD2 models
    precision = {"attn_precision": torch.float32} if config.get("upcast_attention") else {}
    return {**precision,
        "use_checkpoint": False, "image_size": 32, "out_channels": int(config.get("out_channels", 4)),
        "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
        "in_channels": int(config.get("in_channels", 4)), "model_channels": channels[0],
        "num_res_blocks": [layers] * levels, "transformer_depth": [d for d in down for _ in range(layers)],
        "channel_mult": [c // channels[0] for c in channels], "transformer_depth_middle": depth[-1],
        "transformer_depth_output": [d for d in up for _ in range(layers + 1)],
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
        "context_dim": int(config["cross_attention_dim"]), **_head_setting(config, channels),
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def vae_params_from_diffusers(config: Mapping) -> dict:
    """ComfyUI's ``AutoencoderKL`` params (``{"embed_dim", "ddconfig"}``) for a diffusers AutoencoderKL config."""
    channels = [int(c) for c in config["block_out_channels"]]
    latent = int(config.get("latent_channels", 4))
    ddconfig = {"double_z": True, "z_channels": latent, "resolution": int(config.get("sample_size", 256)),
                "in_channels": int(config.get("in_channels", 3)), "out_ch": int(config.get("out_channels", 3)),
                "ch": channels[0], "ch_mult": [c // channels[0] for c in channels],
                "num_res_blocks": int(config.get("layers_per_block", 2)), "attn_resolutions": [], "dropout": 0.0}
    return {"embed_dim": latent, "ddconfig": ddconfig}


@dataclass
class MultilingualEncoderBundle:
    """The text encoder and tokenizer of one AltDiffusion folder: the M3FACE_TEXT_ENCODER node value."""
    encoder: MultilingualTextEncoder
    tokenizer: PromptTokenizer
    source: str
    patcher: Any = None   # ComfyUI's ModelPatcher around ``encoder`` (device management), set by the loader node


def load_text_encoder(folder: str, max_length: int = 0,
                      dtype: torch.dtype = torch.float32) -> MultilingualEncoderBundle:
    """``text_encoder/`` (RobertaSeriesModelWithTransformation layout) and ``tokenizer/`` of an AltDiffusion folder."""
    transformers = require("transformers", "M3Face's multilingual text encoder")
    config = read_config(folder, "text_encoder")
    encoder = MultilingualTextEncoder(config)
    load_official_state_dict(encoder, read_weights(folder, "text_encoder"), os.path.join(folder, "text_encoder"))
    encoder.to(dtype).eval().requires_grad_(False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    return MultilingualEncoderBundle(encoder, PromptTokenizer(tokenizer, prompt_length(tokenizer, max_length)),
                                     folder)


def load_altdiffusion(folder: str, prediction: str = "auto", max_length: int = 0) -> tuple[Any, Any, Any]:
    """(MODEL, text encoder bundle, VAE) of an AltDiffusion diffusers folder, as ComfyUI objects (host-gated).

    The text encoder must project to the width the UNet attends to (CheckpointLayoutError otherwise)."""
    from ...host.diffusers_models import build_unet, build_vae, managed_module, text_encoder_placement

    unet_config = unet_config_from_diffusers(read_config(folder, "unet"))
    load_device, offload_device, dtype = text_encoder_placement()
    bundle = load_text_encoder(folder, max_length, dtype)
    if bundle.encoder.context_dim != unet_config["context_dim"]:
        raise CheckpointLayoutError(f"{folder}: the text encoder projects to {bundle.encoder.context_dim} "
                                    f"channels but the UNet attends to {unet_config['context_dim']}")
    model = build_unet(read_weights(folder, "unet"), unet_config, prediction_type(folder, prediction),
                       os.path.join(folder, "unet"))
    vae = build_vae(read_weights(folder, "vae"), vae_params_from_diffusers(read_config(folder, "vae")))
    bundle.patcher = managed_module(bundle.encoder, load_device, offload_device)
    return model, bundle, vae
