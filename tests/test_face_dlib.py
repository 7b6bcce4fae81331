"""dlib backend on real photos shipped in packages (scikit-image's astronaut, insightface's t1.jpg)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("dlib")
pytest.importorskip("skimage")

from face_fixtures import as_image, astronaut, insightface_t1  # noqa: E402
from likeness.face_analysis.analyze import analyze  # noqa: E402
from likeness.face_analysis.analyzers.dlib_backend import MODEL_ID, kps5_from_68, kps5_from_dlib5, load_dlib  # noqa: E402


@pytest.fixture(scope="module")
def dlib_analyzer():
    return load_dlib()


@pytest.fixture(scope="module")
def astronaut_face(dlib_analyzer):
    result = analyze(dlib_analyzer, as_image(astronaut()), selection="all")
    return result.faces.faces[0]


def _embedding(analyzer, image: np.ndarray) -> np.ndarray:
    faces = analyze(analyzer, as_image(image)).faces.faces[0]
    assert len(faces) == 1
    return faces[0].embedding


def test_astronaut_has_exactly_one_face(astronaut_face):
    assert len(astronaut_face) == 1
    face = astronaut_face[0]
    x1, y1, x2, y2 = face.bbox
    assert 150 < x1 < x2 < 300 and 50 < y1 < y2 < 200            # the head, not the suit
    assert face.embedding.shape == (128,) and face.landmarks.shape == (68, 2)
    left_eye, right_eye, nose, mouth_left, mouth_right = face.kps
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


def test_all_six_faces_of_t1_and_every_pair_is_a_different_person(dlib_analyzer):
    faces = analyze(dlib_analyzer, as_image(insightface_t1()), selection="all").faces.faces[0]
    assert len(faces) == 6
    vectors = [f.embedding for f in faces]
    distances = [float(np.linalg.norm(a - b)) for a, b in itertools.combinations(vectors, 2)]
    assert len(distances) == 15
    assert min(distances) > 0.6, distances


@pytest.mark.parametrize("change", ["flip", "crop", "brightness"])
def test_same_person_stays_close_under_flip_crop_brightness(dlib_analyzer, change):
    image = astronaut()
    reference = _embedding(dlib_analyzer, image)
    if change == "flip":
        changed = np.ascontiguousarray(image[:, ::-1])
    elif change == "crop":
        changed = np.ascontiguousarray(image[30:330, 80:380])
    else:
        changed = np.clip(image.astype(np.int16) + 40, 0, 255).astype(np.uint8)
    distance = float(np.linalg.norm(_embedding(dlib_analyzer, changed) - reference))
    assert distance < 0.3, distance


def test_five_point_mode_estimates_keypoints_close_to_the_68_point_ones(dlib_analyzer, astronaut_face):
    five = load_dlib(landmarks="5")
    face = analyze(five, as_image(astronaut())).faces.faces[0][0]
    reference = astronaut_face[0]
    eye_distance = float(np.linalg.norm(reference.kps[1] - reference.kps[0]))
    errors = np.linalg.norm(face.kps - reference.kps, axis=1) / eye_distance
    assert errors[:2].max() < 0.1                    # eye centres: measured
    assert errors.max() < 0.25                       # estimated nose tip and mouth corners
    assert face.landmarks is None and five.model_id == dlib_analyzer.model_id == MODEL_ID
    np.testing.assert_allclose(face.embedding, reference.embedding, atol=1e-5)   # embeddings use the 5-point shape


def test_keypoint_conversions_follow_our_order():
    points = np.zeros((68, 2), np.float32)
    points[36:42] = [10, 20]
    points[42:48] = [30, 20]
    points[30] = [20, 30]
    points[48] = [12, 40]
    points[54] = [28, 40]
    np.testing.assert_array_equal(kps5_from_68(points), [[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]])
    five = np.array([[34, 20], [26, 20], [6, 20], [14, 20], [20, 30]], np.float32)   # dlib's order
    kps = kps5_from_dlib5(five)      # eye midpoint (20, 20) -> nose base (20, 30): d = 10 px down, eyes 20 px apart
    np.testing.assert_allclose(kps, [[10, 20], [30, 20], [20, 27.6], [20 - 9.8, 32.3], [20 + 9.8, 32.3]], atol=1e-4)


def test_large_images_are_downscaled_for_detection_and_mapped_back(dlib_analyzer):
    image = astronaut()
    big = np.kron(image, np.ones((4, 4, 1), np.uint8))          # 2048 x 2048, same scene
    small_face = analyze(dlib_analyzer, as_image(image)).faces.faces[0][0]
    big_face = analyze(dlib_analyzer, as_image(big)).faces.faces[0][0]   # detected at 1600 px, mapped to 2048
    np.testing.assert_allclose(big_face.bbox / 4, small_face.bbox, atol=12)    # HOG boxes snap to its pyramid
    np.testing.assert_allclose(big_face.kps / 4, small_face.kps, atol=3)
    assert big_face.landmark_sets["68"] is big_face.landmarks                  # every set mapped back, not just one
    np.testing.assert_allclose(big_face.landmarks / 4, small_face.landmarks, atol=4)


def test_mmod_cnn_detector_finds_the_astronaut(astronaut_face):
    mmod = load_dlib(detector="MMOD", landmarks="5")
    face, = analyze(mmod, as_image(astronaut()), det_size=384, retry=False).faces.faces[0]   # 384 px keeps it < 1 s
    centre = (face.bbox[:2] + face.bbox[2:]) / 2
    reference = astronaut_face[0]
    np.testing.assert_allclose(centre, (reference.bbox[:2] + reference.bbox[2:]) / 2, atol=15)
    assert float(np.linalg.norm(face.embedding - reference.embedding)) < 0.3
