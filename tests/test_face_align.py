"""Aligned crops (ArcFace template, batched kornia warps) and paste-back."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("kornia")

from face_fixtures import as_image, astronaut  # noqa: E402
from likeness.errors import InvalidInputError  # noqa: E402
from likeness.face_analysis.align import ARCFACE_TEMPLATE_112, align_faces, paste_back, similarity_transforms, template  # noqa: E402
from likeness.face_analysis.types import Face, FaceAnalysis  # noqa: E402

# The astronaut's five keypoints (dlib 68-point model, our order).
ASTRONAUT_KPS = np.array([[203.17, 101.5], [246.83, 104.0], [225.0, 127.0], [201.0, 140.0], [245.0, 141.0]], np.float32)
ASTRONAUT_BOX = np.array([179, 83, 267, 171], np.float32)


def _analysis(faces_per_image: list[list[np.ndarray]], size=(512, 512), on_no_face="pass_through") -> FaceAnalysis:
    faces = [[Face(bbox=ASTRONAUT_BOX.copy(), score=1.0, kps=k.astype(np.float32), image_index=i) for k in kps_list]
             for i, kps_list in enumerate(faces_per_image)]
    return FaceAnalysis(faces, [size] * len(faces), "test", "test:model", on_no_face=on_no_face)


def _insightface_matrix(kps: np.ndarray, size: int) -> np.ndarray:
    from insightface.utils import face_align

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return face_align.estimate_norm(kps, size)


@pytest.mark.parametrize("size", [112, 224, 256, 512])
def test_transforms_match_insightface_estimate_norm(size):
    pytest.importorskip("insightface")
    ours = similarity_transforms(ASTRONAUT_KPS[None], template(size))[0]
    np.testing.assert_allclose(ours, _insightface_matrix(ASTRONAUT_KPS, size), rtol=1e-5, atol=1e-4)


def test_template_112_is_the_arcface_template_and_keypoints_land_on_it():
    np.testing.assert_allclose(template(112), ARCFACE_TEMPLATE_112, atol=1e-6)
    exact = ARCFACE_TEMPLATE_112 * 3 + [40, 25]                # a face that is exactly the template, scaled
    matrix = similarity_transforms(exact[None], template(224))[0]
    mapped = exact @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(mapped, template(224), atol=1e-3)


def test_crops_match_cv2_warp_affine_norm_crop():
    import cv2

    image = astronaut()
    aligned = align_faces(as_image(image), _analysis([[ASTRONAUT_KPS]]), 224)
    matrix = aligned.matrices[0].numpy()
    expected = cv2.warpAffine(image, matrix, (224, 224), borderValue=0.0).astype(np.float32) / 255.0
    diff = np.abs(aligned.crops[0].numpy() - expected)
    assert diff.mean() < 0.003 and diff.max() < 0.03
    assert aligned.crops.shape == (1, 224, 224, 3)


def test_batched_faces_from_several_images_keep_their_sources():
    image = astronaut()
    flipped = np.ascontiguousarray(image[:, ::-1])
    kps_flipped = ASTRONAUT_KPS.copy()
    kps_flipped[:, 0] = 511 - kps_flipped[:, 0]
    kps_flipped = kps_flipped[[1, 0, 2, 4, 3]]                 # image-left/right swap under a flip
    analysis = _analysis([[ASTRONAUT_KPS], [kps_flipped, ASTRONAUT_KPS]])
    aligned = align_faces(as_image(image, flipped), analysis, 112)
    assert aligned.image_indices == [0, 1, 1] and aligned.face_numbers == [0, 0, 1]
    # the flipped face aligned from the flipped image is the mirror of the original crop
    mirrored = aligned.crops[1].numpy()[:, ::-1] - aligned.crops[0].numpy()
    assert np.abs(mirrored).mean() < 0.03          # the template is almost symmetric
    assert (aligned.crops[2] - aligned.crops[0]).abs().max() > 0.2   # a face from another image differs
    inverse_then_forward = aligned.matrices[0].numpy()[:, :2] @ aligned.inverse[0].numpy()[:, :2]
    np.testing.assert_allclose(inverse_then_forward, np.eye(2), atol=1e-5)


def test_crop_scale_zooms_out_around_the_centre():
    analysis = _analysis([[ASTRONAUT_KPS]])
    tight = align_faces(as_image(astronaut()), analysis, 224, 1.0).matrices[0].numpy()
    loose = align_faces(as_image(astronaut()), analysis, 224, 2.0).matrices[0].numpy()
    assert np.linalg.norm(loose[:, 0]) == pytest.approx(np.linalg.norm(tight[:, 0]) / 2, rel=1e-4)


def test_images_without_faces_pass_through_letterboxed_or_are_skipped():
    image = np.zeros((300, 600, 3), np.uint8)
    image[:, :, 1] = 200
    passing = align_faces(as_image(image), _analysis([[]], size=(300, 600)), 112)
    assert passing.passthrough == [True] and passing.face_numbers == [-1]
    crop = passing.crops[0].numpy()
    assert crop[56, 56, 1] == pytest.approx(200 / 255, abs=1e-3)      # the image fills the middle band
    assert crop[5, 56].max() == 0.0                                     # letterbox bars
    skipped = align_faces(as_image(image), _analysis([[]], size=(300, 600), on_no_face="skip"), 112)
    assert len(skipped) == 0 and skipped.crops.shape == (0, 112, 112, 3)


def test_degenerate_keypoints_fall_back_to_the_box():
    kps = np.full((5, 2), 220.0, np.float32)
    aligned = align_faces(as_image(astronaut()), _analysis([[kps]]), 112)
    assert torch.isfinite(aligned.matrices).all() and aligned.crops.abs().sum() > 0


def test_images_that_were_not_analysed_are_refused():
    analysis = _analysis([[ASTRONAUT_KPS]])
    with pytest.raises(InvalidInputError, match="FACES describes 1 image"):
        align_faces(as_image(astronaut(), astronaut()), analysis, 112)
    with pytest.raises(InvalidInputError, match="computed on a 512x512 image"):
        align_faces(torch.zeros(1, 256, 256, 3), analysis, 112)
    with pytest.raises(InvalidInputError, match="multiple of 112/128"):
        align_faces(as_image(astronaut()), analysis, 100)


def test_paste_back_round_trip_restores_the_face_region():
    image = as_image(astronaut())
    aligned = align_faces(image, _analysis([[ASTRONAUT_KPS]]), 256)
    restored = paste_back(image, aligned, aligned.crops, feather=8)
    face = (slice(95, 160), slice(190, 260))
    assert (restored[0][face] - image[0][face]).abs().mean() < 0.03
    assert torch.equal(restored[0, 400:], image[0, 400:])                  # far away: untouched


def test_paste_back_of_resized_edited_crops_lands_on_the_face():
    image = as_image(astronaut())
    aligned = align_faces(image, _analysis([[ASTRONAUT_KPS]]), 256)
    white = torch.ones(1, 512, 512, 3)                                     # a "restored" crop at twice the size
    pasted = paste_back(image, aligned, white, feather=4)
    assert pasted[0, 120, 225].min() > 0.99                               # nose region replaced
    assert torch.equal(pasted[0, 450:], image[0, 450:])


def test_paste_back_masks_in_crop_and_image_space():
    image = as_image(astronaut())
    aligned = align_faces(image, _analysis([[ASTRONAUT_KPS]]), 256)
    white = torch.ones(1, 256, 256, 3)
    crop_mask = torch.zeros(256, 256)
    crop_mask[:, :128] = 1.0                                               # left half of the crop only
    left_only = paste_back(image, aligned, white, mask=crop_mask, feather=0)
    assert left_only[0, 120, 205].min() > 0.99 and left_only[0, 120, 250].max() < 0.99
    image_mask = torch.zeros(1, 512, 512)
    image_mask[:, :, 225:] = 1.0
    right_only = paste_back(image, aligned, white, mask=image_mask, feather=0)
    assert right_only[0, 120, 250].min() > 0.99 and torch.equal(right_only[0, :, :225], image[0, :, :225])


@pytest.mark.parametrize("shape,message", [
    ((100, 100), "paste-back takes a mask the size of the crops"),
    ((3, 256, 256), "crop-space mask needs 1 or 1 entries"),
    ((2, 512, 512), "image-space mask needs 1 or 1 entries"),
    ((1, 1, 256, 256), r"mask must be \[H,W\] or \[B,H,W\]"),
])
def test_wrong_mask_sizes_are_clear_errors(shape, message):
    image = as_image(astronaut())
    aligned = align_faces(image, _analysis([[ASTRONAUT_KPS]]), 256)
    with pytest.raises(InvalidInputError, match=message):
        paste_back(image, aligned, aligned.crops, mask=torch.ones(shape))


def test_wrong_crop_counts_and_images_are_clear_errors():
    image = as_image(astronaut())
    aligned = align_faces(image, _analysis([[ASTRONAUT_KPS]]), 256)
    with pytest.raises(InvalidInputError, match="got 2 crop"):
        paste_back(image, aligned, torch.ones(2, 256, 256, 3))
    with pytest.raises(InvalidInputError, match="must be square"):
        paste_back(image, aligned, torch.ones(1, 256, 200, 3))
    with pytest.raises(InvalidInputError, match="needs the images the faces were aligned from"):
        paste_back(torch.zeros(1, 300, 300, 3), aligned, aligned.crops)
