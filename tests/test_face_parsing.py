"""BiSeNet face parsing: checkpoint layout, forward shape, label -> region mapping, mask shaping,
the crop / paste-back pipeline, the landmark fallback on a real photo, nodes and bad inputs."""
from __future__ import annotations

import functools
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from likeness.errors import CheckpointLayoutError, InvalidInputError, ModelFileError
from likeness.face_analysis.parsing import (
    LABELS,
    LANDMARKS_CHOICE,
    FaceParser,
    face_regions,
    landmark_parser,
    loader,
    parse_faces,
    regions,
)
from likeness.face_analysis.parsing.bisenet import BiSeNet
from likeness.face_analysis.parsing.landmark_fallback import labels_from_kps
from likeness.face_analysis.types import Face, FaceAnalysis

# The official key layout ships with the tests (a copy of the project's shared checkpoint_layouts file).
LAYOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "checkpoint_layouts",
                      "bisenet_face_parsing_19.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
L = regions.LABEL


@functools.lru_cache(maxsize=1)
def layout() -> dict:
    if not os.path.isfile(LAYOUT):
        pytest.skip(f"checkpoint layout not found at {LAYOUT}")
    with open(LAYOUT) as handle:
        return json.load(handle)["groups"][""]


def state_dict_from_layout(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the official file's keys, shapes and dtypes (BatchNorm variances positive)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, spec in layout().items():
        dtype = DTYPES[spec["dtype"]]
        if dtype.is_floating_point:
            tensor = torch.randn(spec["shape"], generator=generator).to(dtype)
            state[key] = tensor.abs() + 0.5 if key.endswith("running_var") else tensor
        else:
            state[key] = torch.zeros(spec["shape"], dtype=dtype)
    return state


# ------------------------------------------------------------------------------- checkpoint layout

def test_official_layout_loads_with_every_key_consumed(tmp_path):
    state = state_dict_from_layout()
    path = tmp_path / "79999_iter.pth"
    torch.save(state, path)
    model = loader.load_bisenet(str(path), use_cache=False)
    loaded = model.state_dict()
    assert list(loaded) == list(layout())  # same keys, same order: nothing missing, nothing extra
    for key, tensor in state.items():
        assert loaded[key].shape == tensor.shape and torch.equal(loaded[key], tensor), key
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_layout_without_num_batches_tracked_is_accepted(tmp_path):
    state = {k: v for k, v in state_dict_from_layout().items() if not k.endswith("num_batches_tracked")}
    assert len(state) == 191 - 31
    path = tmp_path / "face_parsing.pth"
    torch.save(state, path)
    model = loader.load_bisenet(str(path), use_cache=False)
    assert torch.equal(model.state_dict()["ffm.conv2.weight"], state["ffm.conv2.weight"])


def test_safetensors_and_wrapped_and_ddp_prefixed_files_load(tmp_path):
    from safetensors.torch import save_file

    state = state_dict_from_layout(1)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bisenet.safetensors"))
    model = loader.load_bisenet(str(tmp_path / "bisenet.safetensors"), use_cache=False)
    assert torch.equal(model.state_dict()["conv_out.conv_out.weight"], state["conv_out.conv_out.weight"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    model = loader.load_bisenet(str(tmp_path / "wrapped.pth"), use_cache=False)
    assert torch.equal(model.state_dict()["cp.resnet.conv1.weight"], state["cp.resnet.conv1.weight"])


def test_fp16_file_is_cast_per_tensor(tmp_path):
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in state_dict_from_layout().items()}
    torch.save(state, tmp_path / "half.pth")
    model = loader.load_bisenet(str(tmp_path / "half.pth"), use_cache=False)
    assert model.state_dict()["cp.arm16.conv.conv.weight"].dtype == torch.float32


@pytest.mark.parametrize("change, pattern", [
    ("drop", r"missing key 'cp\.arm32\.conv_atten\.weight'"),
    ("rename", r"missing key 'ffm\.conv1\.weight'.*unexpected key 'ffm\.conv_1\.weight'"),
    ("reshape", r"key 'cp\.resnet\.layer3\.0\.conv1\.weight' has shape \[256, 128, 1, 1\], expected \[256, 128, 3, 3\]"),
    ("extra", r"unexpected key 'fc\.weight'"),
    ("classes", r"conv_out\.conv_out\.weight' has 2 classes"),
])
def test_layout_errors_name_the_key(tmp_path, change, pattern):
    state = state_dict_from_layout()
    if change == "drop":
        del state["cp.arm32.conv_atten.weight"]
    elif change == "rename":
        state["ffm.conv_1.weight"] = state.pop("ffm.conv1.weight")
    elif change == "reshape":
        state["cp.resnet.layer3.0.conv1.weight"] = torch.zeros(256, 128, 1, 1)
    elif change == "extra":
        state["fc.weight"] = torch.zeros(1000, 512)
    elif change == "classes":
        state["conv_out.conv_out.weight"] = torch.zeros(2, 256, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointLayoutError, match=pattern):
        loader.load_bisenet(str(tmp_path / "bad.pth"), use_cache=False)


def test_truncated_empty_and_foreign_files_give_clear_errors(tmp_path):
    path = tmp_path / "79999_iter.pth"
    torch.save(state_dict_from_layout(), path)
    data = path.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        loader.load_bisenet(str(tmp_path / "truncated.pth"), use_cache=False)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        loader.load_bisenet(str(tmp_path / "empty.pth"), use_cache=False)
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ModelFileError, match="cut.safetensors"):
        loader.load_bisenet(str(tmp_path / "cut.safetensors"), use_cache=False)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ModelFileError, match="state dict"):
        loader.load_bisenet(str(tmp_path / "list.pth"), use_cache=False)
    with pytest.raises(ModelFileError, match="not found"):
        loader.load_bisenet(str(tmp_path / "missing.pth"), use_cache=False)


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a checkpoint that would run code on load is rejected, not executed."""
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ModelFileError):
        loader.load_bisenet(str(tmp_path / "evil.pth"), use_cache=False)


def test_models_are_cached_by_file(tmp_path):
    path = tmp_path / "a.pth"
    torch.save(state_dict_from_layout(), path)
    loader.clear_cache()
    assert loader.load_bisenet(str(path)) is loader.load_bisenet(str(path))
    loader.clear_cache()


def test_forward_shape():
    model = BiSeNet().eval()
    with torch.inference_mode():
        logits = model(torch.zeros(1, 3, 512, 512))
        main, aux16, aux32 = model(torch.zeros(1, 3, 64, 96), with_aux=True)
    assert logits.shape == (1, 19, 512, 512)
    assert main.shape == aux16.shape == aux32.shape == (1, 19, 64, 96)


# --------------------------------------------------------------------------------- label -> region

def synthetic_parse() -> torch.Tensor:
    """[1, 19*4, 8] label map: a block of 4 rows per label, in label order."""
    return torch.arange(19, dtype=torch.uint8).repeat_interleave(4).view(1, -1, 1).expand(1, 76, 8).contiguous()


@pytest.mark.parametrize("region, names", [
    ("skin", {"skin"}), ("brows", {"l_brow", "r_brow"}), ("left_eye", {"l_eye"}), ("right_eye", {"r_eye"}),
    ("nose", {"nose"}), ("mouth_and_lips", {"mouth", "u_lip", "l_lip"}), ("lips", {"u_lip", "l_lip"}),
    ("ears", {"l_ear", "r_ear"}), ("hair", {"hair"}), ("neck", {"neck"}), ("background", {"background"}),
    ("whole_face", {"skin", "l_brow", "r_brow", "l_eye", "r_eye", "eyeglasses", "nose", "mouth", "u_lip", "l_lip"}),
    ("head", {"skin", "l_brow", "r_brow", "l_eye", "r_eye", "eyeglasses", "nose", "mouth", "u_lip", "l_lip",
              "l_ear", "r_ear", "earring", "hair", "hat"}),
])
def test_region_mapping_on_synthetic_parse(region, names):
    mask = regions.region_mask(synthetic_parse(), region)
    assert mask.shape == (1, 76, 8) and mask.dtype == torch.float32
    for label, name in enumerate(LABELS):
        block = mask[0, label * 4:(label + 1) * 4]
        assert bool((block == (1.0 if name in names else 0.0)).all()), (region, name)


def test_region_union_and_names():
    mask = regions.region_mask(synthetic_parse(), ["hair", "neck"])
    assert mask.sum() == 2 * 4 * 8
    assert regions.parse_region_names("Whole face", " hair, neck ,") == ["whole_face", "hair", "neck"]
    with pytest.raises(InvalidInputError, match="Unknown face region 'beard'"):
        regions.parse_region_names("skin", "beard")


def test_parse_map_uses_celebamask_colours():
    colour = regions.colour_parse_map(synthetic_parse())
    assert colour.shape == (1, 76, 8, 3)
    expected = {"background": (0, 0, 0), "skin": (204, 0, 0), "nose": (76, 153, 0), "hair": (0, 0, 204),
                "l_eye": (51, 51, 255), "u_lip": (255, 255, 0), "neck": (255, 153, 51), "cloth": (0, 204, 0)}
    for name, rgb in expected.items():
        got = (colour[0, L[name] * 4, 0] * 255).round().int().tolist()
        assert tuple(got) == rgb, name
    assert len({tuple(c) for c in regions.PALETTE.tolist()}) == 19


def test_grow_shrink_and_feather():
    mask = torch.zeros(2, 64, 64)
    mask[:, 20:40, 20:40] = 1.0
    grown = regions.grow_mask(mask, 5)
    ys, xs = torch.nonzero(grown[0], as_tuple=True)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (15, 44, 15, 44)
    assert grown[0, 15, 15] == 0  # corners are cut: an octagon, not a square
    shrunk = regions.grow_mask(mask, -3)
    ys, xs = torch.nonzero(shrunk[0], as_tuple=True)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (23, 36, 23, 36)
    soft = regions.shape_mask(mask, 0, 6)
    assert soft.shape == mask.shape and float(soft.min()) >= 0 and float(soft.max()) <= 1
    assert soft[0, 30, 30] > 0.99 and soft[0, 5, 5] < 0.01 and 0.3 < soft[0, 30, 20] < 0.7
    assert torch.equal(regions.shape_mask(mask, 0, 0), mask)


@pytest.mark.parametrize("shape", [(1, 32, 32), (64, 32), (3, 64, 64), (1, 64, 64, 3), (2, 2, 64, 64)])
def test_wrong_mask_sizes_give_clear_errors(shape):
    with pytest.raises(InvalidInputError, match=r"\[2, 64, 64\]"):
        regions.coerce_mask(torch.zeros(shape), 2, 64, 64)


def test_mask_shapes_that_are_accepted():
    assert regions.coerce_mask(torch.ones(64, 64), 2, 64, 64).shape == (2, 64, 64)
    assert regions.coerce_mask(torch.ones(1, 64, 64, 1), 2, 64, 64).shape == (2, 64, 64)
    with pytest.raises(InvalidInputError, match="MASK tensor"):
        regions.coerce_mask(np.ones((64, 64)), 1, 64, 64)


# ---------------------------------------------------------------------- crop / paste-back pipeline

class BrightIsSkin(nn.Module):
    """A stand-in network: 'skin' where the (normalised) input is bright, background elsewhere."""

    def forward(self, x):
        brightness = x.mean(dim=1, keepdim=True)
        logits = torch.zeros(x.shape[0], 19, *x.shape[2:])
        logits[:, 1:2] = brightness * 10.0
        return logits


class EyesEverywhere(nn.Module):
    """'r_eye' wherever the input is bright: tests the side re-assignment."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 19, *x.shape[2:])
        logits[:, L["r_eye"]:L["r_eye"] + 1] = x.mean(dim=1, keepdim=True) * 10.0
        return logits


def square_face(x0, y0, size) -> Face:
    kps = np.array([[x0 + 0.3 * size, y0 + 0.35 * size], [x0 + 0.7 * size, y0 + 0.35 * size],
                    [x0 + 0.5 * size, y0 + 0.55 * size], [x0 + 0.35 * size, y0 + 0.75 * size],
                    [x0 + 0.65 * size, y0 + 0.75 * size]], np.float32)
    return Face(bbox=np.array([x0, y0, x0 + size, y0 + size], np.float32), score=1.0, kps=kps)


@pytest.mark.parametrize("x0, y0, size", [(100, 80, 60), (0, 10, 90), (150, 130, 70)])
def test_paste_back_lands_on_the_right_pixels(x0, y0, size):
    """A white square the size of the face box, parsed with a crop that runs off the image, comes back in place."""
    image = torch.zeros(1, 200, 240, 3)
    image[0, y0:y0 + size, x0:x0 + size] = 1.0
    analysis = FaceAnalysis(faces=[[square_face(x0, y0, size)]], image_sizes=[(200, 240)], backend="t", model_id="t")
    parser = FaceParser(kind="bisenet", name="stub", model=BrightIsSkin(), device="cpu")
    result = parse_faces(parser, image, analysis)
    skin = result.labels[0] == L["skin"]
    expected = image[0, :, :, 0] > 0.5
    disagreement = (skin != expected).sum().item()
    assert disagreement <= 4 * size  # at most about one pixel along the square's outline
    assert result.faces_parsed == [1]


def test_sides_follow_the_image_whatever_the_network_says():
    image = torch.zeros(1, 120, 160, 3)
    face = square_face(40, 20, 80)
    for x, y in face.kps[:2].astype(int):
        image[0, y - 4:y + 4, x - 6:x + 6] = 1.0
    analysis = FaceAnalysis(faces=[[face]], image_sizes=[(120, 160)], backend="t", model_id="t")
    parser = FaceParser(kind="bisenet", name="stub", model=EyesEverywhere(), device="cpu")
    labels = parse_faces(parser, image, analysis).labels[0]
    (lx, ly), (rx, ry) = face.kps[:2].astype(int)
    assert labels[ly, lx] == L["l_eye"] and labels[ry, rx] == L["r_eye"]


def test_bisenet_runs_in_the_pipeline_batched():
    model = BiSeNet().eval()
    parser = FaceParser(kind="bisenet", name="random", model=model, device="cpu", batch_size=2)
    analysis = FaceAnalysis(faces=[[square_face(10, 10, 40)], [square_face(30, 30, 50)]],
                            image_sizes=[(100, 128)] * 2, backend="t", model_id="t")
    result = face_regions(parser, torch.rand(2, 100, 128, 3), analysis, ["whole_face"], grow=2, feather=2)
    assert result.mask.shape == (2, 100, 128) and result.parse_map.shape == (2, 100, 128, 3)
    assert result.labels.dtype == torch.uint8 and int(result.labels.max()) < 19


def test_overlapping_crops_do_not_erase_each_other():
    """Two faces whose crops overlap: each one's background must not overwrite the other's skin."""
    image = torch.zeros(2, 120, 200, 3)
    faces = [square_face(30, 30, 50), square_face(110, 40, 50)]
    for face in faces:
        x0, y0, x1, y1 = face.bbox.astype(int)
        image[:, y0:y1, x0:x1] = 1.0
    analysis = FaceAnalysis(faces=[faces, faces[::-1]], image_sizes=[(120, 200)] * 2, backend="t", model_id="t")
    parser = FaceParser(kind="bisenet", name="stub", model=BrightIsSkin(), device="cpu", batch_size=3)
    labels = parse_faces(parser, image, analysis).labels
    expected = image[..., 0] > 0.5
    assert ((labels == L["skin"]) != expected).sum() <= 2 * 4 * 50 * 2
    only_second = parse_faces(parser, image, analysis, face_index=1).labels
    assert (only_second[0, 30:80, 30:80] == L["skin"]).float().mean() < 0.5  # face 0 was not parsed...
    assert (only_second[0, 40:90, 110:160] == L["skin"]).float().mean() > 0.9  # ...face 1 was


# ------------------------------------------------------------------------------ landmark fallback

@functools.lru_cache(maxsize=1)
def astronaut_with_68():
    dlib = pytest.importorskip("dlib")
    import skimage.data

    models = os.path.join(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0], "models")
    image = skimage.data.astronaut()
    rect = max(dlib.get_frontal_face_detector()(image, 0), key=lambda r: r.area())
    shape = dlib.shape_predictor(os.path.join(models, "shape_predictor_68_face_landmarks.dat"))(image, rect)
    points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
    kps = np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])
    box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], np.float32)
    face = Face(bbox=box, score=1.0, kps=kps.astype(np.float32), landmarks=points, landmark_kind="68")
    return image, face


def _astronaut_inputs(dense: bool = True):
    image, face = astronaut_with_68()
    if not dense:
        from dataclasses import replace
        face = replace(face, landmarks=None, landmark_kind=None)
    analysis = FaceAnalysis(faces=[[face]], image_sizes=[image.shape[:2]], backend="dlib", model_id="dlib:test")
    return torch.from_numpy(image).float()[None] / 255.0, face, analysis


@pytest.mark.parametrize("dense", [True, False])
def test_landmark_fallback_masks_on_astronaut(dense):
    image, face, analysis = _astronaut_inputs(dense)
    x0, y0, x1, y1 = face.bbox
    # The landmarks may reach a little past dlib's tight box; the parts must lie within it grown by 10 %.
    pad = 0.1 * (x1 - x0)
    inside = torch.zeros(image.shape[1:3], dtype=torch.bool)
    inside[int(y0 - pad):int(y1 + pad) + 1, int(x0 - pad):int(x1 + pad) + 1] = True
    areas = {}
    for region in ("left_eye", "right_eye", "nose", "mouth_and_lips", "brows", "skin"):
        mask = face_regions(landmark_parser(), image, analysis, [region]).mask[0]
        assert mask.shape == image.shape[1:3]
        areas[region] = float(mask.sum())
        assert areas[region] > 20, region
        if region == "skin":  # the forehead rises above dlib's brow-to-chin box; most skin is inside it
            assert float(mask[inside].sum()) > 0.85 * areas[region]
        else:
            assert float(mask[~inside].sum()) == 0, f"{region} leaks outside the face box"
    left = face_regions(landmark_parser(), image, analysis, ["left_eye"]).mask[0]
    right = face_regions(landmark_parser(), image, analysis, ["right_eye"]).mask[0]
    assert torch.nonzero(left)[:, 1].float().mean() < face.kps[2, 0] < torch.nonzero(right)[:, 1].float().mean()
    assert areas["skin"] > 5 * areas["nose"] > 0
    assert face_regions(landmark_parser(), image, analysis, ["hair"]).mask.sum() == 0  # never guessed


def test_landmark_fallback_parts_sit_where_the_landmarks_are():
    image, face, analysis = _astronaut_inputs(True)
    labels = parse_faces(landmark_parser(), image, analysis).labels[0]
    p = face.landmarks.astype(int)
    assert labels[p[36:42, 1].mean().astype(int), p[36:42, 0].mean().astype(int)] == L["l_eye"]
    assert labels[p[29, 1], p[29, 0]] == L["nose"]
    assert labels[p[62, 1] - 3, p[62, 0]] in (L["u_lip"], L["mouth"])


def test_landmark_fallback_from_106_points_matches_68():
    from dataclasses import replace

    from likeness.face_analysis.pose import LANDMARKS_106_TO_68

    image, face, _ = _astronaut_inputs(True)
    dense106 = np.tile(face.landmarks.mean(0), (106, 1)).astype(np.float32)
    dense106[list(LANDMARKS_106_TO_68)] = face.landmarks
    face106 = replace(face, landmarks=dense106, landmark_kind="106")
    a = parse_faces(landmark_parser(), image, FaceAnalysis([[face]], [(512, 512)], "t", "t")).labels
    b = parse_faces(landmark_parser(), image, FaceAnalysis([[face106]], [(512, 512)], "t", "t")).labels
    assert torch.equal(a, b)


def test_kps_fallback_rejects_degenerate_keypoints():
    with pytest.raises(InvalidInputError, match="coincide"):
        labels_from_kps(np.zeros((5, 2)), np.array([0, 0, 10, 10]), 32, 32)
    with pytest.raises(InvalidInputError, match="5 finite keypoints"):
        labels_from_kps(np.full((5, 2), np.nan), np.array([0, 0, 10, 10]), 32, 32)


# --------------------------------------------------------------------------- batches and bad inputs

def test_batch_with_and_without_faces_and_image_kinds():
    image, face, _ = _astronaut_inputs(True)
    analysis = FaceAnalysis(faces=[[face], []], image_sizes=[(512, 512)] * 2, backend="t", model_id="t")
    batch = image.repeat(2, 1, 1, 1)
    result = face_regions(landmark_parser(), batch, analysis, ["whole_face"])
    assert result.mask[0].sum() > 0 and result.mask[1].sum() == 0
    assert any("image 1" in note for note in result.notes)
    gray = face_regions(landmark_parser(), batch[..., :1], analysis, ["nose"])
    rgba = face_regions(landmark_parser(), torch.cat([batch, torch.ones_like(batch[..., :1])], -1), analysis, ["nose"])
    assert torch.equal(gray.mask, rgba.mask)
    nan = batch.clone()
    nan[1, :10] = float("nan")
    with pytest.raises(InvalidInputError, match="'image' image 1 has NaN/infinite pixels"):
        face_regions(landmark_parser(), nan, analysis, ["nose"])


def test_faces_analysed_at_another_resolution_are_rescaled():
    image, face, analysis = _astronaut_inputs(True)
    half = torch.nn.functional.interpolate(image.permute(0, 3, 1, 2), size=(256, 256)).permute(0, 2, 3, 1)
    full = face_regions(landmark_parser(), image, analysis, ["nose"]).mask
    small = face_regions(landmark_parser(), half, analysis, ["nose"]).mask
    assert small.shape == (1, 256, 256)
    assert abs(float(small.sum()) * 4 - float(full.sum())) < 0.25 * float(full.sum())


def test_bad_inputs_give_clear_errors():
    image, face, analysis = _astronaut_inputs(True)
    parser = landmark_parser()
    with pytest.raises(InvalidInputError, match="FACES describe 2 images but the image batch has 3"):
        face_regions(parser, image.repeat(3, 1, 1, 1), FaceAnalysis([[face], []], [(512, 512)] * 2, "t", "t"), ["nose"])
    with pytest.raises(InvalidInputError, match="another aspect ratio"):
        face_regions(parser, image[:, :, :300], analysis, ["nose"])
    with pytest.raises(InvalidInputError, match=r"mask has shape \[1, 100, 100\]"):
        face_regions(parser, image, analysis, ["nose"], limit_mask=torch.ones(1, 100, 100))
    with pytest.raises(InvalidInputError, match="channels"):
        face_regions(parser, torch.zeros(1, 64, 64, 5), analysis, ["nose"])
    with pytest.raises(InvalidInputError, match="FACE_PARSER"):
        face_regions("bisenet", image, analysis, ["nose"])
    with pytest.raises(InvalidInputError, match="FACES"):
        face_regions(parser, image, {"faces": []}, ["nose"])
    with pytest.raises(InvalidInputError, match="crop_scale"):
        face_regions(parser, image, analysis, ["nose"], crop_scale=0.5)
    with pytest.raises(InvalidInputError, match="Unknown face region"):
        face_regions(parser, image, analysis, ["teeth"])
    limited = face_regions(parser, image, analysis, ["whole_face"], limit_mask=torch.zeros(512, 512))
    assert limited.mask.sum() == 0


# -------------------------------------------------------------------------------------------- nodes

def test_nodes_loader_and_regions(tmp_path, monkeypatch):
    from face_fixtures import use_models_dir
    from likeness.nodes.face_parsing import FaceParserLoader, FaceRegions

    root = use_models_dir(monkeypatch, str(tmp_path / "models"))
    os.makedirs(os.path.join(root, "likeness", "parsing"))
    torch.save(state_dict_from_layout(), os.path.join(root, "likeness", "parsing", "79999_iter.pth"))
    choices = FaceParserLoader.INPUT_TYPES()["required"]["parser"][0]
    assert choices == ["79999_iter.pth", LANDMARKS_CHOICE]
    (bisenet,) = FaceParserLoader().load("79999_iter.pth", "cpu")
    assert bisenet.kind == "bisenet" and isinstance(bisenet.model, BiSeNet)
    with pytest.raises(ModelFileError, match="79999_iter.pth"):
        FaceParserLoader().load("missing.pth", "auto")
    (fallback,) = FaceParserLoader().load(LANDMARKS_CHOICE, "auto")

    image, _, analysis = _astronaut_inputs(True)
    mask, parse_map = FaceRegions().regions(image, analysis, fallback, "left_eye", 3, 2, extra_regions="right_eye")
    assert mask.shape == (1, 512, 512) and parse_map.shape == (1, 512, 512, 3)
    both = FaceRegions().regions(image, analysis, fallback, "eyes", 3, 2)[0]
    assert torch.allclose(mask, both)
    with pytest.raises(InvalidInputError, match="Face Parser Loader"):
        FaceRegions().regions(image, analysis, "nope", "nose", 0, 0)
