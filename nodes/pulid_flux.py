"""PuLID-FLUX nodes: loaders (PuLID-FLUX weights, EVA-CLIP), Embed (reference IMAGE -> ID tokens), Save / Load
embeds, Apply (MODEL -> MODEL; chain two with two masks for two people)."""
from __future__ import annotations

import os

from ..errors import InvalidInputError, ModelFileError
from ..model_hints import ModelFolder
from ..validation import check_images, check_masks
from ._common import (
    category,
    check_analyzer,
    checked_file_stem,
    file_choices,
    float_input,
    int_input,
    percent_range_inputs,
    resolved_path,
)
from ._feedback import shows_warnings

CATEGORY = category("PuLID-FLUX")
NO_PULID = "(no PuLID-FLUX file in models/pulid)"
NO_EVA = "(no EVA-CLIP file in models/clip_vision)"
NO_EMBEDS = "(no embeds in models/likeness/pulid_embeds)"
PULID_FILES = ModelFolder("PuLID-FLUX weights", "pulid", ("",))
EVA_FILES = ModelFolder("EVA02-CLIP-L-14-336 file", "clip_vision", ("",), other_way=(
    "models/pulid and models/clip are searched too."))
SAVED = ModelFolder("saved PuLID-FLUX embeds", "likeness", ("pulid_embeds",), other_way=(
    "Save some with the Save PuLID-FLUX Embeds node."))
SELECTIONS = ("largest", "index")
UNCOND_CHOICES = {"zero ID (official true CFG)": "zero_id", "none": "none"}


def _pulid_choices() -> list[str]:
    from ..techniques.pulid_flux.files import list_pulid_files

    return file_choices(list_pulid_files, NO_PULID)


def _eva_choices() -> list[str]:
    from ..techniques.pulid_flux.files import list_eva_files

    return file_choices(list_eva_files, NO_EVA)


def _embeds_choices() -> list[str]:
    from ..techniques.pulid_flux.files import list_embeds

    return file_choices(list_embeds, NO_EMBEDS)


class PulidFluxLoader:
    NODE_ID = "LikenessPulidFluxLoader"
    DISPLAY_NAME = "PuLID-FLUX Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads PuLID-FLUX weights (pulid_flux_v0.9.1 / v0.9.0.safetensors) from models/pulid: the ID "
                   "encoder and the 20 ID cross-attentions for FLUX.1's blocks. The file's keys and shapes are "
                   "checked; a wrong or truncated file is refused with its name.")
    RETURN_TYPES = ("PULID_FLUX",)
    RETURN_NAMES = ("pulid_flux",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pulid_file": (_pulid_choices(), {"tooltip": "pulid_flux_v0.9.1.safetensors in models/pulid."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, pulid_file):
        return PULID_FILES.choice_problem(pulid_file, _pulid_choices(), NO_PULID)

    def load(self, pulid_file):
        from ..techniques.pulid_flux import load_pulid_flux
        from ..techniques.pulid_flux.files import pulid_path

        if pulid_file == NO_PULID:
            raise ModelFileError(PULID_FILES.missing_message())
        return (load_pulid_flux(resolved_path(pulid_path, pulid_file)),)


class EvaClipLoader:
    NODE_ID = "LikenessEvaClipLoader"
    DISPLAY_NAME = "EVA-CLIP Loader (PuLID-FLUX)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads the EVA02-CLIP-L-14-336 visual tower (EVA02_CLIP_L_336_psz14_s6B.pt) from models/"
                   "clip_vision (or models/pulid, models/clip) for PuLID-FLUX Embed; nothing is downloaded.")
    RETURN_TYPES = ("EVA_CLIP_VISION",)
    RETURN_NAMES = ("eva_clip",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "eva_file": (_eva_choices(), {"tooltip": "EVA02_CLIP_L_336_psz14_s6B.pt (the whole EVA-CLIP; only its "
                                                     "visual tower is read)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, eva_file):
        return EVA_FILES.choice_problem(eva_file, _eva_choices(), NO_EVA)

    def load(self, eva_file):
        from ..techniques.pulid_flux.eva_clip import load_eva_clip
        from ..techniques.pulid_flux.files import eva_path

        if eva_file == NO_EVA:
            raise ModelFileError(EVA_FILES.missing_message())
        return (load_eva_clip(resolved_path(eva_path, eva_file)),)


class PulidFluxEmbed:
    NODE_ID = "LikenessPulidFluxEmbed"
    DISPLAY_NAME = "PuLID-FLUX Embed"
    CATEGORY = CATEGORY
    DESCRIPTION = ("One person's PuLID-FLUX ID tokens from reference photo(s), as the official pipeline makes them: "
                   "the analyzer's antelopev2 embedding plus EVA-CLIP features of the aligned face (parsed: the "
                   "face and hair in grey, background, neck, clothes and ears white), through the ID encoder. Several images are "
                   "averaged. An image without a face is an error that names it.")
    RETURN_TYPES = ("PULID_FLUX_EMBEDS",)
    RETURN_NAMES = ("embeds",)
    FUNCTION = "embed"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pulid_flux": ("PULID_FLUX", {"tooltip": "From PuLID-FLUX Loader (its ID encoder makes the tokens)."}),
            "eva_clip": ("EVA_CLIP_VISION", {"tooltip": "From EVA-CLIP Loader (PuLID-FLUX)."}),
            "analyzer": ("FACE_ANALYZER", {"tooltip": "An insightface analyzer with antelopev2 (what PuLID was "
                                                      "trained with)."}),
            "face_parser": ("FACE_PARSER", {"tooltip": "From Face Parser Loader: BiSeNet as in the official code "
                                                      "(the landmark fallback works without weights, less exactly)."}),
            "image": ("IMAGE", {"tooltip": "Photo(s) of one person; a batch is averaged into one identity."}),
            "selection": (list(SELECTIONS), {"default": "largest", "tooltip": "Which face of each image: the "
                          "largest (official), or the one at 'face_index' counted left to right."}),
            "face_index": int_input(0, 0, 63, "With selection 'index': the face number, left to right from 0."),
        }}

    @shows_warnings
    def embed(self, pulid_flux, eva_clip, analyzer, face_parser, image, selection, face_index):
        from ..techniques.pulid_flux.encode import embed_faces

        check_images(image=image)
        check_analyzer(analyzer)
        return (embed_faces(image, analyzer, face_parser, eva_clip, pulid_flux, selection=selection,
                            face_index=face_index),)


class SavePulidFluxEmbeds:
    NODE_ID = "LikenessSavePulidFluxEmbeds"
    DISPLAY_NAME = "Save PuLID-FLUX Embeds"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Saves PuLID-FLUX ID tokens (positive and uncond) as a safetensors file in models/likeness/"
                   "pulid_embeds, to reuse an identity without its photos, EVA-CLIP or the analyzer.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "embeds": ("PULID_FLUX_EMBEDS", {"tooltip": "From PuLID-FLUX Embed."}),
            "name": ("STRING", {"default": "identity", "tooltip": "File name (without .safetensors): letters, "
                     "digits, space, . _ -."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name; otherwise "
                          "a number is appended."}),
        }}

    def save(self, embeds, name, overwrite):
        from ..face_analysis.embeds import EMBEDS_FILE_NAMES, embeds_path
        from ..techniques.pulid_flux.embeds import PulidFluxEmbeds, save_pulid_embeds
        from ..techniques.pulid_flux.files import embeds_dir

        if not isinstance(embeds, PulidFluxEmbeds):
            raise InvalidInputError("'embeds' must come from a PuLID-FLUX Embed or Load PuLID-FLUX Embeds node")
        folder = embeds_dir()
        stem = checked_file_stem(name, "name", [(folder, file_name) for file_name in EMBEDS_FILE_NAMES])
        path = save_pulid_embeds(embeds, embeds_path(folder, stem, overwrite))
        return {"ui": {"text": [path]}, "result": (path,)}


class LoadPulidFluxEmbeds:
    NODE_ID = "LikenessLoadPulidFluxEmbeds"
    DISPLAY_NAME = "Load PuLID-FLUX Embeds"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads PuLID-FLUX ID tokens saved by Save PuLID-FLUX Embeds from models/likeness/pulid_embeds."
    RETURN_TYPES = ("PULID_FLUX_EMBEDS",)
    RETURN_NAMES = ("embeds",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": (_embeds_choices(), {"tooltip": "A file in models/likeness/pulid_embeds/."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, file):
        return SAVED.choice_problem(file, _embeds_choices(), NO_EMBEDS)

    @classmethod
    def IS_CHANGED(cls, file):
        from ..techniques.pulid_flux.files import embeds_file

        try:
            return os.path.getmtime(embeds_file(file))
        except OSError:
            return float("nan")

    def load(self, file):
        from ..techniques.pulid_flux.embeds import load_pulid_embeds
        from ..techniques.pulid_flux.files import embeds_file

        if file == NO_EMBEDS:
            raise ModelFileError(SAVED.missing_message())
        return (load_pulid_embeds(resolved_path(embeds_file, file)),)


class ApplyPulidFlux:
    NODE_ID = "LikenessApplyPulidFlux"
    DISPLAY_NAME = "Apply PuLID-FLUX"
    CATEGORY = CATEGORY
    DESCRIPTION = ("PuLID-FLUX on a FLUX.1 model: after every 2nd double block and every 4th single block the image "
                   "tokens attend to the person's ID tokens and the result is added with 'weight' (the official "
                   "schedule). With a MASK the person acts only there: chain two Apply nodes with two masks for two "
                   "people. Works next to other packs' Flux block patches (no model method is replaced).")
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A FLUX.1 dev / schnell model (a patched clone is returned)."}),
            "pulid_flux": ("PULID_FLUX", {"tooltip": "From PuLID-FLUX Loader (the same file that made the embeds)."}),
            "embeds": ("PULID_FLUX_EMBEDS", {"tooltip": "From PuLID-FLUX Embed or Load PuLID-FLUX Embeds."}),
            "weight": float_input(1.0, -1.0, 5.0, 0.05, "The official 'id weight' (its app offers 0-3, default 1): "
                                  "higher = more likeness, less prompt freedom."),
            **percent_range_inputs(
                "When the ID starts, as a fraction of the schedule. The official 'timestep to start inserting ID' "
                "k of N steps is about k/N: 4 of 28 (≈0.14) for photos, 0-1 of 28 for stylised images.",
                "When the ID stops, as a fraction of the schedule."),
            "uncond": (list(UNCOND_CHOICES), {"default": "zero ID (official true CFG)", "tooltip": "What the "
                       "negative prompt's pass gets when the sampler runs real CFG (cfg > 1): the ID encoder's output "
                       "for zero inputs, as the official true-CFG mode does, or no ID. With Flux's usual cfg 1 "
                       "there is no negative pass."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Where this person goes in the image (white = here); image tokens outside "
                                        "get no ID. Chain another Apply node with another mask for a second person."}),
        }}

    @shows_warnings
    def apply(self, model, pulid_flux, embeds, weight, start_at, end_at, uncond, mask=None):
        from ..techniques.pulid_flux.injector import apply_pulid_flux

        check_masks(mask=mask)
        if uncond not in UNCOND_CHOICES:
            raise InvalidInputError(f"uncond must be one of {list(UNCOND_CHOICES)}, got {uncond!r}")
        return (apply_pulid_flux(model, pulid_flux, embeds, weight=weight, start_at=start_at, end_at=end_at,
                                 mask=mask, uncond=UNCOND_CHOICES[uncond]),)


NODE_CLASSES = [PulidFluxLoader, EvaClipLoader, PulidFluxEmbed, SavePulidFluxEmbeds, LoadPulidFluxEmbeds,
                ApplyPulidFlux]
