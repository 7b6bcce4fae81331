"""Face-parsing label maps drawn from landmarks, for when no BiSeNet weights are available.

The result uses the BiSeNet label space (:mod:`.regions`), so every region name works the same way.
What the landmarks can and cannot give:

- 68-point (dlib / iBUG order) or 106-point (insightface ``2d106det``, converted to the 68 order with
  the usual index map): skin (jaw line plus a forehead raised from the brows by a third of the
  brow-to-chin height), brows (thickened brow lines), eyes (eye-opening polygons), nose (bridge,
  tip and nostril wings), upper lip, lower lip and inner mouth (lip polygons); approximate ears
  (ellipses beside the upper jaw, skipped on the side the head turns away from) and neck (a band
  below the jaw).
- 5 keypoints + box: the same parts as ellipses and polygons sized from the eye distance and the
  mouth width, the skin as an ellipse fitted to the box extended upwards for the forehead.
- Never: hair, hat, eyeglasses, earrings, necklace, cloth (those stay background).

Later parts are painted over earlier ones: neck, ears, skin, nose, brows, eyes, lips, inner mouth.
"""
from __future__ import annotations

import math

import numpy as np

from ...deps import require
from ...errors import InvalidInputError
from ..pose import to_68_points
from ..types import Face
from .regions import LABEL


def _frame(left_eye: np.ndarray, right_eye: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit vectors along the eye line (towards the image-right eye) and up the face, and the eye distance."""
    delta = right_eye - left_eye
    distance = float(np.hypot(*delta))
    if not math.isfinite(distance) or distance < 1e-6:
        raise InvalidInputError("the two eye points coincide (or are not finite): cannot place face regions.")
    right = delta / distance
    up = np.array([right[1], -right[0]])  # image y points down, so "up" is the eye line turned by -90 degrees
    return right, up, distance


def _fill(cv2, canvas: np.ndarray, points, label: int, convex_hull: bool = False) -> None:
    polygon = np.asarray(points, dtype=np.float64)
    if not np.all(np.isfinite(polygon)):
        return
    polygon = np.round(polygon).astype(np.int32).reshape(-1, 2)
    if convex_hull:
        polygon = cv2.convexHull(polygon).reshape(-1, 2)
    cv2.fillPoly(canvas, [polygon], int(label))


def _ellipse(cv2, canvas: np.ndarray, centre, half_axes, angle_deg: float, label: int,
             start: float = 0.0, end: float = 360.0) -> None:
    centre = tuple(int(round(float(c))) for c in centre)
    axes = tuple(max(1, int(round(float(a)))) for a in half_axes)
    cv2.ellipse(canvas, centre, axes, float(angle_deg), float(start), float(end), int(label), thickness=-1)


def _thick_line_polygon(points: np.ndarray, up: np.ndarray, thickness: float) -> np.ndarray:
    """The band of ``thickness`` around a polyline, as one polygon (upper edge then lower edge back)."""
    upper = points + up * thickness * 0.6
    lower = points - up * thickness * 0.4
    return np.concatenate([upper, lower[::-1]])


def labels_from_68(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 label map ``[H,W]`` of one face from its 68 iBUG landmarks (image pixels)."""
    cv2 = require("cv2", "The landmark face parser")
    p = np.asarray(points, dtype=np.float64)
    if p.shape != (68, 2) or not np.all(np.isfinite(p)):
        raise InvalidInputError(f"68 finite landmarks expected, got shape {list(p.shape)}.")
    canvas = np.zeros((height, width), dtype=np.uint8)
    left_eye, right_eye = p[36:42].mean(axis=0), p[42:48].mean(axis=0)
    right, up, eye_distance = _frame(left_eye, right_eye)
    jaw, brows = p[0:17], p[17:27]
    chin_to_brow = float(np.dot(brows.mean(axis=0) - p[8], up))
    face_height = max(chin_to_brow, eye_distance)
    face_width = float(np.hypot(*(p[16] - p[0])))
    angle = math.degrees(math.atan2(right[1], right[0]))

    # Neck: a band hanging below the lower jaw.
    lower_jaw = jaw[4:13]
    _fill(cv2, canvas, np.concatenate([lower_jaw, (lower_jaw - up * 0.45 * face_height)[::-1]]), LABEL["neck"])

    # Ears beside the upper jaw; a side is skipped when the head turns away from it (nose near that edge).
    nose_tip = p[30]
    ear_height = float(np.hypot(*(p[0] - p[3]))) * 1.3
    for side, jaw_index, label in ((-1, 1, LABEL["l_ear"]), (1, 15, LABEL["r_ear"])):
        visible_width = abs(float(np.dot(jaw[jaw_index] - nose_tip, right)))
        if visible_width > 0.25 * face_width:
            centre = jaw[jaw_index] + right * side * 0.06 * face_width + up * 0.1 * ear_height
            _ellipse(cv2, canvas, centre, (0.17 * ear_height, 0.5 * ear_height), angle, label)

    # Skin: jaw plus a forehead raised from the brows (about a third of the brow-to-chin height).
    forehead = brows + up * 0.32 * face_height
    _fill(cv2, canvas, np.concatenate([jaw, brows, forehead]), LABEL["skin"], convex_hull=True)

    # Nose: bridge top, tip and the nostril wings (a bit wider than the outer nostril points).
    wing = (p[35] - p[31]) * 0.18
    nose = np.concatenate([
        [p[27] - right * 0.1 * eye_distance, p[27] + right * 0.1 * eye_distance],
        p[28:31], p[31:36],
        [p[31] - wing, p[35] + wing, p[31] - wing + up * 0.2 * eye_distance, p[35] + wing + up * 0.2 * eye_distance],
    ])
    _fill(cv2, canvas, nose, LABEL["nose"], convex_hull=True)

    # Brows: the landmark line, thickened.
    brow_thickness = 0.16 * eye_distance
    _fill(cv2, canvas, _thick_line_polygon(p[17:22], up, brow_thickness), LABEL["l_brow"])
    _fill(cv2, canvas, _thick_line_polygon(p[22:27], up, brow_thickness), LABEL["r_brow"])

    _fill(cv2, canvas, p[36:42], LABEL["l_eye"])
    _fill(cv2, canvas, p[42:48], LABEL["r_eye"])

    # Lips: outer contour 48-59, inner contour 60-67; upper lip between the upper halves of both.
    _fill(cv2, canvas, np.concatenate([p[48:55], p[60:65][::-1]]), LABEL["u_lip"])
    _fill(cv2, canvas, np.concatenate([p[54:60], p[48:49], p[60:61], p[64:68][::-1]]), LABEL["l_lip"])
    _fill(cv2, canvas, p[60:68], LABEL["mouth"])
    return canvas


def labels_from_kps(kps: np.ndarray, bbox: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 label map ``[H,W]`` of one face from its 5 keypoints and box (coarse shapes)."""
    cv2 = require("cv2", "The landmark face parser")
    k = np.asarray(kps, dtype=np.float64).reshape(-1, 2)
    box = np.asarray(bbox, dtype=np.float64).reshape(-1)
    if k.shape != (5, 2) or box.shape != (4,) or not (np.all(np.isfinite(k)) and np.all(np.isfinite(box))):
        raise InvalidInputError("5 finite keypoints and a 4-number box are needed for landmark parsing.")
    canvas = np.zeros((height, width), dtype=np.uint8)
    left_eye, right_eye, nose_tip, left_mouth, right_mouth = k
    right, up, eye_distance = _frame(left_eye, right_eye)
    angle = math.degrees(math.atan2(right[1], right[0]))
    box_w, box_h = max(box[2] - box[0], 1.0), max(box[3] - box[1], 1.0)
    eye_mid = (left_eye + right_eye) / 2
    mouth_mid = (left_mouth + right_mouth) / 2
    mouth_width = max(float(np.hypot(*(right_mouth - left_mouth))), 0.3 * eye_distance)

    # Neck below the box, ears at the box sides (eye-to-nose height), skin from the box.
    bottom_centre = np.array([(box[0] + box[2]) / 2, box[3]])
    neck = [bottom_centre - right * 0.3 * box_w, bottom_centre + right * 0.3 * box_w,
            bottom_centre + right * 0.3 * box_w - up * 0.5 * box_h, bottom_centre - right * 0.3 * box_w - up * 0.5 * box_h]
    _fill(cv2, canvas, neck, LABEL["neck"])
    ear_level = (eye_mid + nose_tip) / 2
    for side, label in ((-1, LABEL["l_ear"]), (1, LABEL["r_ear"])):
        visible_width = abs(float(np.dot((eye_mid + right * side * eye_distance) - nose_tip, right)))
        if visible_width > 0.5 * eye_distance:
            centre = ear_level + right * side * 0.5 * box_w
            _ellipse(cv2, canvas, centre, (0.1 * box_w, 0.22 * box_h), angle, label)
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]) + up * 0.12 * box_h
    _ellipse(cv2, canvas, centre, (0.5 * box_w, 0.62 * box_h), angle, LABEL["skin"])

    down = -up
    nose = [eye_mid + down * 0.15 * eye_distance - right * 0.12 * eye_distance,
            eye_mid + down * 0.15 * eye_distance + right * 0.12 * eye_distance,
            nose_tip - right * 0.32 * eye_distance + down * 0.12 * eye_distance,
            nose_tip + right * 0.32 * eye_distance + down * 0.12 * eye_distance,
            nose_tip + down * 0.18 * eye_distance]
    _fill(cv2, canvas, nose, LABEL["nose"], convex_hull=True)

    for eye, side, brow_label, eye_label in ((left_eye, -1, LABEL["l_brow"], LABEL["l_eye"]),
                                             (right_eye, 1, LABEL["r_brow"], LABEL["r_eye"])):
        brow_centre = eye + up * 0.4 * eye_distance + right * side * 0.05 * eye_distance
        _ellipse(cv2, canvas, brow_centre, (0.36 * eye_distance, 0.08 * eye_distance), angle, brow_label)
        _ellipse(cv2, canvas, eye, (0.26 * eye_distance, 0.12 * eye_distance), angle, eye_label)

    # Lips: an ellipse through the mouth corners; the half above the corner line is the upper lip.
    lips_centre = mouth_mid + down * 0.04 * mouth_width
    mouth_angle = math.degrees(math.atan2(*(right_mouth - left_mouth)[::-1]))
    half_axes = (0.56 * mouth_width, 0.3 * mouth_width)
    _ellipse(cv2, canvas, lips_centre, half_axes, mouth_angle, LABEL["u_lip"], 180, 360)
    _ellipse(cv2, canvas, lips_centre, half_axes, mouth_angle, LABEL["l_lip"], 0, 180)
    _ellipse(cv2, canvas, mouth_mid, (0.4 * mouth_width, 0.05 * mouth_width), mouth_angle, LABEL["mouth"])
    return canvas


def labels_for_face(face: Face, height: int, width: int) -> np.ndarray:
    """Label map of one face from its densest landmarks (68/106), else from its keypoints and box."""
    if face.landmarks is not None and len(face.landmarks) in (68, 106):
        return labels_from_68(to_68_points(face.landmarks, face.landmark_kind), height, width)
    return labels_from_kps(face.kps, face.bbox, height, width)
