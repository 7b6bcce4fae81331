"""ConsistentID nodes: load the official weights, encode a reference face into MODEL + conditioning."""
from __future__ import annotations

import logging

from ..errors import InvalidInputError, ModelFileError
from ..face_analysis.analyze import warn_images_without_face
from ..model_hints import ModelFolder
from ..validation import check_images, check_masks
from ._common import category, file_choices, float_input, resolved_path
from ._feedback import shows_warnings

logger = logging.getLogger("likeness")

CATEGORY = category("ConsistentID")
FOLDER, SUBFOLDER = "likeness", "consistentid"
NO_FILE = "(no file in models/likeness/consistentid)"
WEIGHTS = ModelFolder("ConsistentID weights", FOLDER, (SUBFOLDER,))
DEFAULT_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality, blurry"


def _files() -> list[str]:
    from ..host.folders import list_files

    return file_choices(lambda: list_files(FOLDER, SUBFOLDER), NO_FILE)


class ConsistentIDLoader:
    NODE_ID = "LikenessConsistentIDLoader"
    DISPLAY_NAME = "ConsistentID Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads ConsistentID weights (ConsistentID-v1.bin for SD1.5, ConsistentID_SDXL-v1.bin for SDXL, or "
                   "a .safetensors conversion) from models/likeness/consistentid/: the FaceID-Plus ID projector, the "
                   "LoRA/IP attention processors (32 for SD1.5, 140 for SDXL) and the FacialEncoder. The base is read "
                   "from the keys; every key is checked and a wrong file gets a clear error.")
    RETURN_TYPES = ("CONSISTENTID",)
    RETURN_NAMES = ("consistentid",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_files(), {"tooltip": "ConsistentID-v1.bin (SD1.5) or ConsistentID_SDXL-v1.bin (SDXL) in "
                                      "models/likeness/consistentid/."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        return WEIGHTS.choice_problem(model_name, _files(), NO_FILE)

    def load(self, model_name):
        from ..host.folders import resolve
        from ..techniques.consistentid.loader import load_consistentid

        if model_name == NO_FILE:
            raise ModelFileError(WEIGHTS.missing_message())
        path = resolved_path(resolve, FOLDER, model_name, SUBFOLDER)
        return (load_consistentid(path),)


class ConsistentIDEncode:
    NODE_ID = "LikenessConsistentIDEncode"
    DISPLAY_NAME = "ConsistentID Encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Builds ConsistentID's conditioning from a reference face: ID tokens (ArcFace + CLIP-H) injected "
                   "in every cross-attention, the LoRA merged into the model, and the fixed facial caption whose "
                   "feature words (face, ears, eyes, nose, mouth) are fused with the matching face-region crops. "
                   "Before the merge point the positive is the plain prompt, after it the fused one.")
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "STRING")
    RETURN_NAMES = ("model", "positive", "negative", "prompt_used")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5 model with ConsistentID-v1.bin (Realistic Vision recommended) or "
                                "an SDXL model with ConsistentID_SDXL-v1.bin; a file of the other base is refused."}),
            "clip": ("CLIP", {"tooltip": "The text encoder(s) of that model (SDXL: both, as Load Checkpoint gives "
                              "them)."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP-ViT-H-14 (laion2B), the image encoder ConsistentID "
                                            "was trained with."}),
            "consistentid": ("CONSISTENTID", {"tooltip": "From ConsistentID Loader."}),
            "image": ("IMAGE", {"tooltip": "Reference photo(s) of one person. Several images: their identity "
                                "vectors are averaged; facial regions come from the first one with a face."}),
            "faces": ("FACES", {"tooltip": "Analyze Faces on the same images with the InsightFace buffalo_l "
                                "analyzer (selection 'largest')."}),
            "parser": ("FACE_PARSER", {"tooltip": "Face Parser Loader (BiSeNet face_parsing.pth) for the facial "
                                       "regions."}),
            "prompt": ("STRING", {"multiline": True, "default": "a photo of a person", "tooltip": "What to "
                       "generate. The facial caption is appended (or put first when the prompt is long)."}),
            "negative": ("STRING", {"multiline": True, "default": DEFAULT_NEGATIVE, "tooltip": "Negative prompt; it "
                         "is fused with empty facial regions at the same positions, as in the official code."}),
            "id_weight": float_input(1.0, 0.0, 3.0, 0.05, "Strength of the ID tokens' attention (official: 1.0). "
                                     "0 with lora_strength 0 leaves the model unchanged."),
            "merge_at": float_input(0.62, 0.0, 1.0, 0.01, "Fraction of the schedule that uses the plain prompt "
                                    "before the fused facial prompt takes over (delayed primacy). Official: step 30 "
                                    "of 50, i.e. 0.62. Lower = stronger facial detail, higher = more editable."),
            "lora_strength": float_input(1.0, 0.0, 2.0, 0.05, "Strength of the ConsistentID LoRA merged into the "
                                         "model (1.0 = as trained)."),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Optional: only where the ID tokens act (e.g. one person's area)."}),
        }}

    @shows_warnings
    def encode(self, model, clip, clip_vision, consistentid, image, faces, parser, prompt, negative, id_weight,
               merge_at, lora_strength, mask=None):
        from ..face_analysis.parsing import FaceParser, parse_faces
        from ..techniques.consistentid.encode import encode_consistentid
        from ..techniques.faceid.apply import arcface_from_faces

        check_images(image=image)
        check_masks(mask=mask)
        if getattr(consistentid, "facial_encoder", None) is None:
            raise InvalidInputError("'consistentid' must come from the ConsistentID Loader.")
        if not isinstance(parser, FaceParser):
            raise InvalidInputError("'parser' must come from the Face Parser Loader node.")
        if len(faces) != image.shape[0]:
            raise InvalidInputError(f"FACES describes {len(faces)} image(s) but the IMAGE batch has "
                                    f"{image.shape[0]}; analyse the same images.")
        arcfaces = arcface_from_faces(faces)
        warn_images_without_face(faces, "image")
        with_face = [i for i, f in enumerate(faces.first_face_per_image()) if f is not None]
        labels = parse_faces(parser, image, faces).labels[with_face[0]] if with_face else None
        result = encode_consistentid(model, clip, clip_vision, consistentid, image, arcfaces, labels, prompt,
                                     negative, id_weight=id_weight, merge_at=merge_at, lora_strength=lora_strength,
                                     mask=mask, region_image_index=with_face[0] if with_face else 0)
        logger.info("Likeness ConsistentID: fused regions %s at rows %s", result.regions, result.positions)
        return (result.model, result.positive, result.negative, result.prompt_text)


NODE_CLASSES = [ConsistentIDLoader, ConsistentIDEncode]
