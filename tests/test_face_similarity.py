"""Identity similarity: per-image cosine / L2, per-backend pass rules, annotated image."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from face_fixtures import as_image, astronaut, insightface_t1
from likeness.errors import IncompatibleEmbedsError
from likeness.face_analysis.embeds import FaceEmbeds
from likeness.face_analysis.similarity import compare, compare_images, rule_for
from likeness.face_analysis.types import Face, FaceAnalysis


def _analysis(vectors_per_image, backend="insightface", model="insightface:p/w600k"):
    faces = [[Face(bbox=np.array([0, 0, 10, 10], np.float32), score=1.0, kps=np.zeros((5, 2), np.float32),
                   image_index=i, embedding=np.asarray(v, np.float32)) for v in vectors]
             for i, vectors in enumerate(vectors_per_image)]
    return FaceAnalysis(faces, [(10, 10)] * len(faces), backend, model, 2)


def test_cosine_rule_picks_the_best_face_per_image_and_reports_nan_without_face():
    reference = FaceEmbeds(torch.tensor([[10.0, 0.0]]), "insightface:p/w600k", "insightface")
    analysis = _analysis([[[0.0, 5.0], [3.0, 4.0]], [], [[-1.0, 0.1]]])
    report = compare(reference, analysis)
    assert (report.metric, report.threshold) == ("cosine", 0.30)
    first, second, third = report.scores
    assert first.face_number == 1 and first.cosine == pytest.approx(0.6) and first.passed
    assert first.l2 == pytest.approx(math.sqrt(2 - 2 * 0.6))                # L2 of unit vectors
    assert second.face_number is None and math.isnan(second.cosine) and not second.passed
    assert not third.passed and third.cosine < 0
    assert report.mean_cosine == pytest.approx((0.6 + third.cosine) / 2) and not report.all_passed
    text = report.to_text()
    assert "image 1: no face -> FAIL" in text and "cosine >= 0.3" in text and "1/3 passed" in text
    assert json.loads(report.to_json())["scores"][1]["cosine"] is None


def test_dlib_rule_is_raw_l2_below_0_6_and_thresholds_can_be_overridden():
    assert rule_for("dlib") == ("l2", 0.6) and rule_for("insightface", 0.5) == ("cosine", 0.5)
    reference = FaceEmbeds(torch.tensor([[1.0, 0.0]]), "dlib:resnet_v1", "dlib")
    analysis = _analysis([[[1.5, 0.0]], [[1.0, 0.7]]], "dlib", "dlib:resnet_v1")
    report = compare(reference, analysis)
    assert [s.l2 for s in report.scores] == pytest.approx([0.5, 0.7])       # raw vectors, not unit ones
    assert [s.passed for s in report.scores] == [True, False]
    assert [s.passed for s in compare(reference, analysis, threshold=0.4).scores] == [False, False]


def test_references_of_another_model_are_refused():
    reference = FaceEmbeds(torch.tensor([[1.0, 0.0]]), "dlib:resnet_v1", "dlib")
    with pytest.raises(IncompatibleEmbedsError, match="different models"):
        compare(reference, _analysis([[[1.0, 0.0]]]))


def test_faces_as_reference():
    reference = _analysis([[[1.0, 0.0]]])
    report = compare(reference, _analysis([[[2.0, 0.0]]]))
    assert report.scores[0].cosine == pytest.approx(1.0) and report.all_passed


def test_dlib_similarity_on_real_photos():
    pytest.importorskip("dlib")
    from likeness.face_analysis.analyze import analyze
    from likeness.face_analysis.analyzers.dlib_backend import load_dlib

    analyzer = load_dlib()
    image = astronaut()
    reference = analyze(analyzer, as_image(image)).faces
    other = np.ascontiguousarray(insightface_t1()[150:662, 300:812])       # two of the t1 people, 512x512
    batch = as_image(np.ascontiguousarray(image[:, ::-1]), other, np.zeros_like(image))
    report, annotated, analysis = compare_images(analyzer, batch, reference)
    same, different, empty = report.scores
    assert same.passed and same.l2 < 0.3
    assert not different.passed and different.l2 > 0.6 and len(analysis.faces[1]) >= 1
    assert empty.face_number is None and not empty.passed
    assert annotated.shape == (3, 512, 512, 3)
    assert not torch.equal(annotated[0], batch[0])                           # boxes and labels drawn


def test_insightface_tiny_pack_similarity(tiny_pack):
    pytest.importorskip("insightface")
    from likeness.face_analysis.analyze import analyze
    from likeness.face_analysis.analyzers.insightface_backend import load_insightface
    from onnx_face_models import square_image

    analyzer = load_insightface(tiny_pack, "CPU")
    image = square_image(x=96, y=64)
    reference = analyze(analyzer, as_image(image)).faces
    moved = square_image(x=448, y=288)
    report, _, _ = compare_images(analyzer, as_image(image, moved), reference)
    assert report.scores[0].cosine == pytest.approx(1.0, abs=1e-5) and report.scores[0].passed
    assert report.scores[1].face_number == 0
