"""Face Fusion trainer pieces that need no host: example preparation, sources, settings, node naming."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from likeness.errors import InvalidInputError
from likeness.techniques.face_fusion import training as T
from likeness.trainers.datasets import training_sources


def _astronaut():
    import skimage.data

    return torch.from_numpy(skimage.data.astronaut()).float() / 255


def test_prepare_with_real_face_detector():
    pytest.importorskip("dlib")
    from likeness.face_analysis.analyzers.dlib_backend import load_dlib

    settings = T.FusionTrainSettings(resolution=64, reference_size=128)
    wide = torch.nn.functional.pad(_astronaut().permute(2, 0, 1), (100, 100)).permute(1, 2, 0)  # 512x712
    examples = T.prepare_examples([("astronaut", wide, "a woman")], settings, load_dlib("HOG", "5"))
    assert examples.aligned == [True]
    assert examples.targets.shape == (1, 64, 64, 3) and examples.references.shape == (1, 128, 128, 3)
    mask = examples.face_masks[0]
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    # astronaut's face is in the upper middle of the image (about x 180-300, y 80-230 of 512)
    assert 15 < float(xs.float().mean()) < 40 and 8 < float(ys.float().mean()) < 30
    assert 0.01 < float(mask.mean()) < 0.5  # dlib HOG boxes are tight (eyebrows to chin)


def test_prepare_without_analyzer_uses_centre_crop(caplog):
    image = torch.rand(100, 80, 3)
    with caplog.at_level("WARNING", logger="likeness"):
        examples = T.prepare_examples([("x", image, "c")], T.FusionTrainSettings(resolution=64, reference_size=128))
    assert examples.aligned == [False] and float(examples.face_masks.max()) == 0.0
    assert "without a face analyzer" in caplog.text
    expected = T.centre_reference(image[10:90], 128)
    assert torch.allclose(examples.references[0], expected)


def test_face_ellipse_covers_the_box():
    mask = T.face_ellipse(np.array([20, 10, 60, 70]), 0.5, 64)
    assert float(mask[20, 20]) == 1.0 and float(mask[0, 0]) == 0.0 and float(mask[20, 40]) == 0.0


def test_training_sources(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("caption a")
    images = torch.rand(2, 16, 16, 3)
    sources = training_sources(images, "one\ntwo", str(tmp_path))
    assert [(n, c) for n, _, c in sources] == [("image_0", "one"), ("image_1", "two"), ("a.png", "caption a")]
    with pytest.raises(InvalidInputError, match="give training images"):
        training_sources(None, "", None)


@pytest.mark.parametrize("bad", [dict(resolution=60), dict(reference_size=200), dict(steps=0), dict(face_weight=0),
                                 dict(reference_noise="x"), dict(lr=0.0)])
def test_settings_are_checked(bad):
    with pytest.raises(InvalidInputError):
        T.FusionTrainSettings(**bad).check()


def test_node_name_is_a_plain_file_name(tmp_path):
    from likeness.nodes._common import checked_file_stem

    outputs = [(str(tmp_path), "{}.safetensors")]
    assert checked_file_stem(" my face.safetensors ", "name", outputs) == "my face"
    for bad in ("", "../x", "a/b", ".."):
        with pytest.raises(InvalidInputError):
            checked_file_stem(bad, "name", outputs)
