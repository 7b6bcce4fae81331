"""Analyze: selection, retries, on_no_face, and bad inputs (one test each), with real dlib where it matters."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from face_fixtures import as_image, astronaut
from likeness.errors import IncompatibleEmbedsError, InvalidInputError, NoFaceError
from likeness.face_analysis.analyze import analyze, detect_with_retries, draw_preview, select
from likeness.face_analysis.analyzers.base import Capability
from likeness.face_analysis.embeds import FaceEmbeds
from likeness.face_analysis.images import to_uint8_rgb
from likeness.face_analysis.types import Face


class FakeAnalyzer:
    """Finds the faces it was given (pixel boxes), optionally only under some condition."""

    backend = "fake"
    model_id = "fake:v1"
    embedding_dim = 3
    capabilities = frozenset({Capability.DETECT, Capability.KPS5, Capability.EMBED})
    default_det_size = 640
    default_det_thresh = 0.5

    def __init__(self, boxes, vectors=None, when=None):
        self.boxes = boxes
        self.vectors = vectors or [[1.0, 0.0, 0.0]] * len(boxes)
        self.when = when or (lambda image, size: True)
        self.calls = []

    def detect(self, image, det_size=None, det_thresh=None):
        self.calls.append((image.shape[:2], det_size))
        if not self.when(image, det_size):
            return []
        faces = []
        for (x1, y1, x2, y2) in self.boxes:
            kps = np.array([[x1 + 0.3 * (x2 - x1), y1 + 0.4 * (y2 - y1)], [x1 + 0.7 * (x2 - x1), y1 + 0.4 * (y2 - y1)],
                            [(x1 + x2) / 2, y1 + 0.6 * (y2 - y1)], [x1 + 0.35 * (x2 - x1), y1 + 0.8 * (y2 - y1)],
                            [x1 + 0.65 * (x2 - x1), y1 + 0.8 * (y2 - y1)]], np.float32)
            faces.append(Face(bbox=np.array([x1, y1, x2, y2], np.float32), score=0.9, kps=kps))
        return faces

    def embed(self, image, faces):
        from dataclasses import replace

        out = []
        for face in faces:
            number = next(i for i, b in enumerate(self.boxes) if abs(b[0] - face.bbox[0]) < 1e-3)
            out.append(replace(face, embedding=np.asarray(self.vectors[number], np.float32)))
        return out

    def landmarks(self, image, faces):
        return faces

    def describe(self):
        return "fake"


BLANK = np.zeros((256, 256, 3), np.uint8)
BOXES = [(150, 20, 200, 70), (10, 30, 110, 130), (60, 150, 90, 180)]     # medium, largest (leftmost), small


# ----------------------------------------------------------------------------------------- selection

def test_faces_are_numbered_left_to_right_and_largest_is_picked():
    result = analyze(FakeAnalyzer(BOXES), as_image(BLANK))
    assert [float(f.bbox[0]) for f in result.detections[0]] == [10, 60, 150]
    assert result.selected == [[0]] and float(result.faces.faces[0][0].bbox[0]) == 10
    assert result.faces.faces[0][0].embedding is not None


def test_selection_by_index_and_all():
    by_index = analyze(FakeAnalyzer(BOXES), as_image(BLANK), selection="index", face_index=2)
    assert float(by_index.faces.faces[0][0].bbox[0]) == 150
    everyone = analyze(FakeAnalyzer(BOXES), as_image(BLANK), selection="all")
    assert len(everyone.faces.faces[0]) == 3 and everyone.selected == [[0, 1, 2]]


def test_face_index_out_of_range_is_named_in_the_error():
    with pytest.raises(NoFaceError, match=r"has 3 face\(s\), so face_index 5 does not exist"):
        analyze(FakeAnalyzer(BOXES), as_image(BLANK), selection="index", face_index=5)


def test_most_similar_to_a_reference():
    vectors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.0, 0.8]]     # per BOXES entry
    reference = FaceEmbeds(torch.tensor([[0.5, 0.0, 0.9]]), "fake:v1", "fake")
    result = analyze(FakeAnalyzer(BOXES, vectors), as_image(BLANK), selection="most_similar", reference=reference)
    assert float(result.faces.faces[0][0].bbox[0]) == 60 and result.selected == [[1]]   # the small face
    with pytest.raises(IncompatibleEmbedsError, match="same analyzer"):
        analyze(FakeAnalyzer(BOXES, vectors), as_image(BLANK), selection="most_similar",
                reference=FaceEmbeds(torch.ones(1, 3), "dlib:resnet_v1", "dlib"))
    with pytest.raises(InvalidInputError, match="needs a reference"):
        analyze(FakeAnalyzer(BOXES, vectors), as_image(BLANK), selection="most_similar")


def test_select_rejects_unknown_choices():
    with pytest.raises(InvalidInputError, match="selection must be one of"):
        analyze(FakeAnalyzer(BOXES), as_image(BLANK), selection="biggest")
    with pytest.raises(InvalidInputError, match="on_no_face must be one of"):
        analyze(FakeAnalyzer(BOXES), as_image(BLANK), on_no_face="ignore")
    assert select([], "largest") == ([], "no face detected")


# ----------------------------------------------------------------------------------------- retries

def test_retry_at_smaller_detector_sizes():
    analyzer = FakeAnalyzer([(0, 0, 256, 256)], when=lambda image, size: size <= 320)
    faces, image, offset = detect_with_retries(analyzer, BLANK, 640)
    assert len(faces) == 1 and offset == (0, 0)
    assert [size for _, size in analyzer.calls] == [640, 480, 320]


def test_retry_with_padding_maps_coordinates_back():
    # the fake finds a face only in a padded image, at the place of the original image's content
    def padded(image, size):
        return image.shape[0] > 256

    analyzer = FakeAnalyzer([(64 + 10, 64 + 20, 64 + 200, 64 + 240)], when=padded)
    result = analyze(analyzer, as_image(BLANK))
    face = result.faces.faces[0][0]
    np.testing.assert_allclose(face.bbox, [10, 20, 200, 240])                 # 25 % of 256 = 64 px of padding
    np.testing.assert_allclose(face.kps[2], [105, 20 + 0.6 * 220], atol=1e-4)
    no_retry = FakeAnalyzer([(0, 0, 10, 10)], when=padded)
    with pytest.raises(NoFaceError, match="no face detected"):
        analyze(no_retry, as_image(BLANK), retry=False)
    assert len(no_retry.calls) == 1


# ----------------------------------------------------------------------------------------- bad inputs (real dlib)

dlib_only = pytest.mark.skipif(not __import__("likeness.deps", fromlist=["x"]).is_available("dlib"),
                               reason="dlib not installed")


@pytest.fixture(scope="module")
def dlib_analyzer():
    pytest.importorskip("dlib")
    from likeness.face_analysis.analyzers.dlib_backend import load_dlib

    return load_dlib()


@dlib_only
def test_grayscale_image_is_replicated_to_rgb(dlib_analyzer):
    gray = torch.from_numpy(astronaut().mean(-1, keepdims=True)).float()[None] / 255     # [1,512,512,1]
    result = analyze(dlib_analyzer, gray)
    assert len(result.faces.faces[0]) == 1
    assert any("grayscale" in note for note in result.faces.notes)


@dlib_only
def test_rgba_image_drops_alpha(dlib_analyzer):
    rgba = torch.cat([as_image(astronaut()), torch.zeros(1, 512, 512, 1)], -1)        # alpha 0 everywhere
    result = analyze(dlib_analyzer, rgba)
    assert len(result.faces.faces[0]) == 1
    assert any("RGBA" in note for note in result.faces.notes)


@dlib_only
def test_16x16_image_is_too_small_with_a_clear_message(dlib_analyzer):
    tiny = torch.rand(1, 16, 16, 3)
    with pytest.raises(NoFaceError, match=r"image 0 is 16x16 pixels, smaller than the 32 px minimum"):
        analyze(dlib_analyzer, tiny)
    passed = analyze(dlib_analyzer, tiny, on_no_face="pass_through")
    assert passed.faces.faces == [[]] and draw_preview(passed).shape == (1, 16, 16, 3)


@dlib_only
def test_4096_image_is_downscaled_for_detection(dlib_analyzer):
    import cv2

    big = cv2.resize(astronaut(), (4096, 4096), interpolation=cv2.INTER_LINEAR)
    result = analyze(dlib_analyzer, as_image(big))
    face, = result.faces.faces[0]
    assert result.faces.image_sizes == [(4096, 4096)]
    centre = (face.bbox[:2] + face.bbox[2:]) / 2 / 8                    # back in 512-px units
    np.testing.assert_allclose(centre, [223, 127], atol=10)
    assert face.embedding.shape == (128,)


@dlib_only
@pytest.mark.parametrize("mode", ["error", "skip", "pass_through"])
def test_no_face_in_each_on_no_face_mode(dlib_analyzer, mode):
    blank = as_image(np.full((200, 200, 3), 128, np.uint8))
    if mode == "error":
        with pytest.raises(NoFaceError, match=r"indices \[0\].*image 0 no face detected.*on_no_face"):
            analyze(dlib_analyzer, blank, on_no_face=mode)
        return
    result = analyze(dlib_analyzer, blank, on_no_face=mode)
    assert result.faces.faces == [[]] and result.faces.on_no_face == mode
    assert result.faces.notes == ["image 0: no face detected (also retried smaller and padded)"]


@dlib_only
@pytest.mark.parametrize("mode", ["error", "skip", "pass_through"])
def test_batch_mixing_faces_and_no_faces(dlib_analyzer, mode):
    from likeness.face_analysis.align import align_faces

    image = astronaut()
    batch = as_image(image, np.zeros_like(image), np.ascontiguousarray(image[:, ::-1]))
    if mode == "error":
        with pytest.raises(NoFaceError, match=r"No usable face in 1 of 3 image\(s\) \(indices \[1\]\)"):
            analyze(dlib_analyzer, batch, on_no_face=mode)
        return
    result = analyze(dlib_analyzer, batch, on_no_face=mode)
    assert [len(f) for f in result.faces.faces] == [1, 0, 1]
    assert result.faces.images_without_faces() == [1]
    aligned = align_faces(batch, result.faces, 112)
    assert aligned.image_indices == ([0, 2] if mode == "skip" else [0, 1, 2])


@dlib_only
def test_nan_pixels_are_refused_naming_the_image(dlib_analyzer):
    image = as_image(astronaut()).repeat(3, 1, 1, 1)
    image[2, 400:450, 10:60] = float("nan")
    image[2, 0, 0, 0] = float("inf")
    with pytest.raises(InvalidInputError, match=r"'image' image 2 has NaN/infinite pixels \(image 2: 7501 values; "
                                                r"batch of 3\).*fix or replace"):
        analyze(dlib_analyzer, image)
    with pytest.raises(InvalidInputError, match="'image' image 0 has NaN"):
        analyze(dlib_analyzer, torch.full((1, 64, 64, 3), float("nan")))


def test_wrong_image_shapes_are_invalid_input_errors():
    with pytest.raises(InvalidInputError, match="has 5 channels"):
        to_uint8_rgb(torch.zeros(1, 8, 8, 5))
    with pytest.raises(InvalidInputError, match="got shape"):
        to_uint8_rgb(torch.zeros(8, 8))
    with pytest.raises(InvalidInputError, match="must be an IMAGE tensor"):
        to_uint8_rgb(np.zeros((1, 8, 8, 3)))
    with pytest.raises(InvalidInputError, match="is empty"):
        to_uint8_rgb(torch.zeros(0, 8, 8, 3))
    single = to_uint8_rgb(torch.ones(8, 8, 3))                          # [H,W,C]: a batch of one
    assert len(single.images) == 1 and single.images[0].max() == 255
