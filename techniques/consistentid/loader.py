"""Loading ConsistentID weights (``ConsistentID-v1.bin`` or a ``.safetensors`` conversion) through the shared
FaceID-family loader.

The file holds the FaceID-Plus projector (``image_proj``, also saved as ``image_proj_model`` by the repo's
converter), the 32 LoRA/IP attention processors (``adapter_modules``) and the ``FacialEncoder``. The projector
runs without the PlusV2 shortcut (the official pipeline calls it with ``shortcut=False``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ...errors import ModelFileError
from ..faceid.checkpoint import FaceIDCheckpoint, Variant, load_faceid_state_dict, read_checkpoint_file


def _require_consistentid(checkpoint: FaceIDCheckpoint) -> FaceIDCheckpoint:
    if checkpoint.variant != Variant.CONSISTENTID:
        raise ModelFileError(
            f"{checkpoint.source} is an {checkpoint.name} file, not ConsistentID (it has no FacialEncoder group). "
            "Use the FaceID / Face-MakeUp loader for it, or pick ConsistentID-v1.bin.")
    return checkpoint


def load_consistentid_state_dict(raw: Mapping, *, source: str = "state dict",
                                 dtype: torch.dtype = torch.float32) -> FaceIDCheckpoint:
    """ConsistentID from an in-memory checkpoint (nested groups or flat ``group.key`` names)."""
    return _require_consistentid(load_faceid_state_dict(raw, source=source, shortcut=False, dtype=dtype))


def load_consistentid(path: str, *, dtype: torch.dtype = torch.float32) -> FaceIDCheckpoint:
    """ConsistentID from a file. ``checkpoint.facial_encoder`` is the FacialEncoder, ``.projector`` the ID
    projector, ``.adapter`` the LoRA/IP processors."""
    return load_consistentid_state_dict(read_checkpoint_file(path), source=os.path.basename(path), dtype=dtype)
