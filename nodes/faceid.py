"""IP-Adapter FaceID family nodes (FaceID, FaceID-Plus, FaceID-PlusV2, Face-MakeUp's adapter half)."""
from __future__ import annotations

import logging

from ..errors import InvalidInputError, ModelFileError
from ._common import category, float_input, percent_range_inputs

logger = logging.getLogger("likeness")

CATEGORY = category("FaceID")
FOLDER = "likeness"
SUBFOLDERS = ("faceid", "face_makeup")
NO_FILE = "(no file in models/likeness/faceid or face_makeup)"
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
    DESCRIPTION = ("Loads an IP-Adapter FaceID-family file (ip-adapter-faceid*.bin / .safetensors, or Face-MakeUp's "
                   "model.bin) from models/likeness/faceid or face_makeup. The variant (FaceID, Plus, PlusV2, "
                   "Face-MakeUp) is read from the keys; every key is checked.")
    RETURN_TYPES = ("FACE_MAKEUP", "STRING")
    RETURN_NAMES = ("faceid", "variant")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_files(), {"tooltip": "The adapter file (SD1.5)."}),
            "shortcut": (list(SHORTCUT_CHOICES), {"default": "auto (from file name)", "tooltip": "FaceID-Plus and "
                         "PlusV2 have the same keys; PlusV2 adds the MLP tokens back (x + s_scale * resampler). "
                         "'auto' turns it on for names containing 'plusv2' and for Face-MakeUp."}),
        }}

    def load(self, model_name, shortcut):
        from ..host.folders import resolve
        from ..techniques.faceid.checkpoint import load_faceid_checkpoint

        if model_name == NO_FILE or "/" not in model_name:
            raise ModelFileError("No FaceID-family file found. Put ip-adapter-faceid-plusv2_sd15.bin in "
                                 "models/likeness/faceid/ (or Face-MakeUp's model.bin in models/likeness/face_makeup/).")
        sub, name = model_name.split("/", 1)
        try:
            path = resolve(FOLDER, name, sub)
        except FileNotFoundError as exc:
            raise ModelFileError(str(exc)) from exc
        checkpoint = load_faceid_checkpoint(path, shortcut=SHORTCUT_CHOICES.get(shortcut))
        return (checkpoint, checkpoint.name)


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
            "model": ("MODEL", {"tooltip": "An SD1.5 model (Realistic Vision recommended)."}),
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

    def apply(self, model, faceid, image, faces, weight, s_scale, lora_strength, start_at, end_at,
              clip_vision=None, mix_weights="", mask=None):
        from ..techniques.faceid.apply import apply_faceid_adapter
        from ..techniques.faceid.checkpoint import FaceIDCheckpoint, Variant

        if not isinstance(faceid, FaceIDCheckpoint):
            raise InvalidInputError("'faceid' must come from the FaceID / Face-MakeUp Loader.")
        tokens = faceid_tokens(faceid, image, faces, clip_vision, s_scale, mix_weights)
        if faceid.variant == Variant.FACE_MAKEUP:
            logger.warning("Likeness: Face-MakeUp applied as its adapter half only (its pose ControlNet is not "
                           "attached by this node).")
        return (apply_faceid_adapter(model, faceid, tokens, weight=weight, lora_strength=lora_strength,
                                     start_at=start_at, end_at=end_at, mask=mask),)


def parse_weights(text: str, count: int) -> list[float] | None:
    if not text or not text.strip():
        return None
    try:
        weights = [float(w) for w in text.replace(";", ",").split(",") if w.strip()]
    except ValueError as exc:
        raise InvalidInputError(f"mix_weights must be numbers separated by commas, got {text!r}.") from exc
    if len(weights) != count:
        raise InvalidInputError(f"mix_weights has {len(weights)} value(s) but {count} image(s) have a face.")
    return weights


def faceid_tokens(checkpoint, image, faces, clip_vision, s_scale: float, mix_weights: str = ""):
    """Cond/uncond ID tokens from the faces of ``image`` (one per image, blended)."""
    import torch

    from ..face_analysis.align import align_faces
    from ..techniques.faceid.apply import arcface_from_faces, clip_hidden_states, encode_id_tokens
    from ..techniques.faceid.mixing import mix_identities

    if len(faces) != image.shape[0]:
        raise InvalidInputError(f"FACES describes {len(faces)} image(s) but the IMAGE batch has {image.shape[0]}.")
    arcfaces = arcface_from_faces(faces)
    with_face = [i for i, f in enumerate(faces.first_face_per_image()) if f is not None]
    if not with_face:
        raise InvalidInputError("no face in any reference image.")
    clip_rows = [None] * len(with_face)
    zero = None
    if checkpoint.needs_clip_vision:
        if clip_vision is None:
            raise InvalidInputError(f"{checkpoint.name} needs the CLIP vision model (CLIP-ViT-H-14).")
        aligned = align_faces(image, faces, size=224)
        first_crop = {}
        for crop_index, (img, number) in enumerate(zip(aligned.image_indices, aligned.face_numbers)):
            if number == 0 and img not in first_crop:
                first_crop[img] = crop_index
        crops = aligned.crops[[first_crop[i] for i in with_face]]
        with torch.no_grad():
            hidden = clip_hidden_states(clip_vision, crops)
            zero = clip_hidden_states(clip_vision, None)
        clip_rows = list(hidden.split(1))
    identities = [(arcfaces[i:i + 1], c) for i, c in zip(with_face, clip_rows)]
    arcface, clip = mix_identities(identities, parse_weights(mix_weights, len(identities)))
    return encode_id_tokens(checkpoint, arcface, clip, zero, s_scale=s_scale)


NODE_CLASSES = [FaceIDLoader, FaceIDApply]
