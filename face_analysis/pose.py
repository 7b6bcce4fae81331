"""Head pose and pose maps: yaw/pitch/roll from landmarks, the InstantID 5-keypoint map, 68/106 maps.

**5-keypoint map** (:func:`draw_kps_map`): drawn exactly the way InstantID's ``draw_kps`` draws it
(Face-MakeUp reuses that function): a black canvas of the image size; for the limbs (0,2), (1,2),
(3,2), (4,2) an ellipse centred at the truncated mean of the two points, half-axes
(int(length / 2), 4), rotated by the truncated angle in degrees, as the ``cv2.ellipse2Poly`` polygon
(1 degree steps) filled with ``cv2.fillConvexPoly`` in the colour of the limb's first keypoint on a
float canvas; the limb canvas times 0.6, truncated to uint8; then a filled ``cv2.circle`` of radius
10 at every truncated keypoint, colours in keypoint order (255,0,0), (0,255,0), (0,0,255),
(255,255,0), (255,0,255) (RGB). Arithmetic follows the keypoint dtype (insightface gives float32).
Several faces: every limb of every face first, then the 0.6 scaling, then every circle (one face
gives exactly the InstantID picture).

**Landmark maps** (:func:`draw_landmark_map`), on black:

- style ``lines``: the 68 iBUG groups as 1-pixel-per-100-px-of-face polylines (jaw, brows, nose
  bridge, nostrils open; eyes and lips closed) in fixed colours (:data:`LANDMARK_GROUP_COLOURS`) plus
  every point as a small dot; 106-point landmarks are drawn through their 68-point equivalents
  (the usual 106->68 index map) and all 106 points as dots;
- style ``points``: every landmark as a filled white disc (radius 3 by default), the OpenPose face
  convention that ControlNet openpose-face models were trained on.

**Head pose** (:func:`estimate_head_pose`): ``cv2.solvePnP`` (SQPnP), then a weighted
Levenberg-Marquardt refinement, of a generic adult head (millimetres, approximate anthropometric averages,
:data:`GENERIC_HEAD_68` / :data:`GENERIC_HEAD_5`) against the image points, pinhole camera with focal
length = the image's long side and the principal point at the image centre, no distortion.
68/106 landmarks use 17 stable points (brows, eye corners, nose, mouth, chin; not the jaw contour,
which slides with the view); otherwise the 5 keypoints. The image-y of the mouth and chin points
counts a quarter (:data:`EXPRESSION_Y_WEIGHT`): smiles and open mouths move them, and at full weight
a smile reads as a strong downward pitch. Angles in degrees:

- yaw > 0: the face turns towards the image's right (the subject's left);
- pitch > 0: the face looks up;
- roll > 0: the head tilts clockwise in the image (the image-right eye lower).

The generic model makes the angles approximate (a few degrees): good for sorting, gating and
read-outs, not for measurement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..deps import require
from ..errors import InvalidInputError
from .types import Face, FaceAnalysis

KPS_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
KPS_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
KPS_STICK_WIDTH = 4
KPS_LIMB_SCALE = 0.6
KPS_CIRCLE_RADIUS = 10
RESCALE_MODES = ("fit", "stretch", "cover")

# 106-point (insightface 2d106det) index of each 68-point iBUG landmark.
LANDMARKS_106_TO_68 = (
    1, 10, 12, 14, 16, 3, 5, 7, 0, 23, 21, 19, 32, 30, 28, 26, 17,
    43, 48, 49, 51, 50, 102, 103, 104, 105, 101,
    72, 73, 74, 86, 78, 79, 80, 85, 84,
    35, 41, 42, 39, 37, 36, 89, 95, 96, 93, 91, 90,
    52, 64, 63, 71, 67, 68, 61, 58, 59, 53, 56, 55,
    65, 66, 62, 70, 69, 57, 60, 54,
)

# (name, first index, last index, closed, RGB colour) of the 68-point groups drawn by the "lines" style.
LANDMARK_GROUPS = (
    ("jaw", 0, 16, False, (255, 255, 255)),
    ("left_brow", 17, 21, False, (255, 128, 0)),
    ("right_brow", 22, 26, False, (255, 200, 0)),
    ("nose_bridge", 27, 30, False, (0, 255, 255)),
    ("nostrils", 31, 35, False, (0, 160, 255)),
    ("left_eye", 36, 41, True, (0, 255, 0)),
    ("right_eye", 42, 47, True, (128, 255, 0)),
    ("outer_lips", 48, 59, True, (255, 0, 128)),
    ("inner_lips", 60, 67, True, (255, 0, 255)),
)
LANDMARK_GROUP_COLOURS = {name: colour for name, _, _, _, colour in LANDMARK_GROUPS}
LANDMARK_STYLES = ("lines", "points")

# Generic head, millimetres, model frame = camera frame of a frontal face: x to the image right, y down,
# z away from the camera; origin at the nose tip. x/y of the eyes, nose and mouth follow the ArcFace
# 5-point template (the average aligned frontal face) scaled to 62 mm between the eye centres; the rest
# and all depths are rounded adult anthropometric averages.
GENERIC_HEAD_5 = np.array([
    (-31.0, -35.5, 34.0),   # image-left eye centre
    (31.0, -35.5, 34.0),    # image-right eye centre
    (0.0, 0.0, 0.0),        # nose tip
    (-25.7, 36.0, 30.0),    # image-left mouth corner
    (25.7, 36.0, 30.0),     # image-right mouth corner
])
GENERIC_HEAD_68 = {
    17: (-52.0, -52.0, 45.0), 21: (-13.0, -56.0, 28.0), 22: (13.0, -56.0, 28.0), 26: (52.0, -52.0, 45.0),
    36: (-45.0, -36.5, 46.0), 39: (-17.0, -35.0, 32.0), 42: (17.0, -35.0, 32.0), 45: (45.0, -36.5, 46.0),
    27: (0.0, -37.0, 20.0), 30: (0.0, 0.0, 0.0), 31: (-14.0, 6.0, 15.0), 33: (0.0, 10.0, 12.0),
    35: (14.0, 6.0, 15.0), 48: (-25.7, 36.0, 30.0), 51: (0.0, 25.0, 14.0), 54: (25.7, 36.0, 30.0),
    8: (0.0, 76.0, 26.0),
}


# ---------------------------------------------------------------------------------- keypoint map

def _check_points(points, count: int | None, what: str) -> np.ndarray:
    array = np.asarray(points)
    if not np.issubdtype(array.dtype, np.number):
        raise InvalidInputError(f"{what} must be numbers, got dtype {array.dtype}.")
    if array.ndim != 2 or array.shape[1] < 2 or (count is not None and array.shape[0] != count):
        want = f"[{count}, 2]" if count is not None else "[N, 2]"
        raise InvalidInputError(f"{what} must have shape {want}, got {list(array.shape)}.")
    if not np.all(np.isfinite(array[:, :2])):
        raise InvalidInputError(f"{what} contain NaN or infinite values.")
    if np.abs(array[:, :2]).max(initial=0) > 1e6:
        raise InvalidInputError(f"{what} lie more than a million pixels away; they are not image coordinates.")
    return array[:, :2]


def _check_canvas(width: int, height: int) -> tuple[int, int]:
    width, height = int(width), int(height)
    if not (1 <= width <= 16384 and 1 <= height <= 16384):
        raise InvalidInputError(f"a pose map must be 1..16384 pixels per side, got {width}x{height}.")
    return width, height


def draw_kps_map(kps_per_face, width: int, height: int) -> np.ndarray:
    """uint8 RGB ``[H,W,3]`` 5-keypoint map of one face (``[5,2]``) or several (a list of ``[5,2]``)."""
    cv2 = require("cv2", "The keypoint map")
    width, height = _check_canvas(width, height)
    faces = [kps_per_face] if np.asarray(kps_per_face).ndim == 2 else list(kps_per_face)
    faces = [_check_points(k, 5, "keypoints") for k in faces]

    limb_layer = np.zeros((height, width, 3))  # float64, like the reference
    for kps in faces:
        for first, second in KPS_LIMBS:
            xs, ys = kps[[first, second], 0], kps[[first, second], 1]
            length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            centre = (int(np.mean(xs)), int(np.mean(ys)))
            polygon = cv2.ellipse2Poly(centre, (int(length / 2), KPS_STICK_WIDTH), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(limb_layer, polygon, KPS_COLOURS[first])
    canvas = (limb_layer * KPS_LIMB_SCALE).astype(np.uint8)
    for kps in faces:
        for index, (x, y) in enumerate(kps):
            cv2.circle(canvas, (int(x), int(y)), KPS_CIRCLE_RADIUS, KPS_COLOURS[index], -1)
    return canvas


def rescale_points(points, source_size: tuple[int, int], target_size: tuple[int, int], mode: str = "fit") -> np.ndarray:
    """Map pixel coordinates from a ``(height, width)`` image onto another canvas size.

    ``stretch`` scales each axis on its own; ``fit`` keeps the aspect ratio and centres the whole
    source inside the target (letterbox); ``cover`` keeps the aspect ratio and fills the target
    (centre crop). The result keeps the input's dtype.
    """
    array = np.asarray(points)
    src_h, src_w = (float(v) for v in source_size)
    dst_h, dst_w = (float(v) for v in target_size)
    if min(src_h, src_w, dst_h, dst_w) <= 0:
        raise InvalidInputError(f"image sizes must be positive, got {source_size} -> {target_size}.")
    if mode == "stretch":
        scale = np.array([dst_w / src_w, dst_h / src_h])
        offset = np.zeros(2)
    elif mode in ("fit", "cover"):
        pick = min if mode == "fit" else max
        s = pick(dst_w / src_w, dst_h / src_h)
        scale = np.array([s, s])
        offset = np.array([(dst_w - src_w * s) / 2.0, (dst_h - src_h * s) / 2.0])
    else:
        raise InvalidInputError(f"unknown rescale mode '{mode}'; use one of {', '.join(RESCALE_MODES)}.")
    out = array.astype(np.float64).copy()
    out[..., :2] = out[..., :2] * scale + offset
    return out.astype(array.dtype if np.issubdtype(array.dtype, np.floating) else np.float64)


def _select(faces: list[Face], face_index: int) -> list[Face]:
    if face_index < 0:
        return list(faces)
    return [faces[face_index]] if face_index < len(faces) else []


def _canvas_sizes(analysis: FaceAnalysis, target_size: tuple[int, int] | None, count: int,
                  plan: list[int]) -> list[tuple[int, int]]:
    if target_size is not None:
        height, width = (int(v) for v in target_size)
        _check_canvas(width, height)
        return [(height, width)] * count
    sizes = {tuple(int(v) for v in analysis.image_sizes[i]) for i in plan}
    if len(sizes) > 1:
        raise InvalidInputError(
            f"the analysed images have different sizes {sorted(sizes)}; set a target width and height so the "
            "maps form one IMAGE batch.")
    return [next(iter(sizes))] * count


def _batch_plan(analysis: FaceAnalysis, batch: int | None) -> list[int]:
    """Index of the analysed image behind each output image (a single analysis is repeated)."""
    if not isinstance(analysis, FaceAnalysis):
        raise InvalidInputError(f"'faces' must be FACES from the Analyze node, got {type(analysis).__name__}.")
    if len(analysis) == 0:
        raise InvalidInputError("FACES is empty (no image was analysed).")
    count = batch or len(analysis)
    if len(analysis) not in (1, count):
        raise InvalidInputError(f"FACES describe {len(analysis)} images but {count} maps were asked for.")
    return [i if len(analysis) == count else 0 for i in range(count)]


@dataclass
class MapResult:
    image: torch.Tensor   # IMAGE [B,H,W,3] float 0..1
    notes: list[str]


def _skip_empty(analysis: FaceAnalysis, plan: list[int], face_index: int) -> tuple[list[int], list[str]]:
    """Drop images without a selected face when the analysis was made with ``on_no_face='skip'``."""
    if getattr(analysis, "on_no_face", "pass_through") != "skip":
        return plan, []
    kept = [i for i in plan if _select(analysis.faces[i], face_index)]
    if not kept:
        from ..errors import NoFaceError
        raise NoFaceError("no analysed image has a face to draw (Analyze Faces ran with on_no_face 'skip', so every "
                          "image was left out).", "Check Analyze Faces' preview, or set its on_no_face to "
                          "'pass_through' to get black maps.")
    dropped = sorted(set(plan) - set(kept))
    return kept, ([f"images {dropped} have no face and were left out (Analyze Faces' on_no_face is skip)."]
                  if dropped else [])


def kps_maps(analysis: FaceAnalysis, target_size: tuple[int, int] | None = None, mode: str = "fit",
             face_index: int = -1, batch: int | None = None) -> MapResult:
    """5-keypoint maps of every analysed image, optionally drawn on another canvas size.

    ``target_size`` = ``(height, width)``: the keypoints are rescaled from their image to that canvas
    (``mode``: fit / stretch / cover), which is how a pose taken from one image drives a generation of
    another size. ``batch`` repeats a single analysis that many times. Images without a face give a
    black map, or are left out when the analysis was made with ``on_no_face='skip'``.
    """
    plan, notes = _skip_empty(analysis, _batch_plan(analysis, batch), face_index)
    sizes = _canvas_sizes(analysis, target_size, len(plan), plan)
    maps = []
    for out_index, source in enumerate(plan):
        height, width = sizes[out_index]
        faces = _select(analysis.faces[source], face_index)
        if not faces:
            notes.append(f"image {source}: no face, the keypoint map is black.")
        kps = [rescale_points(f.kps, analysis.image_sizes[source], (height, width), mode) for f in faces]
        maps.append(draw_kps_map(kps, width, height) if kps else np.zeros((height, width, 3), np.uint8))
    return MapResult(_to_image(maps), notes)


def _to_image(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)


# ---------------------------------------------------------------------------------- landmark map

def to_68_points(landmarks, kind: str | None = None) -> np.ndarray:
    """Dense landmarks in the 68-point iBUG order (68 as is, 106 through :data:`LANDMARKS_106_TO_68`)."""
    points = _check_points(landmarks, None, "landmarks").astype(np.float64)
    if len(points) == 68:
        return points
    if len(points) == 106:
        return points[list(LANDMARKS_106_TO_68)]
    raise InvalidInputError(f"landmarks of kind '{kind or len(points)}' ({len(points)} points) cannot be drawn; "
                            "68-point (dlib) and 106-point (insightface 2d106det) landmarks are supported.")


def _auto_thickness(points: np.ndarray) -> int:
    span = float(np.max(points.max(axis=0) - points.min(axis=0)))
    return max(1, int(round(span / 100.0)))


def draw_landmark_map(landmark_sets, width: int, height: int, style: str = "lines", thickness: int = 0,
                      point_radius: int = 3) -> np.ndarray:
    """uint8 RGB ``[H,W,3]`` landmark map of one or several faces (each ``[68,2]`` or ``[106,2]``).

    ``thickness`` 0 picks 1 px per 100 px of face size; ``point_radius`` is the dot radius of the
    ``points`` style (3 = OpenPose face).
    """
    cv2 = require("cv2", "The landmark map")
    width, height = _check_canvas(width, height)
    if style not in LANDMARK_STYLES:
        raise InvalidInputError(f"unknown landmark map style '{style}'; use one of {', '.join(LANDMARK_STYLES)}.")
    sets = [landmark_sets] if np.asarray(landmark_sets).ndim == 2 else list(landmark_sets)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for landmarks in sets:
        points = _check_points(landmarks, None, "landmarks").astype(np.float64)
        if style == "points":
            for x, y in np.round(points).astype(np.int64):
                cv2.circle(canvas, (int(x), int(y)), int(point_radius), (255, 255, 255), -1)
            continue
        ibug = to_68_points(points)
        line = int(thickness) if thickness > 0 else _auto_thickness(ibug)
        rounded = np.round(ibug).astype(np.int32)
        for _, first, last, closed, colour in LANDMARK_GROUPS:
            cv2.polylines(canvas, [rounded[first:last + 1]], closed, colour, line, cv2.LINE_8)
        dot = max(1, line)
        for x, y in np.round(points).astype(np.int64):
            cv2.circle(canvas, (int(x), int(y)), dot, (255, 255, 255), -1)
    return canvas


def landmark_maps(analysis: FaceAnalysis, target_size: tuple[int, int] | None = None, mode: str = "fit",
                  face_index: int = -1, style: str = "lines", thickness: int = 0, point_radius: int = 3,
                  batch: int | None = None) -> MapResult:
    """68/106-landmark maps of every analysed image (same canvas rules as :func:`kps_maps`)."""
    plan, notes = _skip_empty(analysis, _batch_plan(analysis, batch), face_index)
    sizes = _canvas_sizes(analysis, target_size, len(plan), plan)
    maps = []
    for out_index, source in enumerate(plan):
        height, width = sizes[out_index]
        faces = _select(analysis.faces[source], face_index)
        missing = [i for i, f in enumerate(faces) if f.landmarks is None or len(f.landmarks) not in (68, 106)]
        if missing:
            raise InvalidInputError(
                f"image {source}: face {missing[0]} has no 68/106-point landmarks. Load the analyzer with a landmark "
                "model (dlib 68-point, or insightface with landmark_2d_106) and analyse again.")
        if not faces:
            notes.append(f"image {source}: no face, the landmark map is black.")
        sets = [rescale_points(f.landmarks, analysis.image_sizes[source], (height, width), mode) for f in faces]
        maps.append(draw_landmark_map(sets, width, height, style, thickness, point_radius) if sets
                    else np.zeros((height, width, 3), np.uint8))
    return MapResult(_to_image(maps), notes)


# ------------------------------------------------------------------------------------- head pose

@dataclass
class HeadPose:
    yaw: float                 # degrees, > 0 turned towards the image right
    pitch: float               # degrees, > 0 looking up
    roll: float                # degrees, > 0 tilted clockwise in the image
    source: str                # "68 landmarks", "106 landmarks" or "5 keypoints"
    reprojection_error: float  # RMS pixels of the generic model against the points

    def as_text(self) -> str:
        return (f"yaw {self.yaw:+.1f}°, pitch {self.pitch:+.1f}°, roll {self.roll:+.1f}° "
                f"({self.source}, fit error {self.reprojection_error:.1f} px)")


def camera_matrix(height: int, width: int) -> np.ndarray:
    """Pinhole intrinsics used for the pose: focal length = long side, principal point = centre."""
    focal = float(max(height, width))
    return np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])


def euler_from_rotation(rotation: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees, in this module's conventions, of a model-to-camera rotation.

    The rotation is factored as R = Ry(a) @ Rx(b) @ Rz(c) (camera axes: x right, y down, z forward);
    yaw = -a, pitch = -b, roll = c.
    """
    r = np.asarray(rotation, dtype=np.float64)
    b = math.asin(max(-1.0, min(1.0, -r[1, 2])))
    a = math.atan2(r[0, 2], r[2, 2])
    ca, sa, cb, sb = math.cos(a), math.sin(a), math.cos(b), math.sin(b)
    ry = np.array([[ca, 0, sa], [0, 1, 0], [-sa, 0, ca]])
    rx = np.array([[1, 0, 0], [0, cb, -sb], [0, sb, cb]])
    rz = (ry @ rx).T @ r
    c = math.atan2(rz[1, 0], rz[0, 0])
    return -math.degrees(a), -math.degrees(b), math.degrees(c)


def rotation_from_euler(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Inverse of :func:`euler_from_rotation` (for tests and synthetic faces)."""
    a, b, c = math.radians(-yaw), math.radians(-pitch), math.radians(roll)
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return ry @ rx @ rz


# Image-y of the mouth and chin points moves with expression (smiles, open mouths) far more than the
# head does; fitted at full weight it turns a smile into a large downward pitch. Their y residuals
# count at this weight (their x still pins yaw and roll).
EXPRESSION_Y_WEIGHT = 0.25
_EXPRESSION_POINTS_68 = (8, 48, 51, 54)
_EXPRESSION_POINTS_5 = (3, 4)


def pose_correspondences(face: Face) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(model points [N,3], image points [N,2], residual weights [N,2], source name) for a face's pose."""
    if face.landmarks is not None and len(face.landmarks) in (68, 106):
        ibug = to_68_points(face.landmarks, face.landmark_kind)
        indices = sorted(GENERIC_HEAD_68)
        model = np.array([GENERIC_HEAD_68[i] for i in indices])
        weights = np.ones((len(indices), 2))
        weights[[indices.index(i) for i in _EXPRESSION_POINTS_68], 1] = EXPRESSION_Y_WEIGHT
        return model, ibug[indices], weights, f"{len(face.landmarks)} landmarks"
    kps = _check_points(face.kps, 5, "keypoints").astype(np.float64)
    weights = np.ones((5, 2))
    weights[list(_EXPRESSION_POINTS_5), 1] = EXPRESSION_Y_WEIGHT
    return GENERIC_HEAD_5.copy(), kps, weights, "5 keypoints"


def _refine_weighted(cv2, model, points, weights, k, rvec, tvec, iterations: int = 50):
    """Levenberg-Marquardt on weighted reprojection residuals (OpenCV's own refiner has no weights)."""
    params = np.concatenate([np.asarray(rvec, np.float64).ravel(), np.asarray(tvec, np.float64).ravel()])
    w = weights.reshape(-1)

    def residuals(p):
        projected, jacobian = cv2.projectPoints(model, p[:3], p[3:], k, None)
        return (projected.reshape(-1) - points.reshape(-1)) * w, jacobian[:, :6] * w[:, None]

    damping = 1e-3
    r, j = residuals(params)
    cost = float(r @ r)
    for _ in range(iterations):
        normal = j.T @ j
        step = np.linalg.solve(normal + damping * np.diag(np.diag(normal) + 1e-9), -j.T @ r)
        trial = params + step
        r_new, j_new = residuals(trial)
        cost_new = float(r_new @ r_new)
        if cost_new < cost:
            converged = cost - cost_new < 1e-10 * max(cost, 1.0)
            params, r, j, cost, damping = trial, r_new, j_new, cost_new, max(damping / 10.0, 1e-9)
            if converged:
                break
        else:
            damping *= 10.0
            if damping > 1e8:
                break
    return params[:3].reshape(3, 1), params[3:].reshape(3, 1)


def estimate_head_pose(face: Face, image_size: tuple[int, int] | None = None) -> HeadPose:
    """Yaw, pitch and roll of one face (see the module doc for the model and the conventions).

    ``image_size`` = ``(height, width)`` of the analysed image; without it the camera is centred on
    the face with a focal length of four face-box widths.
    """
    cv2 = require("cv2", "Head pose estimation")
    model, points, weights, source = pose_correspondences(face)
    if image_size is not None:
        k = camera_matrix(*image_size)
    else:
        box = np.asarray(face.bbox, dtype=np.float64)
        focal = 4.0 * max(box[2] - box[0], box[3] - box[1], 1.0)
        centre = points.mean(axis=0)
        k = np.array([[focal, 0.0, centre[0]], [0.0, focal, centre[1]], [0.0, 0.0, 1.0]])
    if float(np.ptp(points[:, 0])) < 1e-3 and float(np.ptp(points[:, 1])) < 1e-3:
        raise InvalidInputError("the face's landmarks all coincide; its pose cannot be estimated.")
    ok, rvec, tvec = cv2.solvePnP(model, points, k, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        ok, rvec, tvec = cv2.solvePnP(model, points, k, None, flags=cv2.SOLVEPNP_EPNP)
    if not ok:
        raise InvalidInputError(f"head pose could not be solved from the {source}.")
    rvec, tvec = _refine_weighted(cv2, model, points, weights, k, rvec, tvec)
    projected, _ = cv2.projectPoints(model, rvec, tvec, k, None)
    error = float(np.sqrt(np.mean(np.sum((projected.reshape(-1, 2) - points) ** 2, axis=1))))
    rotation, _ = cv2.Rodrigues(rvec)
    yaw, pitch, roll = euler_from_rotation(rotation)
    return HeadPose(yaw, pitch, roll, source, error)


@dataclass
class PoseReadout:
    text: str
    poses: list[list[HeadPose]]   # per image, per selected face


def head_pose_readout(analysis: FaceAnalysis, face_index: int = -1) -> PoseReadout:
    """Poses of the selected faces of every image and a one-line-per-face text."""
    _batch_plan(analysis, None)
    lines, poses = [], []
    for image_index, faces in enumerate(analysis.faces):
        selected = _select(faces, face_index)
        image_poses = [estimate_head_pose(f, analysis.image_sizes[image_index]) for f in selected]
        poses.append(image_poses)
        if not image_poses:
            lines.append(f"image {image_index}: no face")
        offset = face_index if face_index >= 0 else 0
        for n, pose in enumerate(image_poses):
            lines.append(f"image {image_index} face {offset + n}: {pose.as_text()}")
    return PoseReadout("\n".join(lines), poses)
