"""M3Face generation nodes: the AltDiffusion base the multilingual FaceControlNets need, and its prompt encoder.

The FaceControlNets themselves (english / mlin, segmentation / landmark) load with ComfyUI's stock ControlNetLoader
(diffusers format, models/controlnet/) and attach with the stock Apply ControlNet. English branches pair with any
SD1.5 checkpoint and its CLIP; mlin branches pair with the AltDiffusion folder loaded here and prompts encoded by
``M3Face Multilingual Text Encode``. Both outputs feed the stock KSampler. ``M3Face FaceControlNet Loader`` is the
fallback for ControlNet files whose layout ComfyUI's fixed tables do not list (scaled-down models; a multilingual
branch whose base differs from ComfyUI's SD2.1 entry): same file, same ComfyUI ControlNet object.
"""
from __future__ import annotations

from ..errors import InvalidInputError, ModelFileError
from ..model_hints import ModelFolder
from ._common import category, file_choices, int_input, resolved_path

CATEGORY = category("M3Face")
FOLDER, SUBFOLDER = "likeness", "m3face"
UNET_CONFIG = "unet/config.json"
NO_FOLDER = "(no AltDiffusion folder in models/likeness/m3face)"
BASES = ModelFolder("AltDiffusion diffusers folders", FOLDER, (SUBFOLDER,))


def _list_bases() -> list[str]:
    """Folders below models/likeness/m3face/ holding a diffusers UNet and an XLM-R text encoder."""
    from ..host.folders import list_files

    files = list_files(FOLDER, SUBFOLDER, {".json"})
    unets = [name[: -len(UNET_CONFIG)].rstrip("/") for name in files if name.endswith("/" + UNET_CONFIG)]
    return [name for name in unets if f"{name}/text_encoder/config.json" in files]


def _bases() -> list[str]:
    return file_choices(_list_bases, NO_FOLDER)


class AltDiffusionLoader:
    NODE_ID = "LikenessM3FaceAltDiffusionLoader"
    DISPLAY_NAME = "M3Face AltDiffusion Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a diffusers AltDiffusion folder (AltDiffusion-m18, the base of M3Face's multilingual "
                   "FaceControlNets) from models/likeness/m3face/<folder>/: the UNet and VAE as ComfyUI models "
                   "(architecture from each config.json, keys converted by ComfyUI), and the XLM-R text encoder "
                   "with its projection for M3Face Multilingual Text Encode.")
    RETURN_TYPES = ("MODEL", "M3FACE_TEXT_ENCODER", "VAE")
    RETURN_NAMES = ("model", "text_encoder", "vae")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        from ..techniques.m3face.altdiffusion import PREDICTION_TYPES

        return {"required": {
            "folder": (_bases(), {"tooltip": "A diffusers folder with unet/, vae/, text_encoder/, tokenizer/ "
                       "(and scheduler/) below models/likeness/m3face/."}),
            "prediction": (["auto", *PREDICTION_TYPES], {"default": "auto", "tooltip": "What the UNet "
                           "predicts. auto reads scheduler/scheduler_config.json (AltDiffusion-m18 names none: "
                           "epsilon)."}),
            "max_length": int_input(0, 0, 512, "Prompt length in tokens; 0 = the tokenizer's model_max_length "
                                    "(77 for AltDiffusion)."),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, folder):
        return BASES.choice_problem(folder, _bases(), NO_FOLDER)

    def load(self, folder, prediction, max_length):
        from ..host.folders import resolve
        from ..techniques.m3face.altdiffusion import load_altdiffusion

        if folder == NO_FOLDER:
            raise ModelFileError(BASES.missing_message())
        return load_altdiffusion(resolved_path(resolve, FOLDER, folder, SUBFOLDER), prediction, max_length)


class MultilingualTextEncode:
    NODE_ID = "LikenessM3FaceMultilingualTextEncode"
    DISPLAY_NAME = "M3Face Multilingual Text Encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes a prompt in any of XLM-R's languages (M3Face trained English, French, German, Italian "
                   "and Spanish captions) with AltDiffusion's text encoder into CONDITIONING for the KSampler and "
                   "Apply ControlNet with an mlin FaceControlNet. No prompt weighting syntax.")
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("M3FACE_TEXT_ENCODER", {"tooltip": "From M3Face AltDiffusion Loader."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The prompt, e.g. 'Cette "
                     "femme séduisante a les yeux étroits et les joues roses.'"}),
            "attention_mask": (["auto", "on", "off"], {"default": "auto", "tooltip": "auto follows the encoder "
                               "config's use_attention_mask, as AltDiffusion's pipeline does; M3Face's training "
                               "script encoded without the mask (off)."}),
        }}

    def encode(self, text_encoder, text, attention_mask):
        from ..host.diffusers_models import load_managed
        from ..host.sampling import conditioning
        from ..techniques.m3face.altdiffusion import MultilingualEncoderBundle
        from ..techniques.m3face.multilingual import encode_prompts

        if not isinstance(text_encoder, MultilingualEncoderBundle):
            raise InvalidInputError("'text_encoder' must come from the M3Face AltDiffusion Loader node.")
        device = load_managed(text_encoder.patcher) if text_encoder.patcher is not None else None
        context = encode_prompts(text_encoder.encoder, text_encoder.tokenizer, [text], attention_mask, device)
        return (conditioning(context),)


NO_CONTROLNET = "(no file in models/controlnet)"
CONTROLNETS = ModelFolder("FaceControlNet files", "controlnet", ("",))


def _controlnets() -> list[str]:
    from ..host.folders import list_files

    return file_choices(lambda: list_files("controlnet"), NO_CONTROLNET)


class FaceControlNetLoader:
    NODE_ID = "LikenessM3FaceControlNetLoader"
    DISPLAY_NAME = "M3Face FaceControlNet Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a diffusers-format ControlNet of any SD layout (M3Face's FaceControlNet files) from "
                   "models/controlnet/, reading the architecture from the file itself. The stock Load ControlNet "
                   "Model node loads the SD1.5-shaped English branches as well; use this one when it refuses a file "
                   "(a multilingual branch, scaled-down models). Apply it with the stock Apply ControlNet.")
    RETURN_TYPES = ("CONTROL_NET",)
    RETURN_NAMES = ("control_net",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        from ..techniques.m3face.controlnet import HEAD_LAYOUTS

        return {"required": {
            "control_net_name": (_controlnets(), {"tooltip": "A diffusers ControlNet file in models/controlnet/ "
                                 "(e.g. m3face_landmark_mlin.safetensors)."}),
            "heads": (list(HEAD_LAYOUTS), {"default": "auto", "tooltip": "Attention head layout (the file's shapes "
                      "cannot tell it). auto: the connected model's, else ComfyUI's table, else 8 heads for "
                      "SD1.x-style and 64-channel heads for SD2.x-style (linear projection) ControlNets."}),
        }, "optional": {
            "model": ("MODEL", {"tooltip": "The base model the ControlNet will steer (its copy source): auto takes "
                      "the head layout from it."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, control_net_name):
        return CONTROLNETS.choice_problem(control_net_name, _controlnets(), NO_CONTROLNET)

    def load(self, control_net_name, heads, model=None):
        from ..host.diffusers_models import model_head_layout
        from ..host.folders import resolve
        from ..techniques.m3face.altdiffusion import read_weight_file
        from ..techniques.m3face.controlnet import build_face_controlnet

        if control_net_name == NO_CONTROLNET:
            raise ModelFileError(CONTROLNETS.missing_message())
        path = resolved_path(resolve, "controlnet", control_net_name)
        model_heads = model_head_layout(model) if model is not None else None
        return (build_face_controlnet(read_weight_file(path), heads, model_heads, control_net_name),)


NODE_CLASSES = [AltDiffusionLoader, MultilingualTextEncode, FaceControlNetLoader]
