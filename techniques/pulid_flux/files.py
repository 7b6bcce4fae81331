"""Where PuLID-FLUX's files live: ``models/pulid`` (the weights, as the ComfyUI PuLID ports keep them), EVA-CLIP in
``models/clip_vision`` (or ``models/pulid``, or ``models/clip`` where the ports put it), embeds in
``models/likeness/pulid_embeds``."""
from __future__ import annotations

import os

from ...host.folders import list_files, resolve, save_dir

PULID_FOLDER = "pulid"
EVA_FOLDERS = ("clip_vision", "pulid", "text_encoders")   # "clip" is ComfyUI's legacy name of text_encoders
EMBEDS_FOLDER, EMBEDS_SUBFOLDER = "likeness", "pulid_embeds"
SAFETENSORS = {".safetensors"}


def list_pulid_files() -> list[str]:
    """PuLID-FLUX weight files (``.safetensors``) in models/pulid."""
    return list_files(PULID_FOLDER, extensions=SAFETENSORS)


def pulid_path(name: str) -> str:
    return resolve(PULID_FOLDER, name)


def list_eva_files() -> list[str]:
    """EVA-CLIP files (names containing 'eva') in the folders EVA-CLIP is kept in, each named once."""
    names: list[str] = []
    for folder in EVA_FOLDERS:
        try:
            found = list_files(folder, extensions={".pt", ".pth", ".bin", ".safetensors"})
        except (OSError, KeyError):
            continue
        names += [n for n in found if "eva" in os.path.basename(n).lower() and n not in names]
    return sorted(names)


def eva_path(name: str) -> str:
    """The first folder of :data:`EVA_FOLDERS` holding ``name``; FileNotFoundError naming every folder tried."""
    tried = []
    for folder in EVA_FOLDERS:
        try:
            return resolve(folder, name)
        except FileNotFoundError as exc:
            tried.append(str(exc))
    raise FileNotFoundError(f"EVA-CLIP file '{name}' was not found in models/{', models/'.join(EVA_FOLDERS)}. "
                            + " ".join(tried[:1]))


def embeds_dir() -> str:
    return save_dir(EMBEDS_FOLDER, EMBEDS_SUBFOLDER)


def list_embeds() -> list[str]:
    return list_files(EMBEDS_FOLDER, EMBEDS_SUBFOLDER, SAFETENSORS)


def embeds_file(name: str) -> str:
    return resolve(EMBEDS_FOLDER, name, EMBEDS_SUBFOLDER)
