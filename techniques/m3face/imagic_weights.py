"""Imagic stage 2's trainable UNet weights: the official up-block subset, or a LoRA on its attention layers.

M3Face's edit script (its public DEV prototype, ``training/imagic/edit.py``) fine-tunes the parameters of
diffusers' ``unet.up_blocks`` chosen by index ranges of that parameter list (``--unet_layer``; default
``2and3`` = ``params[154:]``). For the SD1.5 UNet those ranges are whole up blocks: up block 0 holds
parameters 0-37, block 1 38-153, block 2 154-269, block 3 270-383. So the choices are named here by the
up blocks they cover, and selected by module name instead of by position. ComfyUI's UNet keeps the same
layers as ``output_blocks``: diffusers up block k is the k-th run of ``num_res_blocks + 1`` output blocks
(SD1.5: up block 2 = output blocks 6-8, up block 3 = 9-11), its upsampler included.

``up_blocks`` mode trains fp32 copies of those parameters swapped into the UNet for the run (the originals
are put back afterwards, so the shared model is unchanged); the result is the difference to the original
weights in ComfyUI's LoRA-file "diff" keys, which ``LoraLoader`` and :func:`host.weights.add_lora_state_dict`
apply as weight patches. ``lora`` mode (for small GPUs) trains a rank-r LoRA on the attention projections of
the same output blocks with the FaceA-Net adapter code (:mod:`..facea_net.lora`), exported as a ComfyUI LoRA.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ...errors import InvalidInputError
from ..facea_net.lora import IdentityLoRA, attention_targets

# --unet_layer name of the DEV script -> diffusers up blocks it covers
UP_BLOCK_LAYERS: dict[str, tuple[int, ...]] = {
    "2and3": (2, 3), "only1": (1,), "only2": (2,), "only3": (3,), "1and2": (1, 2), "all": (0, 1, 2, 3),
}
DEFAULT_LAYERS = "2and3"
NATIVE_PREFIX = "diffusion_model."


def output_block_groups(unet: torch.nn.Module) -> list[list[int]]:
    """ComfyUI output-block indices of each diffusers up block (up block 0 = the lowest resolution)."""
    groups, index = [], 0
    for level in reversed(range(len(unet.channel_mult))):
        count = unet.num_res_blocks[level] + 1
        groups.append(list(range(index, index + count)))
        index += count
    return groups


def subset_prefixes(unet: torch.nn.Module, layers: str) -> tuple[str, ...]:
    """Module-name prefixes (relative to the UNet) of the output blocks the ``layers`` choice trains."""
    if layers not in UP_BLOCK_LAYERS:
        raise InvalidInputError(f"Unknown Imagic layer choice {layers!r}; choose one of {', '.join(UP_BLOCK_LAYERS)}.")
    groups = output_block_groups(unet)
    wanted = UP_BLOCK_LAYERS[layers]
    if max(wanted) >= len(groups):
        raise InvalidInputError(f"The layer choice {layers!r} needs up block {max(wanted)}, but this UNet has "
                                f"{len(groups)} up blocks; choose another.")
    return tuple(f"output_blocks.{i}." for block in wanted for i in groups[block])


def subset_parameter_names(unet: torch.nn.Module, layers: str) -> list[str]:
    """UNet parameter names of the ``layers`` choice, in module order."""
    prefixes = subset_prefixes(unet, layers)
    return [name for name, _ in unet.named_parameters() if name.startswith(prefixes)]


@contextlib.contextmanager
def trainable_copies(unet: torch.nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.nn.Parameter]]:
    """fp32 trainable copies of the parameters ``names`` swapped into the UNet; the originals come back on exit.

    ComfyUI's layers normally use their weight as it is; a swapped layer is switched to its cast path
    (``comfy_cast_weights``), which casts the weight to the activations' dtype per call (differentiably), so
    an fp16/bf16 model trains fp32 weights.
    """
    modules = dict(unet.named_modules())
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter, bool | None]] = []
    copies: dict[str, torch.nn.Parameter] = {}
    try:
        for name in names:
            module_name, _, attr = name.rpartition(".")
            module = modules[module_name]
            original = module._parameters[attr]
            with torch.no_grad():
                copy = torch.nn.Parameter(original.detach().float().clone())
            own_flag = module.__dict__.get("comfy_cast_weights") if hasattr(module, "comfy_cast_weights") else None
            module._parameters[attr] = copy
            if hasattr(module, "comfy_cast_weights"):
                module.comfy_cast_weights = True
            swapped.append((module, attr, original, own_flag))
            copies[name] = copy
        yield copies
    finally:
        for module, attr, original, own_flag in reversed(swapped):
            module._parameters[attr] = original
            if "comfy_cast_weights" in module.__dict__:
                if own_flag is None:
                    del module.comfy_cast_weights   # back to the class default
                else:
                    module.comfy_cast_weights = own_flag


def weight_diffs(trained: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``trained - original`` per parameter under ComfyUI's LoRA-file keys: ``diffusion_model.<module>.diff``
    for a weight and ``.diff_b`` for a bias (fp32, CPU)."""
    out = {}
    for name, value in trained.items():
        module_name, _, attr = name.rpartition(".")
        suffix = {"weight": "diff", "bias": "diff_b"}.get(attr)
        if suffix is None:
            raise InvalidInputError(f"UNet parameter {name!r} is neither a weight nor a bias; it has no ComfyUI "
                                    "weight-patch key.")
        with torch.no_grad():
            delta = value.detach().float() - originals[name].detach().float().to(value.device)
        out[f"{NATIVE_PREFIX}{module_name}.{suffix}"] = delta.cpu()
    return out


def subset_lora(unet: torch.nn.Module, layers: str, rank: int, seed: int) -> IdentityLoRA:
    """A rank-``rank`` LoRA (up = 0: no change at step 0) on the attention projections of the ``layers``
    output blocks."""
    prefixes = subset_prefixes(unet, layers)
    targets = {n: m for n, m in attention_targets(unet).items() if n.startswith(prefixes)}
    if not targets:
        raise InvalidInputError(f"The layer choice {layers!r} has no attention layers to put a LoRA on; choose "
                                "'up_blocks' mode or other layers.")
    shapes = {n: (m.in_features, m.out_features) for n, m in targets.items()}
    device = next(iter(targets.values())).weight.device
    return IdentityLoRA(shapes, rank=rank, seed=seed, device=device)
