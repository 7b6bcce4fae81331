"""Host side of weight patches: LoRA factors handed to ComfyUI's ModelPatcher in ComfyUI's own formats.

Techniques decide which weights change and by what (the FaceID family's ``up @ down`` per projection, a
FaceA-Net identity LoRA file); ComfyUI then patches, offloads and unpatches them exactly as it does for a
LoraLoader. :func:`meta_unet` builds ComfyUI's UNet module tree without memory, so weight keys and block
order can be derived from a ``unet_config`` alone. ``comfy`` is imported inside the functions: these only
run on ComfyUI models.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def lora_weight_patches(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """``{weight key: ComfyUI LoRAAdapter}`` for ``model_patcher.add_patches(patches, strength)``.

    ``factors`` maps each weight key to ``(up [out, r], down [r, in])``. The adapters have ``alpha=None``
    (scale 1), so ComfyUI computes ``W + strength * up @ down`` in fp32 when it patches.
    """
    from comfy.weight_adapter.lora import LoRAAdapter

    return {key: LoRAAdapter({key}, (up, down, None, None, None, None)) for key, (up, down) in factors.items()}


def add_lora_state_dict(model_patcher: Any, lora_state: Mapping[str, torch.Tensor], strength: float) -> Any:
    """A clone of ``model_patcher`` with a LoRA state dict (any key format ComfyUI's LoraLoader reads) added as
    weight patches, exactly as LoraLoaderModelOnly does (the text encoder is left alone)."""
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model_patcher, None, dict(lora_state), float(strength), 0.0)
    return patched


def meta_unet(unet_config: Mapping[str, Any]) -> torch.nn.Module:
    """ComfyUI's ``UNetModel`` for ``unet_config`` on the meta device: the module tree, no weights in memory."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = {k: v for k, v in unet_config.items() if k != "disable_unet_model_creation"}
    return UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
