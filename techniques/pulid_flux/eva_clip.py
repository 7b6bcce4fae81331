"""EVA02-CLIP-L-14-336's visual tower for PuLID-FLUX, built with timm and loaded from a local file.

The model is timm's ``Eva`` with the EVA02-CLIP-L-14-336 settings (constructed directly, so nothing can download);
the weights come from BAAI's ``EVA02_CLIP_L_336_psz14_s6B.pt`` (the whole CLIP: only its ``visual.*`` tensors are
read, renamed by timm's own EVA-CLIP converter) or a ``.safetensors`` copy of it. PuLID reads, as the official
``eva_clip`` code returns them with ``return_hidden=True``: the projected CLS embedding (768) and the token states
entering blocks 4, 8, 12, 16 and 20 (``[B, 577, 1024]`` each, CLS included). Input: 336 px RGB normalised with the
OpenAI CLIP mean/std (the visual tower has no ``image_mean`` of its own, so the official code falls back to them).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from ...deps import require
from ...errors import CheckpointLayoutError, ModelFileError

logger = logging.getLogger("likeness")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HIDDEN_BLOCKS = (4, 8, 12, 16, 20)   # eva_vit_model.forward_features: states entering these blocks
EVA02_L_336 = {   # EVA02-CLIP-L-14-336.json vision_cfg as timm's eva02_large_patch14_clip_336 spells it
    "img_size": 336, "patch_size": 14, "embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4 * 2 / 3,
    "qkv_fused": False, "swiglu_mlp": True, "scale_mlp": True, "scale_attn_inner": True, "use_rot_pos_emb": True,
    "ref_feat_shape": (16, 16), "global_pool": "token", "num_classes": 768,
}


@dataclass
class EvaClipVision:
    """EVA_CLIP_VISION: the visual tower in eval mode and how to feed it."""

    model: torch.nn.Module
    name: str
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    hidden_blocks: tuple[int, ...] = field(default=HIDDEN_BLOCKS)

    @property
    def image_size(self) -> int:
        return int(self.model.patch_embed.img_size[0])

    def to(self, device=None, dtype=None) -> "EvaClipVision":
        self.model.to(device=device, dtype=dtype)
        return self

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``pixels`` ``[B, 3, S, S]`` already normalised -> (projected CLS ``[B, D]``, hidden states)."""
        hidden: dict[int, torch.Tensor] = {}
        hooks = [self.model.blocks[i].register_forward_pre_hook(
            lambda _module, args, i=i: hidden.__setitem__(i, args[0])) for i in self.hidden_blocks]
        try:
            pooled = self.model(pixels)
        finally:
            for hook in hooks:
                hook.remove()
        return pooled, [hidden[i] for i in self.hidden_blocks]


def build_eva_vision(config: dict | None = None) -> torch.nn.Module:
    """timm's ``Eva`` with ``config`` (default: EVA02-CLIP-L-14-336), randomly initialised, in eval mode."""
    require("timm", "the EVA-CLIP loader (PuLID-FLUX)")
    from timm.models.eva import Eva

    return Eva(**(config or EVA02_L_336)).eval()


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an EVA-CLIP ``.pt`` (plain state dict, read with ``weights_only``) or ``.safetensors`` file."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"EVA-CLIP file not found: {path}. Put EVA02_CLIP_L_336_psz14_s6B.pt into "
                             "models/clip_vision (or models/pulid).")
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:   # safetensors / torch raise several types for truncated or foreign files
        raise ModelFileError(f"cannot read {name} (truncated, corrupt, or not a plain tensor file): "
                             f"{type(exc).__name__}: {str(exc)[:200]}. Download EVA02_CLIP_L_336_psz14_s6B.pt "
                             "again.") from exc
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ModelFileError(f"{name} holds a {type(state).__name__}, not a state dict of EVA-CLIP weights.")
    return state


def eva_vision_from_state_dict(state: dict[str, torch.Tensor], source: str = "state dict",
                               config: dict | None = None) -> EvaClipVision:
    """Build the tower and load ``state`` (EVA-CLIP's names with or without ``visual.``, or timm's) strictly."""
    from timm.models.eva import checkpoint_filter_fn

    model = build_eva_vision(config)
    if not any(k.startswith(("visual.", "blocks.", "patch_embed.")) for k in state):
        sample = ", ".join(list(state)[:4])
        raise CheckpointLayoutError(f"{source} is not an EVA-CLIP visual tower (keys start with {sample}); pick "
                                    "EVA02_CLIP_L_336_psz14_s6B.pt.")
    converted = checkpoint_filter_fn(state, model)
    expected = model.state_dict()
    problems = [f"'{k}' missing" for k in expected if k not in converted]
    problems += [f"unexpected key '{k}'" for k in converted if k not in expected]
    problems += [f"'{k}' has shape {list(converted[k].shape)}, expected {list(t.shape)}"
                 for k, t in expected.items() if k in converted and converted[k].shape != t.shape]
    if problems:
        listed = "\n  - ".join(problems[:12])
        raise CheckpointLayoutError(f"{source} does not match EVA02-CLIP-L-14-336's visual tower ({len(problems)} "
                                    f"problem(s)); is it another CLIP?\n  - {listed}")
    model.load_state_dict({k: converted[k].to(t.dtype) for k, t in expected.items()}, strict=True)
    return EvaClipVision(model.requires_grad_(False), source)


def load_eva_clip(path: str, config: dict | None = None) -> EvaClipVision:
    """Load the visual tower from a local file (no download)."""
    return eva_vision_from_state_dict(read_weights(path), os.path.basename(path), config)
