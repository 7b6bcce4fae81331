"""M3Face Muse nodes: load an aMUSEd folder, generate a face condition map from text, edit one by inpainting.

diffusers is optional: without it these nodes stay listed (the pack logs one line at load) and say what to install
when run.
"""
from __future__ import annotations

from ..errors import InvalidInputError, ModelFileError
from ..model_hints import ModelFolder
from ..validation import check_images, check_masks
from ._common import category, file_choices, float_input, int_input, resolved_path

CATEGORY = category("M3Face")
FOLDER, SUBFOLDER = "likeness", "m3face"
MARKER = "transformer/config.json"   # what makes a folder under models/likeness/m3face/ a Muse model
NO_MODEL = "(no Muse folder in models/likeness/m3face)"
MUSE_FOLDERS = ModelFolder("M3Face Muse (aMUSEd) folder", FOLDER, (SUBFOLDER,), other_way=(
    "A Muse model is a diffusers aMUSEd folder (transformer/, vqvae/, scheduler/, tokenizer/, text_encoder/), "
    "e.g. a branch of m3face/FaceConditioning."))
MODALITIES = ["segmentation", "landmark"]
MODALITY_TIP = ("What to draw: the official training prefix ('Generate face segmentation | ' or 'Generate face "
                "landmark |') is put before the prompt; one Muse model makes both.")


def _muse_folders() -> list[str]:
    """Folders below models/likeness/m3face/ that hold a Muse transformer (their path relative to it)."""
    from ..host.folders import list_files

    files = list_files(FOLDER, SUBFOLDER, {".json"})
    return sorted(name[: -len(MARKER) - 1] for name in files if name.endswith("/" + MARKER))


def _choices() -> list[str]:
    return file_choices(_muse_folders, NO_MODEL)


def _check_model(muse):
    from ..techniques.m3face.muse import MuseModel

    if not isinstance(muse, MuseModel):
        raise InvalidInputError("'muse' must come from the M3Face Muse Loader node.")
    return muse


def _sampling_inputs() -> dict:
    return {
        "steps": int_input(12, 1, 100, "Unmasking steps (aMUSEd's default 12)."),
        "guidance": float_input(10.0, 0.0, 30.0, 0.1, "Classifier-free guidance against the empty prompt (aMUSEd's "
                                "default 10; 1 or less switches it off)."),
        "temperature": float_input(2.0, 0.0, 10.0, 0.05, "Randomness of which tokens stay masked, decaying linearly "
                                   "to 0 over the steps (aMUSEd's default starts at 2)."),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "The same seed gives the "
                         "same condition map (sampling draws from one seeded CPU generator)."}),
    }


class M3FaceMuseLoader:
    NODE_ID = "LikenessM3FaceMuseLoader"
    DISPLAY_NAME = "M3Face Muse Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads M3Face's condition generator, a Muse (aMUSEd) folder from models/likeness/m3face/: "
                   "UVit2D transformer, VQ model, scheduler, tokenizer and text encoder (CLIP for the English model, "
                   "M-CLIP for the multilingual one). A missing or unknown component is named in the error.")
    RETURN_TYPES = ("M3FACE_MUSE",)
    RETURN_NAMES = ("muse",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (_choices(), {"tooltip": "A folder in models/likeness/m3face/ with transformer/, vqvae/, "
                      "scheduler/, tokenizer/ and text_encoder/."}),
            "device": (["auto", "cpu"], {"default": "auto", "tooltip": "Where Muse runs: auto = ComfyUI's device "
                       "(half precision on a GPU), or force the CPU. Between runs it waits on the offload device."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model):
        return MUSE_FOLDERS.choice_problem(model, _choices(), NO_MODEL)

    def load(self, model, device):
        from ..host.folders import resolve
        from ..techniques.m3face.muse import load_muse

        if model == NO_MODEL:
            raise ModelFileError(MUSE_FOLDERS.missing_message())
        path = resolved_path(resolve, FOLDER, model, SUBFOLDER)
        return (load_muse(path, device, name=model),)


class M3FaceTextToCondition:
    NODE_ID = "LikenessM3FaceTextToCondition"
    DISPLAY_NAME = "M3Face Text to Condition"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Generates a face segmentation map or landmark image from a description with Muse, by default at "
                   "the model's own resolution (aMUSEd pipeline). Feed it to FaceControlNet as the condition image.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("condition",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "muse": ("M3FACE_MUSE", {"tooltip": "From M3Face Muse Loader."}),
            "prompt": ("STRING", {"multiline": True, "default": "This attractive woman has narrow eyes, rosy cheeks, "
                       "and wears heavy makeup.", "tooltip": "The face description (the multilingual model also "
                       "takes French, German, Italian and Spanish)."}),
            "modality": (MODALITIES, {"default": "segmentation", "tooltip": MODALITY_TIP}),
            **_sampling_inputs(),
            "batch_size": int_input(1, 1, 16, "How many condition maps to make from the prompt."),
        }, "optional": {
            "size": int_input(0, 0, 2048, "Side of the square map in pixels; 0 = the model's own size (its "
                              "transformer sample_size x the VQ downscale). Other sizes must be multiples of the VQ "
                              "downscale (16 for aMUSEd-512).", step=16),
        }}

    def generate(self, muse, prompt, modality, steps, guidance, temperature, seed, batch_size, size=0):
        from ..techniques.m3face.muse import text_to_condition

        result = text_to_condition(_check_model(muse), prompt, modality, steps=steps, guidance=guidance,
                                   temperature=temperature, seed=seed, batch_size=batch_size, size=size)
        return (result.image,)


class M3FaceEditCondition:
    NODE_ID = "LikenessM3FaceEditCondition"
    DISPLAY_NAME = "M3Face Edit Condition"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Edits a face condition map (segmentation or landmarks) with Muse inpainting: the white part of "
                   "the mask is regenerated under the prompt, the rest keeps its VQ tokens (aMUSEd inpaint "
                   "pipeline; the whole image passes through the VQ model).")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("condition",)
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "muse": ("M3FACE_MUSE", {"tooltip": "From M3Face Muse Loader."}),
            "condition": ("IMAGE", {"tooltip": "The condition map(s) to edit; sides must be multiples of the VQ "
                          "downscale (16 for aMUSEd-512)."}),
            "mask": ("MASK", {"tooltip": "White = regenerate: a token is regenerated where at least half of its cell "
                     "is white. One mask for all images or one per image."}),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The description of the edited face."}),
            "modality": (MODALITIES, {"default": "segmentation", "tooltip": MODALITY_TIP}),
            **_sampling_inputs(),
        }, "optional": {
            "strength": float_input(1.0, 0.05, 1.0, 0.05, "Share of the schedule that runs (1 = regenerate the masked "
                                    "tokens from scratch, aMUSEd's default)."),
        }}

    def edit(self, muse, condition, mask, prompt, modality, steps, guidance, temperature, seed, strength=1.0):
        from ..techniques.m3face.muse import edit_condition

        check_images(condition=condition)
        check_masks(mask=mask)
        result = edit_condition(_check_model(muse), condition, mask, prompt, modality, steps=steps,
                                guidance=guidance, temperature=temperature, seed=seed, strength=strength)
        return (result.image,)


NODE_CLASSES = [M3FaceMuseLoader, M3FaceTextToCondition, M3FaceEditCondition]
