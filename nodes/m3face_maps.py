"""M3Face condition maps from photos: segmentation map, landmark map, and their calibration from samples."""
from __future__ import annotations

import logging

from ..errors import InvalidInputError, NoFaceError
from ..validation import check_images
from ._common import category, float_input, int_input
from ._feedback import shows_warnings

logger = logging.getLogger("likeness")

CATEGORY = category("M3Face")
_PHOTO_ADVICE = "Analyse the photo the sample belongs to with Analyze Faces and wire its FACES in."


def _framing_inputs() -> dict:
    from ..techniques.m3face.framing import FRAMINGS

    return {
        "size": int_input(512, 64, 2048, "Side of the square map; M3Face's ControlNets and Muse work at 512.", 8),
        "framing": (list(FRAMINGS), {"default": "face", "tooltip": "face: one map per face, a square of crop_scale "
                    "face boxes around it (M3CelebA-like portrait framing); image: one map per image, the whole "
                    "image letterboxed into the square."}),
        "crop_scale": float_input(2.2, 1.2, 6.0, 0.05, "Side of the face window in face boxes (face framing), also "
                                  "the parser's crop. 2.2 frames hair and neck like CelebA-HQ."),
        "face_index": int_input(-1, -1, 64, "-1 = every face in FACES; otherwise only that face of each image."),
    }


def _single_image(image, name: str):
    from ..face_analysis.parsing.parser import rgb_batch

    rgb, notes = rgb_batch(image)
    if rgb.shape[0] != 1:
        raise InvalidInputError(f"'{name}' holds {rgb.shape[0]} images; give exactly one (pick it with an image "
                                "batch selector first).")
    for note in notes:
        logger.warning("Likeness M3Face: %s: %s", name, note)
    return rgb[0]


def _check_faces(faces, name: str = "faces"):
    from ..face_analysis.types import FaceAnalysis

    if not isinstance(faces, FaceAnalysis):
        raise InvalidInputError(f"'{name}' must be FACES from the Analyze Faces node, got {type(faces).__name__}.")
    return faces


def _log_notes(node: str, notes: list[str]) -> None:
    for note in notes:
        logger.warning("Likeness %s: %s", node, note)


class M3FaceSegmentationMap:
    NODE_ID = "LikenessM3FaceSegmentationMap"
    DISPLAY_NAME = "M3Face Segmentation Map"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Parses each face with the pack's face parser and paints M3Face's 19 classes (mapped by name) "
                   "in a palette, on a square canvas: the segmentation condition for M3Face's ControlNet. Also "
                   "returns the photo in the same frame. The official palette could not be read: the shipped ones "
                   "are candidates; learn the real one with 'M3Face Palette from Mask'.")
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("segmentation_map", "face_crop", "palette_json")
    FUNCTION = "draw"

    @classmethod
    def INPUT_TYPES(cls):
        from ..techniques.m3face.palette import shipped_palette_names

        names = shipped_palette_names()
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The photos FACES were found in."}),
            "faces": ("FACES", {"tooltip": "From Analyze Faces."}),
            "parser": ("FACE_PARSER", {"tooltip": "From Face Parser Loader: BiSeNet weights give hair and clothes "
                       "too; the landmark fallback only the face parts."}),
            "palette": (names, {"default": names[0], "tooltip": "A palette shipped with the pack (class -> RGB). "
                        "Ignored where palette_json is given."}),
            **_framing_inputs(),
        }, "optional": {
            "palette_json": ("STRING", {"multiline": True, "default": "", "tooltip": "A palette as JSON (e.g. the "
                             "palette_json output of 'M3Face Palette from Mask'); classes it lacks keep the chosen "
                             "palette's colours."}),
        }}

    @shows_warnings
    def draw(self, image, faces, parser, palette, size, framing, crop_scale, face_index, palette_json=""):
        from ..techniques.m3face.palette import palette_to_json, parse_palette_json, shipped_palette
        from ..techniques.m3face.segmentation import segmentation_maps

        check_images(image=image)
        _check_faces(faces)
        chosen = shipped_palette(palette)
        notes = []
        if palette_json and palette_json.strip():
            chosen, notes = parse_palette_json(palette_json, "palette_json", base=chosen)
        result = segmentation_maps(parser, image, faces, chosen, size, framing, crop_scale, face_index)
        _log_notes("M3Face Segmentation Map", notes + result.notes)
        return (result.maps, result.crops, palette_to_json(chosen))


class M3FacePaletteFromMask:
    NODE_ID = "LikenessM3FacePaletteFromMask"
    DISPLAY_NAME = "M3Face Palette from Mask"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Learns M3Face's segmentation palette from one official mask (the repo's data/masks/*.png or an "
                   "M3CelebA mask) and the photo it belongs to: the photo is parsed, each class takes the colour "
                   "most of its (eroded) pixels have in the mask, snapped to the mask's dominant colours (robust to "
                   "JPEG). Reports colours no class took. Feed palette_json to 'M3Face Segmentation Map'.")
    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("palette_json", "report", "check")
    FUNCTION = "calibrate"

    @classmethod
    def INPUT_TYPES(cls):
        from ..techniques.m3face.palette import shipped_palette_names

        names = shipped_palette_names()
        return {"required": {
            "mask_image": ("IMAGE", {"tooltip": "One official colour mask (PNG or JPEG)."}),
            "photo": ("IMAGE", {"tooltip": "The photo the mask was made from (same framing; any size of the same "
                      "aspect ratio)."}),
            "faces": ("FACES", {"tooltip": "Analyze Faces run on that photo."}),
            "parser": ("FACE_PARSER", {"tooltip": "From Face Parser Loader (BiSeNet weights learn hair and clothes "
                       "too)."}),
            "base_palette": (names, {"default": names[0], "tooltip": "Colours for the classes the photo does not "
                             "show; its colours (and the other shipped palettes') are also snapping targets."}),
            "erode": int_input(2, 0, 16, "Pixels taken off each parsed class before voting, so edges and small "
                               "misalignments between parse and mask do not vote."),
            "colour_radius": float_input(24.0, 2.0, 96.0, 1.0, "RGB distance within which mask pixels count as one "
                                         "colour (JPEG noise); keep below half the distance of the closest two "
                                         "palette colours."),
            "snap": int_input(3, 0, 16, "A learnt colour within this many levels (per channel) of a known palette "
                              "colour becomes that colour (undoes JPEG's colour-conversion rounding). 0 = off."),
            "crop_scale": float_input(2.2, 1.2, 6.0, 0.05, "The parser's crop around each face, in face boxes."),
        }}

    @shows_warnings
    def calibrate(self, mask_image, photo, faces, parser, base_palette, erode, colour_radius, snap, crop_scale):
        import torch

        from ..techniques.m3face.calibrate import calibrate_palette, report_lines, warning_lines
        from ..techniques.m3face.palette import palette_to_json, render_label_map, shipped_palette_names
        from ..techniques.m3face.palette import shipped_palette as palette_named
        from ..techniques.m3face.segmentation import labels_at_size, parse_to_m3face

        check_images(mask_image=mask_image, photo=photo)
        _check_faces(faces)
        mask = _single_image(mask_image, "mask_image")
        picture = _single_image(photo, "photo")
        if not faces.all_faces():
            raise NoFaceError("'faces' hold no face of 'photo', so the photo cannot be parsed.", _PHOTO_ADVICE)
        labels, notes = parse_to_m3face(parser, picture[None], faces, crop_scale)
        labels = labels_at_size(labels[0], mask.shape[0], mask.shape[1], "photo", "mask_image")
        known = [c for name in shipped_palette_names() for c in palette_named(name).colours.values()]
        result = calibrate_palette(mask, labels.numpy(), palette_named(base_palette), known, erode, colour_radius, snap)
        _log_notes("M3Face Palette from Mask", notes + warning_lines(result))
        check = torch.from_numpy(render_label_map(labels, result.palette)[None]).float() / 255.0
        return (palette_to_json(result.palette), "\n".join(report_lines(result)), check)


class M3FaceLandmarkMap:
    NODE_ID = "LikenessM3FaceLandmarkMap"
    DISPLAY_NAME = "M3Face Landmark Map"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Draws each face's 68 landmarks (dlib 68, or insightface 106 mapped to 68) on a square canvas "
                   "in a style given as JSON (groups, lines or points, colours, thickness, canvas colour): the "
                   "landmark condition for M3Face's ControlNet. Also returns the photo in the same frame. The "
                   "official drawing style could not be read: learn it with 'M3Face Landmark Style from Sample'.")
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("landmark_map", "face_crop", "style_json")
    FUNCTION = "draw"

    @classmethod
    def INPUT_TYPES(cls):
        from ..techniques.m3face.landmarks import shipped_style_names

        names = shipped_style_names()
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The photos FACES were found in."}),
            "faces": ("FACES", {"tooltip": "From Analyze Faces with a landmark model (dlib 68 or insightface 106)."}),
            "style": (names, {"default": names[0], "tooltip": "A drawing style shipped with the pack. Ignored where "
                      "style_json is given."}),
            **_framing_inputs(),
        }, "optional": {
            "style_json": ("STRING", {"multiline": True, "default": "", "tooltip": "A drawing style as JSON (e.g. the "
                           "style_json output of 'M3Face Landmark Style from Sample')."}),
        }}

    @shows_warnings
    def draw(self, image, faces, style, size, framing, crop_scale, face_index, style_json=""):
        from ..techniques.m3face.landmarks import landmark_maps, parse_style_json, shipped_style, style_to_json

        check_images(image=image)
        _check_faces(faces)
        chosen = parse_style_json(style_json) if style_json and style_json.strip() else shipped_style(style)
        result = landmark_maps(image, faces, chosen, size, framing, crop_scale, face_index)
        _log_notes("M3Face Landmark Map", result.notes)
        return (result.maps, result.crops, style_to_json(chosen))


class M3FaceLandmarkStyleFromSample:
    NODE_ID = "LikenessM3FaceLandmarkStyleFromSample"
    DISPLAY_NAME = "M3Face Landmark Style from Sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Learns the landmark drawing style (canvas colour, each group's colour, line width) from one "
                   "official landmark drawing (the repo's data/landmarks/*.jpg or an M3CelebA landmark_image) and "
                   "the landmarks of the photo it was drawn from. Feed style_json to 'M3Face Landmark Map'.")
    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("style_json", "report", "check")
    FUNCTION = "calibrate"

    @classmethod
    def INPUT_TYPES(cls):
        from ..techniques.m3face.landmarks import shipped_style_names

        names = shipped_style_names()
        return {"required": {
            "sample_landmark_image": ("IMAGE", {"tooltip": "One official landmark drawing."}),
            "faces": ("FACES", {"tooltip": "Analyze Faces (with 68/106 landmarks) run on the photo the drawing was "
                      "made from; the drawing may have another size of the same aspect ratio."}),
            "base_style": (names, {"default": names[0], "tooltip": "Groups, drawing mode and the colours of groups "
                           "the sample does not show."}),
        }}

    @shows_warnings
    def calibrate(self, sample_landmark_image, faces, base_style):
        import torch

        from ..face_analysis.pose import rescale_points
        from ..techniques.m3face.landmarks import calibrate_style, draw_landmarks, shipped_style, style_to_json

        check_images(sample_landmark_image=sample_landmark_image)
        _check_faces(faces)
        sample = _single_image(sample_landmark_image, "sample_landmark_image")
        height, width = sample.shape[:2]
        if len(faces) != 1 or not faces.all_faces():
            raise NoFaceError("'faces' must describe the one photo the sample was drawn from, with a face in it.",
                              _PHOTO_ADVICE)
        source_h, source_w = faces.image_sizes[0]
        if abs(source_w / source_h - width / height) > 0.02 * (width / height):
            raise InvalidInputError(f"the sample is {width}x{height} but FACES come from a {source_w}x{source_h} "
                                    "photo (another aspect ratio); analyse the photo the sample was drawn from.")
        missing = [f for f in faces.faces[0] if f.landmarks is None]
        if missing:
            raise InvalidInputError("'faces' have no 68/106-point landmarks: load the analyzer with a landmark model.")
        points = [rescale_points(f.landmarks, (source_h, source_w), (height, width), "stretch") for f in faces.faces[0]]
        result = calibrate_style(sample, points, shipped_style(base_style))
        _log_notes("M3Face Landmark Style from Sample", result.warnings)
        check = draw_landmarks(points, height, width, result.style)
        return (style_to_json(result.style), "\n".join(result.report), torch.from_numpy(check[None]).float() / 255.0)


NODE_CLASSES = [M3FaceSegmentationMap, M3FacePaletteFromMask, M3FaceLandmarkMap, M3FaceLandmarkStyleFromSample]
