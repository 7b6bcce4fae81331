"""Loading ConsistentID weights (``ConsistentID-v1.bin`` for SD1.5, ``ConsistentID_SDXL-v1.bin`` for SDXL, or a
``.safetensors`` conversion) through the shared FaceID-family loader, and telling the two bases apart.

The file holds the FaceID-Plus projector (``image_proj``, also saved as ``image_proj_model`` by the repo's
converter and its SDXL release), the LoRA/IP attention processors (``adapter_modules``) and the ``FacialEncoder``.
The base is read from the keys (:func:`consistentid_base`): the SD1.5 release has 32 processors on a 768-d text
context, the SDXL one 140 on the 2048-d ``cat(CLIP-L, CLIP-G)`` context. The two pipelines call the projector
differently: SD1.5 without the PlusV2 shortcut, SDXL with it (``x + resampler``,
``pipline_StableDiffusionXL_ConsistentID.py: get_image_embeds(..., shortcut=True)``), so the shortcut follows the
base unless given.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ...errors import CheckpointLayoutError, ModelFileError
from ..faceid.checkpoint import FaceIDCheckpoint, Variant, load_faceid_state_dict, read_checkpoint_file

SD15, SDXL = "SD1.5", "SDXL"
RELEASED_FILE = {SD15: "ConsistentID-v1.bin", SDXL: "ConsistentID_SDXL-v1.bin"}


def base_from_widths(widths: list[int]) -> str:
    """The UNet family of a list of attention widths (one per transformer block).

    SD1.5-family UNets have attention at three widths (320/640/1280: every level but the last); SDXL-family ones
    at two (640/1280: none at the first level). Counting the distinct widths (not the blocks) holds for the
    released models and for scaled-down ones of the same shape.
    """
    distinct = len({w for w in widths if w})
    return {3: SD15, 2: SDXL}.get(distinct, f"an unknown base ({distinct} attention widths)")


def _adapter_widths(adapter) -> list[int]:
    return [p.lora["to_q"][1].shape[0] if "to_q" in p.lora else p.to_k_ip.shape[0]
            for p in adapter.processors if p.is_cross_attention]


@dataclass(frozen=True)
class BaseInfo:
    """Which base a ConsistentID file or a model belongs to, with the numbers that say so."""
    base: str
    blocks: int           # transformer blocks (attention processor pairs)
    context_dim: int      # text width of the cross-attentions

    def describe(self) -> str:
        return f"{self.base} ({self.blocks} transformer blocks, {self.context_dim}-d text)"


def consistentid_base(checkpoint: FaceIDCheckpoint) -> BaseInfo:
    """The base of a loaded ConsistentID, from its processors; checks that its three parts agree on the width."""
    adapter = checkpoint.adapter
    widths = {"to_k_ip/to_v_ip": adapter.context_dim, "ID projector": checkpoint.projector_config.cross_attention_dim}
    if checkpoint.facial_encoder is not None:
        widths["FacialEncoder"] = checkpoint.facial_encoder.fuse_module.layer_norm.normalized_shape[0]
    if len(set(widths.values())) != 1:
        raise CheckpointLayoutError(f"{checkpoint.source}: its parts disagree on the text width ({widths}); they come "
                                    "from different models.")
    return BaseInfo(base_from_widths(_adapter_widths(adapter)), adapter.num_transformer_blocks, adapter.context_dim)


def model_base(model_patcher) -> BaseInfo:
    """The base of a ComfyUI model, from its own transformer blocks and cross-attention sites."""
    from ...attention_patches import find_unet_sites
    from ..faceid.lora import transformer_blocks

    blocks = transformer_blocks(model_patcher)
    contexts = sorted({s.context_dim for s in find_unet_sites(model_patcher)})
    return BaseInfo(base_from_widths([b.channels for b in blocks]), len(blocks), contexts[0] if contexts else 0)


def check_base_matches(checkpoint: FaceIDCheckpoint, model_patcher) -> BaseInfo:
    """Raise ModelFileError naming both bases when a ConsistentID file does not fit the model; returns its base."""
    ours, theirs = consistentid_base(checkpoint), model_base(model_patcher)
    if (ours.base, ours.blocks, ours.context_dim) != (theirs.base, theirs.blocks, theirs.context_dim):
        wanted = RELEASED_FILE.get(theirs.base)
        hint = f"use {wanted} with this model" if wanted else "use the ConsistentID file made for this model"
        raise ModelFileError(f"{checkpoint.source} is a ConsistentID {ours.describe()} file but the model is "
                             f"{theirs.describe()}; {hint}, or a {ours.base} model with this file.")
    return ours


def _require_consistentid(checkpoint: FaceIDCheckpoint) -> FaceIDCheckpoint:
    if checkpoint.variant != Variant.CONSISTENTID:
        raise ModelFileError(
            f"{checkpoint.source} is an {checkpoint.name} file, not ConsistentID (it has no FacialEncoder group). "
            "Use the FaceID / Face-MakeUp loader for it, or pick ConsistentID-v1.bin / ConsistentID_SDXL-v1.bin.")
    return checkpoint


def load_consistentid_state_dict(raw: Mapping, *, source: str = "state dict", dtype: torch.dtype = torch.float32,
                                 shortcut: bool | None = None) -> FaceIDCheckpoint:
    """ConsistentID from an in-memory checkpoint (nested groups or flat ``group.key`` names). ``shortcut=None``:
    the official pipeline's choice for the file's base (SD1.5 off, SDXL on)."""
    checkpoint = _require_consistentid(load_faceid_state_dict(raw, source=source, shortcut=False, dtype=dtype))
    checkpoint.shortcut = consistentid_base(checkpoint).base == SDXL if shortcut is None else bool(shortcut)
    return checkpoint


def load_consistentid(path: str, *, dtype: torch.dtype = torch.float32,
                      shortcut: bool | None = None) -> FaceIDCheckpoint:
    """ConsistentID from a file. ``checkpoint.facial_encoder`` is the FacialEncoder, ``.projector`` the ID
    projector, ``.adapter`` the LoRA/IP processors; :func:`consistentid_base` says SD1.5 or SDXL."""
    return load_consistentid_state_dict(read_checkpoint_file(path), source=os.path.basename(path), dtype=dtype,
                                        shortcut=shortcut)
