"""Pose nodes: the InstantID / Face-MakeUp 5-keypoint map, 68/106 landmark maps, head pose read-out."""
from __future__ import annotations

import logging

from ..errors import InvalidInputError
from ._common import category, int_input
from ._feedback import shows_warnings

logger = logging.getLogger("likeness")

CATEGORY = category("Face")


def _canvas_inputs() -> dict:
    from ..face_analysis.pose import RESCALE_MODES

    return {
        "size_from": ("IMAGE", {"tooltip": "Draw on a canvas of this image's size (e.g. the generation size); the "
                      "pose is rescaled from the analysed image. Its batch size sets the number of maps when FACES "
                      "hold one image."}),
        "width": int_input(0, 0, 16384, "Canvas width when no size_from image is given; 0 = analysed image size.", 8),
        "height": int_input(0, 0, 16384, "Canvas height when no size_from image is given; 0 = analysed image size.", 8),
        "resize_mode": (list(RESCALE_MODES), {"default": "fit", "tooltip": "How the pose maps onto a canvas of "
                        "another shape: fit (whole image, centred, aspect kept), stretch (each axis on its own), "
                        "cover (fills the canvas, centre crop)."}),
    }


def _check_faces(faces):
    from ..face_analysis.types import FaceAnalysis

    if not isinstance(faces, FaceAnalysis):
        raise InvalidInputError(f"'faces' must be FACES from the Analyze Faces node, got {type(faces).__name__}.")
    return faces


def _canvas(faces, size_from, width: int, height: int) -> tuple[tuple[int, int] | None, int | None]:
    """(target (height, width) or None, output batch or None) from the optional canvas inputs."""
    if size_from is not None:
        from ..face_analysis.images import check_image_tensor

        image = check_image_tensor(size_from, "size_from", pixels=False)   # only its size is used
        batch = int(image.shape[0]) if len(faces) == 1 else None
        return (int(image.shape[1]), int(image.shape[2])), batch
    if (width > 0) != (height > 0):
        raise InvalidInputError(f"set both width and height (or neither): got width {width}, height {height}.")
    return ((height, width) if width > 0 else None), None


class FaceKeypointMap:
    NODE_ID = "LikenessFaceKeypointMap"
    DISPLAY_NAME = "Face Keypoint Map"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Draws the 5-keypoint face pose map exactly as InstantID and Face-MakeUp do (black canvas, "
                   "coloured ellipse limbs to the nose at 60 %, radius-10 dots). Give size_from or width/height to "
                   "use the pose of one image for a generation of another size.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("kps_map",)
    FUNCTION = "draw"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "faces": ("FACES", {"tooltip": "From Analyze Faces: the faces whose keypoints give the pose."}),
            "face_index": int_input(-1, -1, 64, "-1 = draw every face in FACES (InstantID draws one: select the "
                                    "largest in Analyze Faces); otherwise only that face of each image."),
        }, "optional": _canvas_inputs()}

    @shows_warnings
    def draw(self, faces, face_index=-1, size_from=None, width=0, height=0, resize_mode="fit"):
        from ..face_analysis.pose import kps_maps

        _check_faces(faces)
        target, batch = _canvas(faces, size_from, width, height)
        result = kps_maps(faces, target_size=target, mode=resize_mode, face_index=face_index, batch=batch)
        for note in result.notes:
            logger.warning("Likeness Face Keypoint Map: %s", note)
        return (result.image,)


class FaceLandmarkMap:
    NODE_ID = "LikenessFaceLandmarkMap"
    DISPLAY_NAME = "Face Landmark Map"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Draws the 68- or 106-point face landmarks on black: coloured contour lines (jaw, brows, nose, "
                   "eyes, lips) with dots, or white dots only (the OpenPose face style). Needs an analyzer loaded "
                   "with a landmark model (dlib 68, insightface 2d106det).")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("landmark_map",)
    FUNCTION = "draw"

    @classmethod
    def INPUT_TYPES(cls):
        from ..face_analysis.pose import LANDMARK_STYLES

        return {"required": {
            "faces": ("FACES", {"tooltip": "From Analyze Faces, with 68/106-point landmarks."}),
            "style": (list(LANDMARK_STYLES), {"default": "lines", "tooltip": "lines: coloured contours + dots; "
                      "points: white dots only (OpenPose face)."}),
            "thickness": int_input(0, 0, 32, "Line width in pixels for the lines style; 0 = 1 px per 100 px of face."),
            "point_radius": int_input(3, 1, 32, "Dot radius for the points style."),
            "face_index": int_input(-1, -1, 64, "-1 = every face in FACES; otherwise only that face of each image."),
        }, "optional": _canvas_inputs()}

    @shows_warnings
    def draw(self, faces, style, thickness, point_radius, face_index=-1, size_from=None, width=0, height=0,
             resize_mode="fit"):
        from ..face_analysis.pose import landmark_maps

        _check_faces(faces)
        target, batch = _canvas(faces, size_from, width, height)
        result = landmark_maps(faces, target_size=target, mode=resize_mode, face_index=face_index, style=style,
                               thickness=thickness, point_radius=point_radius, batch=batch)
        for note in result.notes:
            logger.warning("Likeness Face Landmark Map: %s", note)
        return (result.image,)


class HeadPose:
    NODE_ID = "LikenessHeadPose"
    DISPLAY_NAME = "Head Pose"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Estimates head yaw, pitch and roll (degrees) of every face from its landmarks (68/106 points, "
                   "else the 5 keypoints) with a generic 3D head. yaw > 0 turns to the image right, pitch > 0 looks "
                   "up, roll > 0 tilts clockwise. Approximate (a few degrees); 5-keypoint pitch is the least sure.")
    RETURN_TYPES = ("STRING", "FLOAT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("readout", "yaw", "pitch", "roll")
    FUNCTION = "estimate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "faces": ("FACES", {"tooltip": "From Analyze Faces."}),
            "image_index": int_input(0, 0, 4096, "Image of the batch whose face gives the yaw/pitch/roll outputs."),
            "face_index": int_input(0, 0, 64, "Face (in FACES order) of that image for the yaw/pitch/roll outputs."),
        }}

    def estimate(self, faces, image_index=0, face_index=0):
        from ..errors import NoFaceError
        from ..face_analysis.pose import head_pose_readout

        _check_faces(faces)
        readout = head_pose_readout(faces)
        if not faces.all_faces():
            raise NoFaceError("FACES hold no face, so there is no head pose to read. Check Analyze Faces' preview.")
        if image_index >= len(readout.poses):
            raise InvalidInputError(f"image_index {image_index} is out of range: FACES hold {len(readout.poses)} images.")
        poses = readout.poses[image_index]
        if face_index >= len(poses):
            raise InvalidInputError(f"image {image_index} has {len(poses)} face(s); face_index {face_index} does not exist.")
        pose = poses[face_index]
        return (readout.text, float(pose.yaw), float(pose.pitch), float(pose.roll))


NODE_CLASSES = [FaceKeypointMap, FaceLandmarkMap, HeadPose]
