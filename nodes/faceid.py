"""IP-Adapter FaceID family nodes (FaceID, FaceID-Plus, FaceID-PlusV2, Portrait on SD1.5 and SDXL; Face-MakeUp;
InstantID's adapter + IdentityNet)."""
from __future__ import annotations

import logging

from ..errors import InvalidInputError, ModelFileError
from ..model_hints import ModelFolder
from ..validation import check_images, check_masks
from ._common import category, float_input, percent_range_inputs, resolved_path
from ._feedback import shows_warnings

logger = logging.getLogger("likeness")

CATEGORY = category("FaceID")
FOLDER = "likeness"
SUBFOLDERS = ("faceid", "face_makeup", "instantid")
NO_FILE = "(no file in models/likeness/faceid, face_makeup or instantid)"
ADAPTERS = ModelFolder("FaceID-family adapter", FOLDER, SUBFOLDERS)
SHORTCUT_CHOICES = {"auto (from file name)": None, "on (PlusV2, Face-MakeUp)": True, "off (Plus v1)": False}


def _files() -> list[str]:
    from ..host.folders import list_files

    names = []
    for sub in SUBFOLDERS:
        try:
            names += [f"{sub}/{name}" for name in list_files(FOLDER, sub)]
        except Exception:  # a broken folder must not hide the node
            pass
    return names or [NO_FILE]


class FaceIDLoader:
    NODE_ID = "LikenessFaceIDLoader"
    DISPLAY_NAME = "FaceID / Face-MakeUp Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads an IP-Adapter FaceID-family file (ip-adapter-faceid*.bin / .safetensors, SD1.5 or SDXL; "
                   "Face-MakeUp's model.bin; InstantID's ip-adapter.bin) from models/likeness/faceid, face_makeup or "
                   "instantid. The variant (FaceID, Plus, PlusV2, Portrait, Face-MakeUp, InstantID) and the base "
                   "model (SD1.5 / SDXL) are read from the keys; every key is checked.")
    RETURN_TYPES = ("FACE_MAKEUP", "STRING")
    RETURN_NAMES = ("faceid", "variant")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_files(), {"tooltip": "The adapter file (SD1.5 or SDXL; use it with a model of the same "
                                      "base)."}),
            "shortcut": (list(SHORTCUT_CHOICES), {"default": "auto (from file name)", "tooltip": "FaceID-Plus and "
                         "PlusV2 have the same keys; PlusV2 adds the MLP tokens back (x + s_scale * resampler). "
                         "'auto' turns it on for names containing 'plusv2' and for Face-MakeUp."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        return ADAPTERS.choice_problem(model_name, _files(), NO_FILE)

    def load(self, model_name, shortcut):
        from ..host.folders import resolve
        from ..techniques.faceid.checkpoint import load_faceid_checkpoint

        if model_name == NO_FILE or "/" not in model_name:
            raise ModelFileError(ADAPTERS.missing_message(None if model_name == NO_FILE else model_name))
        sub, name = model_name.split("/", 1)
        path = resolved_path(resolve, FOLDER, name, sub)
        checkpoint = load_faceid_checkpoint(path, shortcut=SHORTCUT_CHOICES.get(shortcut))
        return (checkpoint, f"{checkpoint.name} ({checkpoint.base})")


class FaceIDApply:
    NODE_ID = "LikenessFaceIDApply"
    DISPLAY_NAME = "FaceID / Face-MakeUp Apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Applies a FaceID-family adapter: ID tokens from the ArcFace vector (and, for Plus/PlusV2/"
                   "Face-MakeUp, CLIP-H of the aligned face) attend in every cross-attention next to the text, and the "
                   "adapter's LoRA is merged into the model. Several images are blended (identity mixing).")
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5 or SDXL model, the adapter's base (SD1.5: Realistic Vision "
                      "recommended)."}),
            "faceid": ("FACE_MAKEUP", {"tooltip": "From FaceID / Face-MakeUp Loader."}),
            "image": ("IMAGE", {"tooltip": "Reference photo(s). Several images are blended with mix_weights (equal by "
                                "default): photos of one person, or different people for identity mixing."}),
            "faces": ("FACES", {"tooltip": "Analyze Faces on the same images with InsightFace buffalo_l (512-d)."}),
            "weight": float_input(1.0, 0.0, 3.0, 0.05, "Strength of the ID attention (the official 'scale'; "
                                  "Face-MakeUp recommends 0.6)."),
            "s_scale": float_input(1.0, 0.0, 3.0, 0.05, "PlusV2 / Face-MakeUp: weight of the CLIP refinement in "
                                   "x + s_scale * resampler(x, clip). Ignored without the shortcut."),
            "lora_strength": float_input(1.0, 0.0, 2.0, 0.05, "Strength of the adapter's LoRA merged into the model "
                                         "(1.0 = as trained; 0 = leave the weights alone)."),
            **percent_range_inputs(),
        }, "optional": {
            "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP-ViT-H-14; required by Plus, PlusV2 and Face-MakeUp."}),
            "mix_weights": ("STRING", {"default": "", "tooltip": "Comma-separated weight per image (e.g. '0.7, 0.3'); "
                            "empty = equal. 1 and 0 give exactly the first identity."}),
            "mask": ("MASK", {"tooltip": "Optional: only where the ID tokens act."}),
        }}

    @shows_warnings
    def apply(self, model, faceid, image, faces, weight, s_scale, lora_strength, start_at, end_at,
              clip_vision=None, mix_weights="", mask=None):
        from ..techniques.faceid.apply import apply_faceid_adapter
        from ..techniques.faceid.checkpoint import FaceIDCheckpoint, Variant
        from ..techniques.faceid.references import faceid_tokens

        check_images(image=image)
        check_masks(mask=mask)
        if not isinstance(faceid, FaceIDCheckpoint):
            raise InvalidInputError("'faceid' must come from the FaceID / Face-MakeUp Loader.")
        tokens = faceid_tokens(faceid, image, faces, clip_vision, s_scale, mix_weights)
        if faceid.variant in (Variant.FACE_MAKEUP, Variant.INSTANTID):
            whole = "Face-MakeUp Apply" if faceid.variant == Variant.FACE_MAKEUP else "InstantID Apply"
            logger.warning("Likeness: %s applied as its adapter half only; use '%s' for its ControlNet.",
                           faceid.name, whole)
        return (apply_faceid_adapter(model, faceid, tokens, weight=weight, lora_strength=lora_strength,
                                     start_at=start_at, end_at=end_at, mask=mask),)


class FaceMakeUpApply:
    NODE_ID = "LikenessFaceMakeUpApply"
    DISPLAY_NAME = "Face-MakeUp Apply (adapter + pose ControlNet)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Runs the whole Face-MakeUp: the FaceID-PlusV2-style adapter on the model (LoRA + ID tokens) and "
                   "its pose ControlNet, attached to the conditioning with the ID tokens (not the text) as its "
                   "context and the 5-keypoint map as its hint (the reference's pose unless a pose map is given).")
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5 model (Realistic Vision recommended)."}),
            "faceid": ("FACE_MAKEUP", {"tooltip": "Face-MakeUp's model.bin from the FaceID / Face-MakeUp Loader."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP-ViT-H-14 (encodes the aligned face crop)."}),
            "image": ("IMAGE", {"tooltip": "Reference photo(s); several are blended with mix_weights."}),
            "faces": ("FACES", {"tooltip": "Analyze Faces on the reference images with InsightFace buffalo_l."}),
            "positive": ("CONDITIONING", {"tooltip": "Positive prompt conditioning; receives the pose ControlNet."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt conditioning; receives the pose ControlNet "
                         "fed the unconditional ID tokens."}),
            "weight": float_input(0.6, 0.0, 3.0, 0.05, "ID scale (Face-MakeUp recommends 0.6)."),
            "s_scale": float_input(1.0, 0.0, 3.0, 0.05, "Weight of the CLIP refinement in x + s_scale * resampler."),
            "lora_strength": float_input(1.0, 0.0, 2.0, 0.05, "Strength of the merged LoRA (1 = as trained)."),
            "controlnet_strength": float_input(0.2, 0.0, 2.0, 0.01, "Strength of the pose ControlNet (official "
                                               "0.2; 0 = adapter only)."),
            **percent_range_inputs(),
        }, "optional": {
            "pose_map": ("IMAGE", {"tooltip": "A 5-keypoint map (Face Keypoint Map node, e.g. from another photo) "
                         "giving the pose; default: the first reference's keypoints at its own size."}),
            "mix_weights": ("STRING", {"default": "", "tooltip": "Comma-separated weight per reference image; "
                            "empty = equal."}),
        }}

    @shows_warnings
    def apply(self, model, faceid, clip_vision, image, faces, positive, negative, weight, s_scale, lora_strength,
              controlnet_strength, start_at, end_at, pose_map=None, mix_weights=""):
        from ..techniques.faceid.apply import apply_face_makeup
        from ..techniques.faceid.checkpoint import FaceIDCheckpoint
        from ..techniques.faceid.references import faceid_tokens, reference_pose_map

        check_images(image=image, pose_map=pose_map)
        if not isinstance(faceid, FaceIDCheckpoint):
            raise InvalidInputError("'faceid' must come from the FaceID / Face-MakeUp Loader.")
        tokens = faceid_tokens(faceid, image, faces, clip_vision, s_scale, mix_weights)
        if pose_map is None:
            pose_map = reference_pose_map(faces)
        return apply_face_makeup(model, faceid, tokens, positive, negative, pose_map, weight=weight,
                                 lora_strength=lora_strength, controlnet_strength=controlnet_strength,
                                 start_at=start_at, end_at=end_at)


class InstantIDApply:
    NODE_ID = "LikenessInstantIDApply"
    DISPLAY_NAME = "InstantID Apply (adapter + IdentityNet)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Runs InstantID on an SDXL model: the 16 ID tokens of its Resampler (from the raw antelopev2 ArcFace "
                   "vector) attend in every cross-attention next to the text, and the IdentityNet ControlNet, fed "
                   "those ID tokens instead of the prompt, follows the 5-keypoint map (the reference's pose unless a "
                   "pose map is given).")
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SDXL model."}),
            "instantid": ("FACE_MAKEUP", {"tooltip": "InstantID's ip-adapter.bin from the FaceID / Face-MakeUp Loader "
                          "(models/likeness/instantid)."}),
            "control_net": ("CONTROL_NET", {"tooltip": "The IdentityNet (InstantID's ControlNetModel "
                            "diffusion_pytorch_model.safetensors) from Load ControlNet Model."}),
            "image": ("IMAGE", {"tooltip": "Reference photo(s); several are blended with mix_weights."}),
            "faces": ("FACES", {"tooltip": "Analyze Faces on the reference images (InstantID was trained on "
                      "insightface antelopev2)."}),
            "positive": ("CONDITIONING", {"tooltip": "Positive prompt conditioning; receives the IdentityNet."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt conditioning; receives the IdentityNet fed the "
                         "unconditional ID tokens."}),
            "weight": float_input(0.8, 0.0, 3.0, 0.05, "ID attention scale (the official ip_adapter_scale, 0.8)."),
            "controlnet_strength": float_input(0.8, 0.0, 2.0, 0.05, "IdentityNet strength (the official "
                                               "controlnet_conditioning_scale, 0.8; 0 = adapter only)."),
            **percent_range_inputs(),
        }, "optional": {
            "pose_map": ("IMAGE", {"tooltip": "A 5-keypoint map (Face Keypoint Map node, sized to the output) giving "
                         "the pose; default: the first reference's keypoints at its own size."}),
            "mix_weights": ("STRING", {"default": "", "tooltip": "Comma-separated weight per reference image; "
                            "empty = equal."}),
            "mask": ("MASK", {"tooltip": "Optional: only where the ID tokens act."}),
        }}

    @shows_warnings
    def apply(self, model, instantid, control_net, image, faces, positive, negative, weight, controlnet_strength,
              start_at, end_at, pose_map=None, mix_weights="", mask=None):
        from ..techniques.faceid.apply import apply_instantid
        from ..techniques.faceid.checkpoint import FaceIDCheckpoint
        from ..techniques.faceid.references import faceid_tokens, reference_pose_map

        check_images(image=image, pose_map=pose_map)
        check_masks(mask=mask)
        if not isinstance(instantid, FaceIDCheckpoint):
            raise InvalidInputError("'instantid' must come from the FaceID / Face-MakeUp Loader.")
        tokens = faceid_tokens(instantid, image, faces, None, 1.0, mix_weights)
        if pose_map is None:
            pose_map = reference_pose_map(faces)
        return apply_instantid(model, instantid, tokens, positive, negative, pose_map, control_net, weight=weight,
                               controlnet_strength=controlnet_strength, start_at=start_at, end_at=end_at, mask=mask)


class IdentityMixBalance:
    NODE_ID = "LikenessIdentityMixBalance"
    DISPLAY_NAME = "Identity Mixing Balance"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Measures an identity mix: the cosine similarity (FaceSim) of each result image to every source "
                   "identity separately, and each source's share, so you can tune mix_weights toward the balance "
                   "you want.")
    RETURN_TYPES = ("STRING", "FLOAT", "FLOAT")
    RETURN_NAMES = ("report", "similarity_first", "similarity_second")
    FUNCTION = "measure"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "source_faces": ("FACES", {"tooltip": "Analyze Faces on the source images (one identity per image), the "
                             "same FACES given to the apply node."}),
            "result_faces": ("FACES", {"tooltip": "Analyze Faces on the generated images, with the same analyzer."}),
        }, "optional": {
            "mix_weights": ("STRING", {"default": "", "tooltip": "The mix weights used (shown in the report only)."}),
        }}

    def measure(self, source_faces, result_faces, mix_weights=""):
        from ..techniques.faceid.mixing_readout import mixing_readout
        from ..techniques.faceid.references import parse_mix_weights

        readout = mixing_readout(source_faces, result_faces, parse_mix_weights(mix_weights, len(
            [f for f in source_faces.first_face_per_image() if f is not None])))
        text = readout.to_text()
        means = [readout.mean_cosine(i) for i in range(len(readout.source_images))] + [float("nan")]
        first, second = (0.0 if m != m else m for m in means[:2])
        return {"ui": {"text": [text]}, "result": (text, first, second)}


NODE_CLASSES = [FaceIDLoader, FaceIDApply, FaceMakeUpApply, InstantIDApply, IdentityMixBalance]
