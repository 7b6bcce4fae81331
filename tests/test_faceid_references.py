"""Plain: ID tokens and the default pose map from reference photos (no ComfyUI; tiny checkpoints, a stand-in CLIP)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from faceid_support import random_faceid_checkpoint
from likeness.errors import InvalidInputError
from likeness.face_analysis.types import Face, FaceAnalysis
from likeness.techniques.faceid.checkpoint import load_faceid_state_dict
from likeness.techniques.faceid.references import faceid_tokens, parse_mix_weights, reference_pose_map

TINY_CHANNELS = [32, 32, 64, 64, 128, 128, 128, 128, 128, 64, 64, 64, 32, 32, 32, 128]   # tiny SD1.5 blocks
KPS = np.array([[36, 42], [60, 42], [48, 54], [39, 66], [57, 66]], dtype=np.float32)


def _faces(with_face=(True, True), seed=0) -> FaceAnalysis:
    rng = np.random.default_rng(seed)
    faces = [[Face(bbox=np.array([24, 24, 72, 80], dtype=np.float32), score=0.99, kps=KPS + 4 * i, image_index=i,
                   embedding=rng.standard_normal(512).astype(np.float32))] if present else []
             for i, present in enumerate(with_face)]
    return FaceAnalysis(faces, [(96, 96)] * len(faces), "insightface", "insightface:buffalo_l/w600k_r50", 512)


class FakeClipVision:
    """CLIP-vision stand-in: hidden states ``[B, 5, 64]`` made from the pixels, recording every call."""

    def __init__(self):
        self.calls = []

    def encode_image(self, pixels, crop=True):
        self.calls.append(tuple(pixels.shape))
        per_image = pixels.mean(dim=(1, 2))                                           # [B, 3]
        return {"penultimate_hidden_states": per_image.repeat(1, 22)[:, :64].unsqueeze(1).expand(-1, 5, -1)}


@pytest.fixture(scope="module")
def plain_faceid():
    groups = random_faceid_checkpoint(TINY_CHANNELS, 64, kind="mlp")
    return load_faceid_state_dict(groups, source="tiny-faceid.bin")


@pytest.fixture(scope="module")
def plus_faceid():
    groups = random_faceid_checkpoint(TINY_CHANNELS, 64, kind="plus", clip_dim=64)
    return load_faceid_state_dict(groups, source="tiny-faceid-plusv2.bin")


def _images(batch=2):
    return torch.rand(batch, 96, 96, 3, generator=torch.Generator().manual_seed(1))


def test_mix_weights_parse_and_refuse_wrong_counts():
    assert parse_mix_weights("", 2) is None and parse_mix_weights("  ", 3) is None
    assert parse_mix_weights("0.7, 0.3", 2) == [0.7, 0.3]
    assert parse_mix_weights("1;0", 2) == [1.0, 0.0]
    with pytest.raises(InvalidInputError, match="numbers separated by commas"):
        parse_mix_weights("a, b", 2)
    with pytest.raises(InvalidInputError, match="2 value"):
        parse_mix_weights("0.5, 0.5", 3)


def test_plain_faceid_tokens_blend_references(plain_faceid):
    images, faces = _images(), _faces()
    single = faceid_tokens(plain_faceid, images[:1], _faces((True,)), None, 1.0)
    first_only = faceid_tokens(plain_faceid, images, faces, None, 1.0, "1, 0")
    equal = faceid_tokens(plain_faceid, images, faces, None, 1.0)
    assert single.cond.shape == single.uncond.shape == (1, 4, 64)
    assert torch.equal(first_only.cond, single.cond) and torch.equal(first_only.uncond, single.uncond)
    assert torch.equal(equal.cond, faceid_tokens(plain_faceid, images, faces, None, 1.0, "2, 2").cond)
    assert not torch.allclose(equal.cond, single.cond)


def test_images_without_a_face_are_left_out(plain_faceid):
    images = _images(3)
    with_gap = faceid_tokens(plain_faceid, images, _faces((True, False, True)), None, 1.0, "1, 1")
    assert with_gap.cond.shape == (1, 4, 64)
    with pytest.raises(InvalidInputError, match="2 image"):
        faceid_tokens(plain_faceid, images, _faces((True, False, True)), None, 1.0, "1, 1, 1")
    with pytest.raises(InvalidInputError, match="no identity embedding"):
        faceid_tokens(plain_faceid, images[:1], _faces((False,)), None, 1.0)
    with pytest.raises(InvalidInputError, match="FACES describes 2 image"):
        faceid_tokens(plain_faceid, images, _faces(), None, 1.0)  # 3 images, 2 analysed


def test_plus_tokens_read_clip_of_each_first_face(plus_faceid):
    images, faces = _images(), _faces()
    clip = FakeClipVision()
    tokens = faceid_tokens(plus_faceid, images, faces, clip, 1.0)
    assert clip.calls == [(2, 224, 224, 3), (1, 224, 224, 3)]       # the aligned first faces, then the zero input
    assert tokens.cond.shape == tokens.uncond.shape == (1, 4, 64)
    lower_s = faceid_tokens(plus_faceid, images, faces, clip, 0.5)
    assert not torch.allclose(lower_s.cond, tokens.cond)             # s_scale weighs the CLIP refinement
    with pytest.raises(InvalidInputError, match="needs the CLIP vision model"):
        faceid_tokens(plus_faceid, images, faces, None, 1.0)


def test_reference_pose_map_is_drawn_from_the_first_image_with_a_face():
    faces = _faces((False, True, True))
    pose = reference_pose_map(faces)
    assert pose.shape == (1, 96, 96, 3) and pose.max() > 0
    from likeness.face_analysis.pose import kps_maps

    assert torch.equal(pose, kps_maps(faces).image[1:2])
