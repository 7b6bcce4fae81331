"""Where a trained FaceA-Net identity is written, and writing it.

One name gives three files: the LoRA (``models/loras/likeness/<name>.safetensors``, ComfyUI's native LoRA
format so the stock LoraLoader lists it), the IDENTITY file (``models/likeness/identities/<name>.safetensors``)
and the resumable training checkpoint (``models/likeness/training/facea_<name>.safetensors``). The table
below is the one place these names are made; :func:`identity_outputs` gives the node's name check the same
folders and file names, so a name is refused before training when any of the three would be too long.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch

from ...host.folders import LORA_SUBFOLDER, save_dir
from ...safetensors_io import atomic_save
from .identity import Identity, save_identity

logger = logging.getLogger("likeness")

STEM = "{}"
# kind -> (ComfyUI folder, subfolder, file name with STEM where the identity's name goes)
IDENTITY_FILES = {
    "lora": ("loras", LORA_SUBFOLDER, STEM + ".safetensors"),
    "identity": ("likeness", "identities", STEM + ".safetensors"),
    "checkpoint": ("likeness", "training", "facea_" + STEM + ".safetensors"),
}


def identity_outputs(kinds: Iterable[str] = tuple(IDENTITY_FILES)) -> list[tuple[str, str]]:
    """``(folder, file name template)`` of the identity files of these kinds (folders created if needed)."""
    return [(save_dir(folder, sub), template) for folder, sub, template in (IDENTITY_FILES[k] for k in kinds)]


def identity_file(kind: str, name: str) -> str:
    """The path of the identity ``name``'s ``kind`` file (``"lora"``, ``"identity"`` or ``"checkpoint"``)."""
    folder, sub, template = IDENTITY_FILES[kind]
    return os.path.join(save_dir(folder, sub), template.replace(STEM, name))


def save_trained_identity(identity: Identity, lora_state: dict[str, torch.Tensor], name: str,
                          identity_path: str | None = None) -> tuple[str, str]:
    """Write the LoRA and the identity file (``identity_path``, by default the one of ``name``) atomically;
    returns their paths.

    ``identity`` gets ``name`` and the LoRA's name as the LoraLoader lists it (``likeness/<name>.safetensors``).
    """
    lora_path = identity_file("lora", name)
    meta = {"likeness.kind": "facea_net_lora", "ss_network_dim": str(identity.metadata.get("rank", "")),
            "ss_network_module": "attention to_q/to_k/to_v/to_out (UNet)"}
    atomic_save(lora_state, lora_path, meta)
    identity.lora_name = f"{LORA_SUBFOLDER}/{os.path.basename(lora_path)}"
    identity.name = name
    identity_path = save_identity(identity, identity_path or identity_file("identity", name))
    logger.info("FaceA-Net: saved LoRA %s and identity %s", lora_path, identity_path)
    return lora_path, identity_path
