"""Pose maps and head pose.

The 5-keypoint map is compared pixel for pixel with an independent rendering written here: the
ellipse polygon computed from OpenCV's published 1-degree sine table, the convex polygon rasterised
by our own scan conversion (Bresenham outline + fixed-point edge walk, the rules of
``cv2.fillConvexPoly`` without anti-aliasing), the dots as the integer discs x^2 + y^2 <= r^2 that a
filled ``cv2.circle`` produces. The helpers are themselves checked against OpenCV, so a mismatch in
the map test points at the map code, not at the reference.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from likeness.errors import InvalidInputError, NoFaceError
from likeness.face_analysis import pose
from likeness.face_analysis.types import Face, FaceAnalysis

# ------------------------------------------------------------------ the independent reference renderer

XY_SHIFT = 16
XY_ONE = 1 << XY_SHIFT
# OpenCV's drawing code looks sines up in a table of 7-decimal float constants, one per degree.
SINE_TABLE = [float(np.float32(round(math.sin(math.radians(d)), 7))) for d in range(451)]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


def ref_ellipse_polygon(centre, half_axes, angle):
    """Vertices of a full ellipse at 1-degree steps, consecutive duplicates removed."""
    angle %= 360
    sin_a, cos_a = SINE_TABLE[angle], SINE_TABLE[450 - angle]
    vertices = []
    for degree in range(361):
        x = half_axes[0] * SINE_TABLE[450 - degree]
        y = half_axes[1] * SINE_TABLE[degree]
        vertex = (int(np.rint(centre[0] + x * cos_a - y * sin_a)), int(np.rint(centre[1] + x * sin_a + y * cos_a)))
        if not vertices or vertices[-1] != vertex:
            vertices.append(vertex)
    return vertices if len(vertices) > 1 else [tuple(centre), tuple(centre)]


def ref_clip(width, height, p, q):
    """Integer clip of segment p-q to the canvas, or None when it misses it."""
    (x1, y1), (x2, y2) = p, q
    right, bottom = width - 1, height - 1

    def outcode(x, y):
        return (x < 0) + (x > right) * 2 + (y < 0) * 4 + (y > bottom) * 8

    c1, c2 = outcode(x1, y1), outcode(x2, y2)
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            edge = 0 if c1 < 8 else bottom
            x1 += int((edge - y1) * (x2 - x1) / (y2 - y1))
            y1, c1 = edge, (x1 < 0) + (x1 > right) * 2
        if c2 & 12:
            edge = 0 if c2 < 8 else bottom
            x2 += int((edge - y2) * (x2 - x1) / (y2 - y1))
            y2, c2 = edge, (x2 < 0) + (x2 > right) * 2
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                edge = 0 if c1 == 1 else right
                y1 += int((edge - x1) * (y2 - y1) / (x2 - x1))
                x1, c1 = edge, 0
            if c2:
                edge = 0 if c2 == 1 else right
                y2 += int((edge - x2) * (y2 - y1) / (x2 - x1))
                x2, c2 = edge, 0
    return None if (c1 | c2) else ((x1, y1), (x2, y2))


def ref_line(p, q):
    """8-connected Bresenham pixels, walked left to right."""
    (x0, y0), (x1, y1) = (p, q) if p[0] <= q[0] else (q, p)
    dx, dy = x1 - x0, abs(y1 - y0)
    y_step = -1 if y1 < y0 else 1
    steep = dy > dx
    major, minor = (dy, dx) if steep else (dx, dy)
    error = major - 2 * minor
    x, y, pixels = x0, y0, []
    for _ in range(major + 1):
        pixels.append((x, y))
        diagonal = error < 0
        error += (2 * major - 2 * minor) if diagonal else -2 * minor
        if steep:
            y += y_step
            x += 1 if diagonal else 0
        else:
            x += 1
            y += y_step if diagonal else 0
    return pixels


def _trunc_div(num, den):
    quotient = abs(num) // abs(den)
    return quotient if (num >= 0) == (den > 0) else -quotient


def _ref_advance_walker(walker, vertices, y, edges_left):
    """Move ``walker`` onto the next edge that reaches below row ``y``; returns the edges left (< 0: done)."""
    count = len(vertices)
    start = walker["idx"]
    nxt = (start + walker["step"]) % count
    while True:
        edges_left -= 1
        if edges_left < 0:
            return edges_left
        if vertices[nxt][1] > y:
            x_start, x_end = vertices[start][0] << XY_SHIFT, vertices[nxt][0] << XY_SHIFT
            rows = vertices[nxt][1] - y
            walker.update(end_y=vertices[nxt][1], x=x_start, idx=nxt,
                          dx=_trunc_div((x_end - x_start) * 2 + rows, 2 * rows))
            return edges_left
        start, nxt = nxt, (nxt + walker["step"]) % count


def _ref_fill_span(canvas, y, walkers, colour):
    """Row ``y`` between the two walkers' current x (fixed point, rounded)."""
    width = canvas.shape[1]
    left, right = sorted((walkers[0]["x"], walkers[1]["x"]))
    x_from, x_to = (left + XY_ONE // 2) >> XY_SHIFT, (right + XY_ONE // 2) >> XY_SHIFT
    if y >= 0 and x_to >= 0 and x_from < width:
        canvas[y, max(x_from, 0):min(x_to, width - 1) + 1] = colour


def ref_fill_convex(canvas, vertices, colour):
    """Outline + scanline fill of a convex polygon with integer vertices (no anti-aliasing)."""
    height, width = canvas.shape[:2]
    count = len(vertices)
    for i in range(count):
        segment = ref_clip(width, height, vertices[i - 1], vertices[i])
        for x, y in (ref_line(*segment) if segment else []):
            canvas[y, x] = colour
    xs, ys = [v[0] for v in vertices], [v[1] for v in vertices]
    if count < 3 or max(xs) < 0 or max(ys) < 0 or min(xs) >= width or min(ys) >= height:
        return
    top = ys.index(min(ys))
    y, y_last = min(ys), min(max(ys), height - 1)
    edges_left = count
    walkers = [{"idx": top, "step": 1, "end_y": y, "x": -XY_ONE, "dx": 0},
               {"idx": top, "step": count - 1, "end_y": y, "x": -XY_ONE, "dx": 0}]
    while y <= y_last:
        for walker in walkers:
            if y >= walker["end_y"]:
                edges_left = _ref_advance_walker(walker, vertices, y, edges_left)
        if edges_left < 0:
            break
        _ref_fill_span(canvas, y, walkers, colour)
        for walker in walkers:
            walker["x"] += walker["dx"]
        y += 1


def ref_disc(canvas, centre, radius, colour):
    height, width = canvas.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    canvas[(xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius * radius] = colour


def reference_kps_map(faces_kps, width, height):
    """InstantID's map drawn with the helpers above (limbs -> x0.6 -> dots), numpy float32 maths on kps."""
    limbs = np.zeros((height, width, 3), dtype=np.float64)
    for kps in faces_kps:
        kps = np.asarray(kps)
        for first in (0, 1, 3, 4):
            (x0, y0), (x1, y1) = kps[first], kps[2]
            length = ((x0 - x1) ** 2 + (y0 - y1) ** 2) ** 0.5
            angle = int(math.degrees(math.atan2(y0 - y1, x0 - x1)))
            centre = (int(np.mean(kps[[first, 2], 0])), int(np.mean(kps[[first, 2], 1])))
            ref_fill_convex(limbs, ref_ellipse_polygon(centre, (int(length / 2), 4), angle), COLOURS[first])
    canvas = (limbs * 0.6).astype(np.uint8)
    for kps in faces_kps:
        for index, (x, y) in enumerate(np.asarray(kps)):
            ref_disc(canvas, (int(x), int(y)), 10, COLOURS[index])
    return canvas


# ------------------------------------------------------------------------------------- face data

@functools.lru_cache(maxsize=1)
def astronaut_68() -> tuple[np.ndarray, np.ndarray]:
    """(box, 68 landmarks) of the astronaut from dlib's HOG detector + 68-point predictor."""
    dlib = pytest.importorskip("dlib")
    import skimage.data

    models = os.path.join(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0], "models")
    image = skimage.data.astronaut()
    rect = max(dlib.get_frontal_face_detector()(image, 0), key=lambda r: r.area())
    shape = dlib.shape_predictor(os.path.join(models, "shape_predictor_68_face_landmarks.dat"))(image, rect)
    points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
    return np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], np.float32), points


def kps_from_68(points: np.ndarray) -> np.ndarray:
    return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]]).astype(np.float32)


def astronaut_face(dense: bool = True) -> Face:
    box, points = astronaut_68()
    return Face(bbox=box, score=1.0, kps=kps_from_68(points), landmarks=points if dense else None,
                landmark_kind="68" if dense else None)


def random_kps(rng, width, height, inside=True) -> np.ndarray:
    """A plausible face: eyes, nose, mouth corners around a centre, scaled, rotated, float32."""
    template = np.array([[-0.5, -0.45], [0.5, -0.45], [0.0, 0.05], [-0.4, 0.55], [0.4, 0.55]])
    template = template + rng.normal(0, 0.06, template.shape)
    scale = rng.uniform(8, min(width, height) / 3)
    angle = rng.uniform(-math.pi / 2.5, math.pi / 2.5)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    margin = scale * 1.2 if inside else -scale
    centre = rng.uniform([margin, margin], [width - margin, height - margin])
    return (template @ rotation.T * scale + centre).astype(np.float32)


def one_face_analysis(face: Face, size=(512, 512)) -> FaceAnalysis:
    return FaceAnalysis(faces=[[face]], image_sizes=[size], backend="test", model_id="test:none")


# ------------------------------------------------------------------ reference helpers agree with OpenCV

def test_reference_primitives_agree_with_opencv():
    import cv2

    rng = np.random.default_rng(3)
    for _ in range(150):
        centre = (int(rng.integers(-20, 140)), int(rng.integers(-20, 140)))
        half_axes = (int(rng.integers(0, 90)), 4)
        angle = int(rng.integers(-180, 181))
        polygon = cv2.ellipse2Poly(centre, half_axes, angle, 0, 360, 1)
        assert [tuple(p) for p in polygon.tolist()] == ref_ellipse_polygon(centre, half_axes, angle)
        ours = np.zeros((120, 130), np.uint8)
        ref_fill_convex(ours, ref_ellipse_polygon(centre, half_axes, angle), 255)
        np.testing.assert_array_equal(ours, cv2.fillConvexPoly(np.zeros((120, 130), np.uint8), polygon, 255))
    for centre in [(60, 60), (3, 5), (125, 117), (-4, 60)]:
        ours = np.zeros((120, 130), np.uint8)
        ref_disc(ours, centre, 10, 255)
        np.testing.assert_array_equal(ours, cv2.circle(np.zeros((120, 130), np.uint8), centre, 10, 255, -1))


# -------------------------------------------------------------------------------- 5-keypoint map

def test_kps_map_pixel_exact_on_astronaut():
    kps = astronaut_face().kps
    ours = pose.draw_kps_map(kps, 512, 512)
    reference = reference_kps_map([kps], 512, 512)
    assert ours.dtype == np.uint8 and ours.shape == (512, 512, 3)
    np.testing.assert_array_equal(ours, reference)
    assert (ours.reshape(-1, 3).any(axis=1)).sum() > 1000  # something was drawn


@pytest.mark.parametrize("seed", range(6))
def test_kps_map_pixel_exact_on_random_faces(seed):
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(64, 400)), int(rng.integers(64, 400))
    faces = [random_kps(rng, width, height, inside=bool(i % 2 == 0)) for i in range(int(rng.integers(1, 4)))]
    np.testing.assert_array_equal(pose.draw_kps_map(faces, width, height), reference_kps_map(faces, width, height))
    # one face given as a bare [5,2] array draws the same as a list of one
    np.testing.assert_array_equal(pose.draw_kps_map(faces[0], width, height),
                                  reference_kps_map(faces[:1], width, height))


def test_kps_map_float64_keypoints_are_exact_too():
    rng = np.random.default_rng(42)
    kps = random_kps(rng, 300, 200).astype(np.float64) + 0.37
    np.testing.assert_array_equal(pose.draw_kps_map(kps, 300, 200), reference_kps_map([kps], 300, 200))


def test_kps_map_colours_and_limb_intensity():
    kps = np.array([[100, 100], [160, 100], [130, 140], [105, 180], [155, 180]], np.float32)
    image = pose.draw_kps_map(kps, 256, 256)
    for index, (x, y) in enumerate(kps.astype(int)):
        assert tuple(image[y, x]) == pose.KPS_COLOURS[index]
    assert tuple(image[0, 0]) == (0, 0, 0)
    # A limb pixel between the left eye and the nose, outside both dots: 60 % of red, truncated.
    assert tuple(image[120, 115]) == (int(255 * 0.6), 0, 0)


def test_kps_maps_batch_black_for_missing_face_and_image_tensor():
    face = astronaut_face()
    analysis = FaceAnalysis(faces=[[face], []], image_sizes=[(512, 512), (512, 512)], backend="test", model_id="t")
    result = pose.kps_maps(analysis)
    assert result.image.shape == (2, 512, 512, 3) and result.image.dtype == torch.float32
    expected = torch.from_numpy(reference_kps_map([face.kps], 512, 512)).float() / 255.0
    assert torch.equal(result.image[0], expected)
    assert result.image[1].abs().sum() == 0 and any("image 1" in n for n in result.notes)


def test_kps_maps_skip_mode_leaves_images_out():
    face = astronaut_face()
    analysis = FaceAnalysis(faces=[[], [face]], image_sizes=[(512, 512)] * 2, backend="t", model_id="t",
                            on_no_face="skip")
    result = pose.kps_maps(analysis)
    assert result.image.shape[0] == 1
    empty = FaceAnalysis(faces=[[]], image_sizes=[(512, 512)], backend="t", model_id="t", on_no_face="skip")
    with pytest.raises(NoFaceError):
        pose.kps_maps(empty)


@pytest.mark.parametrize("mode", ["fit", "stretch", "cover"])
def test_pose_from_another_image_is_the_rescaled_map(mode):
    """A face found on a 200x100 (w x h) image, drawn on a 512x384 canvas."""
    kps = np.array([[60, 40], [100, 38], [80, 60], [64, 80], [98, 79]], np.float32)
    face = Face(bbox=np.array([40, 20, 120, 95], np.float32), score=1.0, kps=kps)
    analysis = FaceAnalysis(faces=[[face]], image_sizes=[(100, 200)], backend="t", model_id="t")
    result = pose.kps_maps(analysis, target_size=(384, 512), mode=mode, batch=3)
    assert result.image.shape == (3, 384, 512, 3)
    sx, sy = 512 / 200, 384 / 100
    source = kps.astype(np.float64)
    if mode == "stretch":
        expected_kps = source * np.array([sx, sy])
    else:
        s = min(sx, sy) if mode == "fit" else max(sx, sy)
        expected_kps = source * s + np.array([(512 - 200 * s) / 2, (384 - 100 * s) / 2])
    expected = reference_kps_map([expected_kps.astype(np.float32)], 512, 384)
    assert torch.equal(result.image[2], torch.from_numpy(expected).float() / 255.0)


def test_rescale_points_modes():
    points = np.array([[0.0, 0.0], [200.0, 100.0]])
    np.testing.assert_allclose(pose.rescale_points(points, (100, 200), (100, 100), "stretch"), [[0, 0], [100, 100]])
    np.testing.assert_allclose(pose.rescale_points(points, (100, 200), (100, 100), "fit"), [[0, 25], [100, 75]])
    np.testing.assert_allclose(pose.rescale_points(points, (100, 200), (100, 100), "cover"), [[-50, 0], [150, 100]])


# ---------------------------------------------------------------------------------- landmark maps

def test_landmark_map_lines_and_points():
    face = astronaut_face()
    lines = pose.landmark_maps(one_face_analysis(face)).image[0]
    colours = {tuple(c) for c in (lines.reshape(-1, 3) * 255).round().int().tolist()}
    for name in ("left_eye", "outer_lips", "left_brow"):
        assert pose.LANDMARK_GROUP_COLOURS[name] in colours, name
    x0, y0 = np.floor(face.landmarks.min(0)).astype(int) - 3
    x1, y1 = np.ceil(face.landmarks.max(0)).astype(int) + 3
    drawn = lines.sum(-1) > 0
    assert drawn.sum() > 300 and drawn[y0:y1 + 1, x0:x1 + 1].sum() == drawn.sum()  # all on the face

    points = pose.landmark_maps(one_face_analysis(face), style="points", point_radius=2).image[0]
    assert set(np.unique(points.numpy())) <= {0.0, 1.0}
    for x, y in np.round(face.landmarks).astype(int):
        assert points[y, x].tolist() == [1.0, 1.0, 1.0]


def test_landmark_map_106_through_68_mapping():
    face = astronaut_face()
    dense106 = np.zeros((106, 2), np.float32)
    dense106[list(pose.LANDMARKS_106_TO_68)] = face.landmarks
    unused = sorted(set(range(106)) - set(pose.LANDMARKS_106_TO_68))
    dense106[unused] = face.landmarks.mean(0)
    np.testing.assert_array_equal(pose.to_68_points(dense106), face.landmarks.astype(np.float64))
    from dataclasses import replace

    result = pose.landmark_maps(one_face_analysis(replace(face, landmarks=dense106, landmark_kind="106")))
    assert result.image.shape == (1, 512, 512, 3) and result.image.sum() > 0


def test_landmark_map_needs_dense_landmarks():
    with pytest.raises(InvalidInputError, match="68/106-point landmarks"):
        pose.landmark_maps(one_face_analysis(astronaut_face(dense=False)))


# ------------------------------------------------------------------------------------- head pose

@pytest.mark.parametrize("angles", [(0, 0, 0), (25, 0, 0), (-30, 10, 5), (10, -20, -15), (40, 15, 20)])
@pytest.mark.parametrize("dense", [False, True])
def test_head_pose_recovers_synthetic_rotations(angles, dense):
    """Project the generic head rotated by known angles; the estimate must give them back."""
    yaw, pitch, roll = angles
    rotation = pose.rotation_from_euler(yaw, pitch, roll)
    np.testing.assert_allclose(pose.euler_from_rotation(rotation), angles, atol=1e-9)
    k = pose.camera_matrix(600, 800)
    translation = np.array([30.0, -20.0, 900.0])

    def project(model):
        camera = model @ rotation.T + translation
        return (camera[:, :2] / camera[:, 2:] * k[0, 0] + k[:2, 2]).astype(np.float32)

    kps = project(pose.GENERIC_HEAD_5)
    landmarks = None
    if dense:
        landmarks = np.tile(kps.mean(0), (68, 1)).astype(np.float32)
        indices = sorted(pose.GENERIC_HEAD_68)
        landmarks[indices] = project(np.array([pose.GENERIC_HEAD_68[i] for i in indices]))
    face = Face(bbox=np.array([0, 0, 1, 1], np.float32), score=1.0, kps=kps, landmarks=landmarks)
    estimate = pose.estimate_head_pose(face, (600, 800))
    assert estimate.source == ("68 landmarks" if dense else "5 keypoints")
    np.testing.assert_allclose([estimate.yaw, estimate.pitch, estimate.roll], angles, atol=0.5)
    assert estimate.reprojection_error < 0.1


MIRROR_68 = (list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
             + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40]
             + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65])


def test_head_pose_on_astronaut_is_near_frontal_and_mirrors():
    face = astronaut_face()
    dense = pose.estimate_head_pose(face, (512, 512))
    sparse = pose.estimate_head_pose(astronaut_face(dense=False), (512, 512))
    for estimate in (dense, sparse):
        assert abs(estimate.yaw) < 15 and abs(estimate.pitch) < 20 and abs(estimate.roll) < 15, estimate
    assert abs(dense.yaw - sparse.yaw) < 8 and abs(dense.roll - sparse.roll) < 5

    mirrored = face.landmarks[MIRROR_68].copy()
    mirrored[:, 0] = 511 - mirrored[:, 0]
    from dataclasses import replace

    flipped = pose.estimate_head_pose(replace(face, landmarks=mirrored, kps=kps_from_68(mirrored)), (512, 512))
    assert flipped.yaw == pytest.approx(-dense.yaw, abs=1.5)
    assert flipped.roll == pytest.approx(-dense.roll, abs=1.5)
    assert flipped.pitch == pytest.approx(dense.pitch, abs=1.5)


def test_turned_head_reads_as_turned():
    """Squash one side of the astronaut's landmarks (a head turning away from it): yaw changes sign-consistently."""
    face = astronaut_face()
    centre = face.landmarks[30, 0]
    turned = face.landmarks.copy()
    left = turned[:, 0] < centre
    turned[left, 0] = centre - (centre - turned[left, 0]) * 0.55  # image-left half foreshortened
    from dataclasses import replace

    estimate = pose.estimate_head_pose(replace(face, landmarks=turned), (512, 512))
    assert estimate.yaw < pose.estimate_head_pose(face, (512, 512)).yaw - 10  # nose moves towards the image left


def test_head_pose_readout_text():
    analysis = FaceAnalysis(faces=[[astronaut_face()], []], image_sizes=[(512, 512)] * 2, backend="t", model_id="t")
    readout = pose.head_pose_readout(analysis)
    assert "image 0 face 0: yaw" in readout.text and "image 1: no face" in readout.text
    assert len(readout.poses[0]) == 1 and readout.poses[1] == []


# ------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("kps, message", [
    (np.full((5, 2), np.nan, np.float32), "NaN"),
    (np.zeros((4, 2), np.float32), r"\[5, 2\]"),
    (np.zeros((5,), np.float32), r"\[5, 2\]"),
    (np.full((5, 2), 1e9, np.float32), "million"),
])
def test_kps_map_bad_keypoints(kps, message):
    with pytest.raises(InvalidInputError, match=message):
        pose.draw_kps_map(kps, 64, 64)


def test_bad_canvas_and_mode_and_analysis():
    kps = np.array([[10, 10], [30, 10], [20, 20], [12, 30], [28, 30]], np.float32)
    with pytest.raises(InvalidInputError, match="1..16384"):
        pose.draw_kps_map(kps, 0, 64)
    face = Face(bbox=np.array([5, 5, 35, 35], np.float32), score=1.0, kps=kps)
    with pytest.raises(InvalidInputError, match="rescale mode"):
        pose.kps_maps(one_face_analysis(face, (64, 64)), target_size=(32, 32), mode="zoom")
    mixed = FaceAnalysis(faces=[[face], [face]], image_sizes=[(64, 64), (64, 80)], backend="t", model_id="t")
    with pytest.raises(InvalidInputError, match="different sizes"):
        pose.kps_maps(mixed)
    assert pose.kps_maps(mixed, target_size=(64, 64)).image.shape == (2, 64, 64, 3)
    with pytest.raises(InvalidInputError, match="FACES"):
        pose.kps_maps("not faces")
    with pytest.raises(InvalidInputError, match="maps were asked"):
        pose.kps_maps(mixed, batch=3)


# ------------------------------------------------------------------------------------------- nodes

def test_nodes_keypoint_landmark_and_pose():
    from likeness.nodes.face_pose import FaceKeypointMap, FaceLandmarkMap, HeadPose

    analysis = one_face_analysis(astronaut_face())
    (image,) = FaceKeypointMap().draw(analysis)
    assert image.shape == (1, 512, 512, 3)
    (resized,) = FaceKeypointMap().draw(analysis, size_from=torch.zeros(2, 256, 320, 3), resize_mode="stretch")
    assert resized.shape == (2, 256, 320, 3)
    with pytest.raises(InvalidInputError, match="both width and height"):
        FaceKeypointMap().draw(analysis, width=256)
    (lm,) = FaceLandmarkMap().draw(analysis, "lines", 0, 3, width=256, height=256)
    assert lm.shape == (1, 256, 256, 3)
    text, yaw, pitch, roll = HeadPose().estimate(analysis)
    assert "yaw" in text and all(isinstance(v, float) for v in (yaw, pitch, roll))
    with pytest.raises(InvalidInputError, match="face_index 3"):
        HeadPose().estimate(analysis, 0, 3)
    empty = FaceAnalysis(faces=[[]], image_sizes=[(64, 64)], backend="t", model_id="t")
    with pytest.raises(NoFaceError):
        HeadPose().estimate(empty)
    with pytest.raises(InvalidInputError, match="FACES"):
        FaceKeypointMap().draw(torch.zeros(1, 8, 8, 3))
