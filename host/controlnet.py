"""Host side of ControlNets: ComfyUI's config detection, key names and ControlNet construction.

A technique that ships a diffusers ControlNet (Face-MakeUp's pose net) converts its keys with ComfyUI's own
UNet key map and gets back the same ``comfy.controlnet.ControlNet`` object a ControlNetLoader would make
(dtype, device and cast operations picked by ComfyUI's model management), so attaching it to conditioning,
offloading and patching work as for any stock ControlNet. ``comfy`` is imported inside the functions.

Trainers that need a ControlNet's residuals outside sampling (Imagic's reconstruction loss) use
:func:`training_control`: the same copy + ``set_cond_hint`` + ``pre_run`` + ``get_control`` calls ComfyUI's
sampler makes, so the hint is resized and the residuals scaled exactly as at sampling time. The UNet adds
residuals in place (``apply_control``: ``h += ctrl``), and for the skip connections that tensor was already
used by the next input block, which autograd refuses; so the residuals reach the UNet as input/output block
patches that add them out of place, at the same points and in the same order (:func:`residual_patches`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointLayoutError


def diffusers_unet_config(state_dict: Mapping[str, torch.Tensor]) -> dict | None:
    """ComfyUI's UNet config for a diffusers (Control)Net state dict, or None when no detection table knows it."""
    import comfy.model_detection

    config = comfy.model_detection.unet_config_from_diffusers_unet(dict(state_dict))
    return dict(config) if config is not None else None


def unet_diffusers_key_map(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """``{diffusers key: ComfyUI key}`` of every UNet weight for this config (ComfyUI's ``unet_to_diffusers``)."""
    import comfy.utils

    return dict(comfy.utils.unet_to_diffusers(dict(unet_config)))


def build_controlnet(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any], what: str) -> Any:
    """A ``comfy.controlnet.ControlNet`` holding ``state_dict`` (ComfyUI key names) built from ``unet_config``.

    Dtype, devices and cast operations are chosen the way ``comfy.controlnet.load_controlnet_state_dict`` does.
    Every key must land on a parameter: a missing or unexpected key raises CheckpointLayoutError naming ``what``.
    """
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops
    import comfy.utils

    weight_dtype = comfy.utils.weight_dtype(dict(state_dict))
    unet_dtype = comfy.model_management.unet_dtype(model_params=-1, weight_dtype=weight_dtype)
    load_device = comfy.model_management.get_torch_device()
    manual_cast_dtype = comfy.model_management.unet_manual_cast(unet_dtype, load_device)
    config = dict(unet_config)
    config.update(operations=comfy.ops.pick_operations(unet_dtype, manual_cast_dtype), dtype=unet_dtype,
                  device=comfy.model_management.unet_offload_device(),
                  hint_channels=state_dict["input_hint_block.0.weight"].shape[1])
    config.pop("out_channels", None)
    control_model = comfy.cldm.cldm.ControlNet(**config)
    missing, unexpected = control_model.load_state_dict(dict(state_dict), strict=False)
    if missing or unexpected:
        raise CheckpointLayoutError(f"{what} does not fit ComfyUI's ControlNet: missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}.")
    return comfy.controlnet.ControlNet(control_model, load_device=load_device, manual_cast_dtype=manual_cast_dtype)


@dataclass
class TrainingControl:
    """A ControlNet ready for a training loss: ``residuals(x_t, sigma, context)`` gives the ``control`` dict
    ``apply_model`` takes; ``patchers`` are its ModelPatchers (load them with the UNet), ``modules`` their
    torch modules (frozen, but gradients may flow through them to the context)."""

    residuals: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict]
    patchers: list
    modules: list[torch.nn.Module]

    @staticmethod
    def transformer_options(options: Mapping[str, Any], control: dict | None) -> dict:
        """``options`` (for ``apply_model``) with the residuals of ``control`` added by block patches (first in
        their lists, where ComfyUI's own ``apply_control`` would add them); ``control=None`` adds nothing."""
        out = dict(options)
        if control is None:
            return out
        patches = dict(out.get("patches", {}))
        for kind, patch in residual_patches(control).items():
            patches[kind] = [patch] + list(patches.get(kind, []))
        out["patches"] = patches
        return out


def _residual(residuals: list, index: int) -> torch.Tensor | None:
    """The residual ``apply_control`` would pop for block ``index`` (it pops from the end, once per block)."""
    return residuals[len(residuals) - 1 - index] if index < len(residuals) else None


def residual_patches(control: dict) -> dict[str, Callable]:
    """``input_block_patch`` / ``output_block_patch`` functions adding ``control``'s residuals out of place: the
    input residuals to each input block's output, the middle one to the middle block's output and the output
    ones to each skip connection, as ``apply_control`` does."""
    inputs, middle, outputs = (list(control.get(key) or []) for key in ("input", "middle", "output"))

    def input_patch(h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        residual = _residual(inputs, transformer_options["block"][1])
        return h if residual is None else h + residual

    def output_patch(h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict) -> tuple:
        index = transformer_options["block"][1]
        if index == 0 and middle and middle[-1] is not None:
            h = h + middle[-1]
        residual = _residual(outputs, index)
        return h, (hsp if residual is None else hsp + residual)

    return {"input_block_patch": input_patch, "output_block_patch": output_patch}


@contextlib.contextmanager
def training_control(control_net: Any, hint: torch.Tensor, model_patcher: Any,
                     strength: float = 1.0) -> Iterator[TrainingControl]:
    """``control_net`` (a CONTROL_NET) with ``hint`` (IMAGE ``[B,H,W,3]``) as Apply ControlNet attaches it, set
    up for ``model_patcher``'s noise schedule as the sampler does (``pre_run``); cleaned up on exit."""
    control = control_net.copy().set_cond_hint(hint.movedim(-1, 1), float(strength))
    sampling = model_patcher.get_model_object("model_sampling")
    control.pre_run(model_patcher.model, lambda percent: sampling.percent_to_sigma(percent))

    def residuals(x_t: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> dict:
        return control.get_control(x_t, sigma, {"c_crossattn": context}, 1, {})

    patchers = list(control.get_models())
    try:
        yield TrainingControl(residuals, patchers, [p.model for p in patchers])
    finally:
        control.cleanup()
