"""Face parsing nodes: load a parser (BiSeNet weights or the landmark fallback), region masks."""
from __future__ import annotations

import logging

from ..errors import InvalidInputError
from ..model_hints import ModelFolder
from ..validation import check_images, check_masks
from ._common import category, float_input, int_input
from ._feedback import shows_warnings

logger = logging.getLogger("likeness")

CATEGORY = category("Face")
PARSER_WEIGHT_EXTENSIONS = {".pth", ".pt", ".bin", ".safetensors", ".sft"}
PARSER_WEIGHTS = ModelFolder("face parsing weights", "likeness", ("parsing",), other_way=(
    "Or choose 'landmarks (no weights)'."))


def _parser_choices() -> list[str]:
    from ..face_analysis.parsing import LANDMARKS_CHOICE
    from ..host.folders import list_files

    try:
        files = list_files("likeness", "parsing", PARSER_WEIGHT_EXTENSIONS)
    except Exception:  # an unreadable folder must not hide the node
        files = []
    return files + [LANDMARKS_CHOICE]


class FaceParserLoader:
    NODE_ID = "LikenessFaceParserLoader"
    DISPLAY_NAME = "Face Parser Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads the BiSeNet face parser (19 CelebAMask-HQ classes: 79999_iter.pth, or ConsistentID's "
                   "face_parsing.pth) from models/likeness/parsing/, or picks the landmark fallback that draws the "
                   "regions from 68/106 landmarks or 5 keypoints without any weights. Loaded weights are reused "
                   "across runs.")
    RETURN_TYPES = ("FACE_PARSER",)
    RETURN_NAMES = ("parser",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        choices = _parser_choices()
        return {"required": {
            "parser": (choices, {"default": choices[0], "tooltip": "A BiSeNet checkpoint in models/likeness/parsing/ "
                       "(.pth pickle, read safely, or .safetensors), or 'landmarks (no weights)': coarse regions "
                       "from landmarks, no hair."}),
            "device": (["auto", "cpu"], {"default": "auto", "tooltip": "Where BiSeNet runs: auto = ComfyUI's device "
                       "(the GPU when there is one), or force the CPU."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, parser):
        return PARSER_WEIGHTS.choice_problem(parser, _parser_choices())

    def load(self, parser, device):
        from ..face_analysis.parsing.loader import load_face_parser

        return (load_face_parser(parser, device),)


class FaceRegions:
    NODE_ID = "LikenessFaceRegions"
    DISPLAY_NAME = "Face Regions"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Parses every selected face (a square crop around its box, 512x512 BiSeNet, pasted back) and "
                   "returns a mask of the chosen regions (skin, brows, eyes, nose, mouth and lips, ears, hair, neck, "
                   "whole face, ...), grown and feathered, plus the colour parse map (CelebAMask-HQ colours).")
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("mask", "parse_map")
    FUNCTION = "regions"

    @classmethod
    def INPUT_TYPES(cls):
        from ..face_analysis.parsing.regions import REGION_NAMES

        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images the FACES were found in (same batch, same size)."}),
            "faces": ("FACES", {"tooltip": "From Analyze Faces: which faces to parse and where they are."}),
            "parser": ("FACE_PARSER", {"tooltip": "From Face Parser Loader."}),
            "region": (list(REGION_NAMES), {"default": "whole_face", "tooltip": "The region to mask. left/right "
                       "mean the image's left/right. whole_face = skin, brows, eyes, glasses, nose, mouth, lips; "
                       "head adds ears, hair and hat."}),
            "grow": int_input(0, -256, 256, "Pixels to grow the mask by (negative shrinks it), before feathering."),
            "feather": int_input(0, 0, 256, "Width in pixels of the soft (Gaussian) edge."),
        }, "optional": {
            "extra_regions": ("STRING", {"default": "", "tooltip": "More regions to add to the mask, comma separated "
                              "(e.g. 'hair, neck')."}),
            "face_index": int_input(-1, -1, 64, "-1 = every face in FACES; otherwise only that face of each image."),
            "crop_scale": float_input(2.2, 1.2, 4.0, 0.05, "Size of the square parsed around each face, in face "
                                      "boxes. 2.2 matches the framing BiSeNet was trained on (hair and neck "
                                      "included)."),
            "mask": ("MASK", {"tooltip": "Optional: only keep the regions inside this mask (same size as the image)."}),
        }}

    @shows_warnings
    def regions(self, image, faces, parser, region, grow, feather, extra_regions="", face_index=-1,
                crop_scale=2.2, mask=None):
        from ..face_analysis.parsing import FaceParser, face_regions
        from ..face_analysis.parsing.regions import parse_region_names

        check_images(image=image)
        check_masks(mask=mask)
        if not isinstance(parser, FaceParser):
            raise InvalidInputError("'parser' must come from the Face Parser Loader node.")
        names = parse_region_names(region, extra_regions or "")
        result = face_regions(parser, image, faces, names, grow=grow, feather=feather, face_index=face_index,
                              crop_scale=crop_scale, limit_mask=mask)
        for note in result.notes:
            logger.warning("Likeness Face Regions: %s", note)
        return (result.mask, result.parse_map)


NODE_CLASSES = [FaceParserLoader, FaceRegions]
