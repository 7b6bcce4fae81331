"""FaceID-family LoRA (rank 128 on every attention projection) as ComfyUI weight patches.

The official processors compute ``W x + up(down(x))`` (diffusers ``LoRALinearLayer``, no alpha, scale 1) on
attn1 q/k/v/out and attn2 q/out, and on attn2 k/v *for the text tokens only* (the ID tokens go through
``to_k_ip``/``to_v_ip``). So merging ``W + up @ down`` into the UNet weights is exactly the same computation,
and the decoupled ID branch (engine injector) stays separate.

Processor index -> UNet weight: processors are numbered in diffusers order (every transformer block of the down
blocks, then the up blocks, then the mid block; attn1 = 2k, attn2 = 2k+1 for the k-th transformer block).
:func:`transformer_blocks` derives the k -> ComfyUI block mapping by walking the ComfyUI UNet in that order
(ComfyUI's ``input_blocks`` are diffusers' down blocks, ``output_blocks`` the up blocks), so SD1.5 (16 blocks)
and SDXL (70) both follow from the model itself; nothing is tabulated.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ...errors import CheckpointLayoutError
from .processors import AdapterWeights

# ComfyUI's CrossAttention: to_q/to_k/to_v Linear, to_out = Sequential(Linear, Dropout).
# The UNets FaceID-family adapters exist for, by their number of transformer blocks, and their text context width.
BASE_MODELS = {16: "SD1.5", 70: "SDXL"}
BASE_TEXT_CONTEXT = {"SD1.5": 768, "SDXL": 2048}

COMFY_PROJECTION_KEYS = {"to_q": "to_q.weight", "to_k": "to_k.weight", "to_v": "to_v.weight",
                         "to_out": "to_out.0.weight"}


@dataclass(frozen=True)
class TransformerBlockRef:
    """The k-th transformer block in diffusers order and where it lives in a ComfyUI UNet."""
    order: int                    # k
    block: tuple[str, int]        # ComfyUI block id, e.g. ("input", 1); transformer_options["block"]
    transformer_index: int        # index inside its SpatialTransformer; extra_options["block_index"]
    prefix: str                   # "diffusion_model.input_blocks.1.1.transformer_blocks.0"
    channels: int                 # attention width C (0 when unknown)

    @property
    def attn1_processor(self) -> int:
        return 2 * self.order

    @property
    def attn2_processor(self) -> int:
        return 2 * self.order + 1

    @property
    def patch_key(self) -> tuple[str, int, int]:
        """The key ComfyUI's attn2 replace patches are looked up with: (block name, block number, block_index)."""
        return (self.block[0], self.block[1], self.transformer_index)


def _unet_module(model) -> torch.nn.Module:
    """Accept a ModelPatcher, a ComfyUI BaseModel or the UNet (``diffusion_model``) itself."""
    found = model
    for _ in range(3):
        if all(hasattr(found, a) for a in ("input_blocks", "middle_block", "output_blocks")):
            return found
        inner = getattr(found, "diffusion_model", None)
        found = inner if inner is not None else getattr(found, "model", None)
        if found is None:
            break
    raise CheckpointLayoutError(
        f"{type(model).__name__} is not a UNet with input/middle/output blocks (SD1.5/SDXL); FaceID-family "
        "adapters only apply to those models.")


def _spatial_transformers(block: torch.nn.Module) -> Iterable[tuple[int, torch.nn.Module]]:
    for index, child in enumerate(block.children()):
        if hasattr(child, "transformer_blocks"):
            yield index, child


def transformer_blocks(model, prefix: str = "diffusion_model") -> list[TransformerBlockRef]:
    """Every transformer block of a ComfyUI UNet in diffusers processor order (down, up, mid)."""
    unet = _unet_module(model)
    walk = [("input", i, f"input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks)]
    walk += [("output", i, f"output_blocks.{i}", b) for i, b in enumerate(unet.output_blocks)]
    walk += [("middle", 0, "middle_block", unet.middle_block)]
    refs: list[TransformerBlockRef] = []
    for name, number, path, block in walk:
        for child_index, transformer in _spatial_transformers(block):
            for t, basic in enumerate(transformer.transformer_blocks):
                to_q = getattr(getattr(basic, "attn1", None), "to_q", None)
                channels = getattr(to_q, "out_features", 0) or 0
                refs.append(TransformerBlockRef(len(refs), (name, number), t,
                                                f"{prefix}.{path}.{child_index}.transformer_blocks.{t}", channels))
    return refs


def transformer_blocks_from_config(unet_config: dict) -> list[TransformerBlockRef]:
    """Same as :func:`transformer_blocks` from a ComfyUI ``unet_config`` (builds the UNet on the meta device)."""
    from ...host.weights import meta_unet

    return transformer_blocks(meta_unet(unet_config))


def base_model_name(num_transformer_blocks: int) -> str:
    """"SD1.5" / "SDXL" for their UNets' transformer block counts, otherwise a description of the count."""
    return BASE_MODELS.get(num_transformer_blocks, f"a {num_transformer_blocks}-transformer-block UNet")


def check_adapter_fits(adapter: AdapterWeights, blocks: list[TransformerBlockRef], source: str = "this adapter") -> None:
    """The adapter has one attn1/attn2 processor pair per transformer block of the model, of the same width.

    A file made for another base model (SD1.5 on SDXL or the reverse) raises CheckpointLayoutError naming both."""
    if adapter.num_transformer_blocks != len(blocks):
        made_for, model = base_model_name(adapter.num_transformer_blocks), base_model_name(len(blocks))
        raise CheckpointLayoutError(
            f"{source} has {len(adapter.processors)} attention processors, an adapter for {made_for}, but the model "
            f"is {model} ({len(blocks)} transformer blocks); use the {model} version of the adapter.")
    for ref in blocks:
        proc = adapter.processors[ref.attn1_processor]
        width = proc.lora["to_q"][1].shape[0] if "to_q" in proc.lora else 0
        if width and ref.channels and width != ref.channels:
            raise CheckpointLayoutError(
                f"processor {ref.attn1_processor} is {width} wide but the model's block {ref.block} "
                f"(transformer {ref.transformer_index}) is {ref.channels} wide; wrong base model.")


def check_model_fits(model, adapter: AdapterWeights, source: str = "this adapter") -> list[TransformerBlockRef]:
    """:func:`check_adapter_fits` against a model (ModelPatcher, BaseModel or UNet); returns its blocks."""
    blocks = transformer_blocks(model)
    check_adapter_fits(adapter, blocks, source)
    return blocks


def lora_factors(adapter: AdapterWeights, blocks: list[TransformerBlockRef]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{ComfyUI weight key: (up [out,r], down [r,in])}`` for every LoRA target of every processor.

    The patched weight is ``W + strength * up @ down``.
    """
    check_adapter_fits(adapter, blocks)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for ref in blocks:
        for attn, index in (("attn1", ref.attn1_processor), ("attn2", ref.attn2_processor)):
            for target, (down, up) in adapter.processors[index].lora.items():
                factors[f"{ref.prefix}.{attn}.{COMFY_PROJECTION_KEYS[target]}"] = (up, down)
    return factors


def comfy_lora_patches(model_patcher, adapter: AdapterWeights) -> dict:
    """Weight patches for ``model_patcher.add_patches(patches, strength)`` (host only).

    Each value is ComfyUI's ``LoRAAdapter`` with ``alpha=None`` (scale 1, see :mod:`host.weights`), so ComfyUI
    computes ``W + strength * up @ down`` in fp32 when it patches. Shapes are checked against the model first.
    """
    from ...host.weights import lora_weight_patches

    blocks = transformer_blocks(model_patcher)
    factors = lora_factors(adapter, blocks)
    model_sd = model_patcher.model.state_dict()
    problems = []
    for key, (up, down) in factors.items():
        if key not in model_sd:
            problems.append(f"the model has no weight '{key}'")
        elif tuple(model_sd[key].shape) != (up.shape[0], down.shape[1]):
            problems.append(f"'{key}' is {list(model_sd[key].shape)} but the LoRA makes "
                            f"{[up.shape[0], down.shape[1]]}")
    if problems:
        raise CheckpointLayoutError("the adapter's LoRA does not fit this model: " + "; ".join(problems[:6]))
    return lora_weight_patches(factors)


def apply_lora(model_patcher, adapter: AdapterWeights, strength: float = 1.0):
    """A clone of ``model_patcher`` with the adapter's LoRA added as weight patches (strength 0: unchanged clone)."""
    patched = model_patcher.clone()
    if strength != 0.0 and adapter.has_lora:
        patches = comfy_lora_patches(patched, adapter)
        added = patched.add_patches(patches, strength)
        if len(added) != len(patches):
            raise CheckpointLayoutError(f"ComfyUI accepted {len(added)} of {len(patches)} LoRA weight patches.")
    return patched
