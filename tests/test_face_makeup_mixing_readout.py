"""Identity-mixing readout: similarity of result images to each source identity (plain tensors)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from likeness.errors import InvalidInputError
from likeness.face_analysis.types import Face, FaceAnalysis
from likeness.techniques.faceid.mixing_readout import mixing_readout

MODEL = "insightface:buffalo_l/w600k_r50"


def analysis(vectors):
    faces = [[] if v is None else [Face(bbox=np.array([0, 0, 10, 10], np.float32), score=0.9,
                                        kps=np.zeros((5, 2), np.float32), image_index=i,
                                        embedding=np.asarray(v, np.float32))] for i, v in enumerate(vectors)]
    return FaceAnalysis(faces, [(10, 10)] * len(vectors), "insightface", MODEL, 512)


def test_readout_scores_each_source_separately():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(512), rng.standard_normal(512)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    midway = (a + b) / np.linalg.norm(a + b)
    readout = mixing_readout(analysis([a, b]), analysis([a, midway, None]), weights=[0.5, 0.5])
    assert readout.source_images == [0, 1]
    assert readout.cosines[0][0] == pytest.approx(1.0, abs=1e-5)
    assert readout.cosines[1][0] == pytest.approx(readout.cosines[1][1], abs=1e-5)
    assert readout.shares()[1] == pytest.approx([0.5, 0.5], abs=1e-4)
    assert all(math.isnan(c) for c in readout.cosines[2])
    text = readout.to_text()
    assert "result 1" in text and "mix weights 0.5, 0.5" in text


def test_sources_without_faces_are_an_error():
    with pytest.raises(InvalidInputError, match="no identity embedding"):
        mixing_readout(analysis([None]), analysis([np.ones(512)]))


def test_balance_node():
    from likeness.nodes.faceid import IdentityMixBalance

    a, b = np.eye(512)[0], np.eye(512)[1]
    out = IdentityMixBalance().measure(analysis([a, b]), analysis([a]), "0.7, 0.3")
    text, first, second = out["result"]
    assert first == pytest.approx(1.0) and second == pytest.approx(0.0, abs=1e-6)
    assert "0.7, 0.3" in text and out["ui"]["text"] == [text]
