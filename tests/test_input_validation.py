"""Bad input handled at the door: the one IMAGE/MASK check, used by every node that takes one, and training data
errors that name the file (plain tensors and files, no host)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from likeness.errors import InvalidInputError
from likeness.trainers import datasets
from likeness.validation import check_image, check_images, check_mask, check_masks

# Inputs whose pixels are never read (only their size is): shape-checked, not refused for NaN.
SIZE_ONLY_INPUTS = {("LikenessFaceKeypointMap", "size_from"), ("LikenessFaceLandmarkMap", "size_from")}


def _nan_image(batch=3, index=2):
    image = torch.full((batch, 16, 16, 3), 0.5)
    image[index, 3:5, 4:9] = float("nan")
    return image


# --------------------------------------------------------------------------- the check itself

def test_nan_pixels_are_refused_naming_the_input_and_the_image():
    with pytest.raises(InvalidInputError, match=r"^'reference' image 2 has NaN/infinite pixels \(image 2: 30 values; "
                                                r"batch of 3\).*fix or replace the image"):
        check_image(_nan_image(), "reference")
    inf = torch.zeros(2, 8, 8, 3)
    inf[0, 0, 0, 0] = float("inf")
    inf[1, 1, 1, 1] = -float("inf")
    with pytest.raises(InvalidInputError, match=r"'image' image 0 has NaN/infinite pixels \(image 0: 1 values, "
                                                r"image 1: 1 values; batch of 2\)"):
        check_image(inf)


def test_values_far_outside_0_1_are_refused_small_overshoots_are_not():
    with pytest.raises(InvalidInputError, match=r"'image' image 1 has values from 255 to 255.*looks like 0\.\.255 data"):
        check_image(torch.cat([torch.zeros(1, 8, 8, 3), torch.full((1, 8, 8, 3), 255.0)]))
    with pytest.raises(InvalidInputError, match=r"looks like -1\.\.1 data"):
        check_image(torch.full((1, 8, 8, 3), -1.0))
    slightly = torch.full((1, 8, 8, 3), 1.02)
    assert check_image(slightly) is slightly                       # returned unchanged: same object


def test_shapes_and_types_are_checked():
    for bad, message in [(np.zeros((1, 8, 8, 3)), "must be an IMAGE tensor"), (torch.zeros(8, 8), "got shape"),
                         (torch.zeros(0, 8, 8, 3), "is empty"), (torch.zeros(1, 8, 8, 5), "has 5 channels"),
                         (torch.zeros(1, 8, 8, 3, dtype=torch.int32), "holds torch.int32 values")]:
        with pytest.raises(InvalidInputError, match=message):
            check_image(bad, "pose_map")
    nan = torch.full((1, 8, 8, 3), float("nan"))
    assert check_image(nan, "size_from", pixels=False) is nan      # shape only


def test_masks_in_every_layout_and_bad_masks():
    for layout in (torch.ones(8, 8), torch.ones(2, 8, 8), torch.ones(2, 1, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool)):
        assert check_mask(layout) is layout
    bad = torch.zeros(2, 8, 8)
    bad[1, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match=r"^'mask' mask 1 has NaN/infinite pixels"):
        check_mask(bad)
    with pytest.raises(InvalidInputError, match="Is an IMAGE connected where a MASK belongs"):
        check_mask(torch.zeros(1, 8, 8, 3))
    with pytest.raises(InvalidInputError, match="'limit' mask 0 has values from 255 to 255"):
        check_mask(torch.full((1, 8, 8), 255.0), "limit")


def test_unconnected_optionals_are_skipped():
    check_images(image=torch.zeros(1, 4, 4, 3), pose_map=None)
    check_masks(mask=None)
    with pytest.raises(InvalidInputError, match="'pose_map' image 0 has NaN"):
        check_images(image=torch.zeros(1, 4, 4, 3), pose_map=torch.full((1, 4, 4, 3), float("nan")))


# --------------------------------------------------------------------------- every node uses it

def _value_for(spec):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if kind == "IMAGE":
        return torch.full((1, 64, 64, 3), 0.5)
    if kind == "MASK":
        return torch.zeros(1, 64, 64)
    if isinstance(kind, list):
        return kind[0]
    if "default" in options:
        return options["default"]
    return object()   # a socket (MODEL, FACES ...): the door check must refuse the image before touching it


def _image_inputs():
    from likeness import NODE_CLASS_MAPPINGS

    for node_id, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                if entry[0] in ("IMAGE", "MASK") and (node_id, name) not in SIZE_ONLY_INPUTS:
                    yield pytest.param(node_id, name, entry[0], id=f"{node_id}.{name}")


@pytest.mark.parametrize("node_id,name,kind", list(_image_inputs()))
def test_every_node_refuses_a_nan_image_or_mask_naming_the_input(node_id, name, kind):
    from likeness import NODE_CLASS_MAPPINGS

    cls = NODE_CLASS_MAPPINGS[node_id]
    kwargs = {key: _value_for(entry) for key, entry in cls.INPUT_TYPES()["required"].items()}
    bad = torch.full((2, 64, 64, 3) if kind == "IMAGE" else (2, 64, 64), 0.5)
    bad[1, 10:12, 10:12] = float("nan")
    kwargs[name] = bad
    with pytest.raises(InvalidInputError, match=rf"^'{name}' {kind.lower()} 1 has NaN/infinite pixels"):
        getattr(cls(), cls.FUNCTION)(**kwargs)


def test_the_apply_and_encode_nodes_are_covered():
    covered = {p.values[0] for p in _image_inputs()}
    assert {"LikenessFaceIDApply", "LikenessFaceMakeUpApply", "LikenessConsistentIDEncode", "LikenessApplyFaceFusion",
            "LikenessFusionIdentity", "LikenessFaceAInpaint", "LikenessAnalyzeFaces", "LikenessTrainFaceFusion",
            "LikenessTrainConsistentID", "LikenessFaceATrainIdentity"} <= covered


# --------------------------------------------------------------------------- training data

def _write_png(path, value: int = 128):
    from PIL import Image

    Image.fromarray(np.full((20, 24, 3), value, dtype=np.uint8)).save(path)


def test_a_caption_that_is_not_utf8_is_named(tmp_path):
    _write_png(tmp_path / "anna.png")
    (tmp_path / "anna.txt").write_bytes("a photo of Zoë smiling".encode("latin-1"))
    with pytest.raises(InvalidInputError, match=r"caption file '.*anna\.txt' is not UTF-8 text \(invalid "
                                                r"continuation byte at byte 13\); save it as UTF-8"):
        datasets.training_sources(None, "", str(tmp_path))


def test_unreadable_images_are_named_even_when_every_file_is_bad(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InvalidInputError) as error:
        datasets.training_sources(None, "", str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"2 of 2 training image(s) in '{tmp_path}' cannot be read: 'broken.jpg' (")
    assert "'empty.png' (" in message and "Fix or remove those files" in message
    assert "connect 'images'" not in message
    _write_png(tmp_path / "good.png")
    with pytest.raises(InvalidInputError, match=r"2 of 3 training image\(s\)"):
        datasets.load_image_folder(str(tmp_path), 16)


def test_nan_training_images_are_named_not_blamed_on_the_learning_rate(tmp_path):
    images = _nan_image(batch=3, index=1)
    with pytest.raises(InvalidInputError, match=r"^'images' image 1 has NaN/infinite pixels"):
        datasets.training_sources(images, "", None)
    with pytest.raises(InvalidInputError, match=r"^'images' image 1 has NaN"):
        datasets.from_images(images, None, 8)
