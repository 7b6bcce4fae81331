"""M3Face condition maps from photos: class orders by name, palettes, label map <-> colours, palette
calibration (PNG and JPEG round trips), framing, landmark styles and drawing, style calibration, bad inputs."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from likeness.errors import InvalidInputError, NoFaceError
from likeness.face_analysis.parsing import landmark_parser, regions
from likeness.face_analysis.pose import LANDMARK_GROUPS, LANDMARKS_106_TO_68
from likeness.face_analysis.types import Face, FaceAnalysis
from likeness.techniques.m3face import calibrate, classes, framing, landmarks, palette, segmentation

M3 = classes.M3FACE_ORDER
BISENET = classes.PACK_PARSER_ORDER


def jpeg(rgb: np.ndarray, quality: int = 90) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def face_like_labels(size: int = 512, seed: int = 0) -> np.ndarray:
    """An M3Face-order label map holding every class: nested ellipses roughly where a portrait has them."""
    import cv2

    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.uint8)
    s = size / 512.0
    parts = [("cloth", (256, 480), (220, 60)), ("neck", (256, 400), (70, 80)), ("neck_l", (256, 440), (60, 10)),
             ("hair", (256, 200), (170, 190)), ("hat", (256, 40), (120, 30)), ("skin", (256, 250), (120, 150)),
             ("l_ear", (130, 260), (20, 40)), ("r_ear", (382, 260), (20, 40)), ("ear_r", (130, 310), (8, 8)),
             ("l_brow", (205, 195), (35, 8)), ("r_brow", (307, 195), (35, 8)), ("eye_g", (256, 225), (110, 12)),
             ("l_eye", (205, 228), (22, 10)), ("r_eye", (307, 228), (22, 10)), ("nose", (256, 280), (22, 40)),
             ("u_lip", (256, 332), (45, 12)), ("l_lip", (256, 360), (42, 13)), ("mouth", (256, 346), (30, 7))]
    names = classes.m3face_classes()
    for name, centre, axes in parts:
        jitter = rng.integers(-4, 5, 2)
        centre = (int((centre[0] + jitter[0]) * s), int((centre[1] + jitter[1]) * s))
        cv2.ellipse(labels, centre, (int(axes[0] * s), int(axes[1] * s)), 0, 0, 360, names.index(name), -1)
    return labels


def known_colours() -> list[tuple[int, int, int]]:
    return [c for name in palette.shipped_palette_names() for c in palette.shipped_palette(name).colours.values()]


def permuted_known_palette(seed: int = 3) -> palette.Palette:
    """Colours of the shipped palettes, distinct and far apart, given to the classes in a shuffled order."""
    rng = np.random.default_rng(seed)
    pool = list(dict.fromkeys(known_colours()))
    rng.shuffle(pool)
    chosen: list[tuple[int, int, int]] = []
    for colour in pool:
        if all(np.linalg.norm(np.subtract(colour, c)) > 60 for c in chosen):
            chosen.append(colour)
    assert len(chosen) >= 19
    return palette.Palette("permuted", dict(zip(classes.m3face_classes(), chosen[:19], strict=True)))


def random_palette(seed: int = 1) -> palette.Palette:
    rng = np.random.default_rng(seed)
    chosen: list[tuple[int, int, int]] = []
    while len(chosen) < 19:
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if all(np.linalg.norm(np.subtract(colour, c)) > 60 for c in chosen):
            chosen.append(colour)
    return palette.Palette("random", dict(zip(classes.m3face_classes(), chosen, strict=True)))


# ---------------------------------------------------------------------------------- class orders

def test_the_bisenet_order_is_the_pack_parsers_order():
    assert classes.label_order(BISENET).labels == regions.LABELS


def test_class_names_map_across_both_19_class_orders():
    to_m3 = classes.index_map(BISENET, M3)
    to_bisenet = classes.index_map(M3, BISENET)
    assert sorted(to_m3.tolist()) == list(range(19))
    assert np.array_equal(to_bisenet[to_m3], np.arange(19)) and np.array_equal(to_m3[to_bisenet], np.arange(19))
    bisenet, m3 = regions.LABEL, classes.m3face_classes()
    pairs = {"eyeglasses": "eye_g", "earring": "ear_r", "necklace": "neck_l", "hair": "hair", "nose": "nose",
             "l_brow": "l_brow", "neck": "neck", "cloth": "cloth", "hat": "hat", "background": "background"}
    for bisenet_name, m3_name in pairs.items():
        assert m3[to_m3[bisenet[bisenet_name]]] == m3_name
    assert not np.array_equal(to_m3, np.arange(19))   # the orders really differ: an index copy would be wrong


def test_a_label_map_renders_the_same_from_either_order():
    rng = np.random.default_rng(0)
    in_bisenet = rng.integers(0, 19, (2, 20, 30)).astype(np.uint8)
    in_m3 = classes.convert_labels(in_bisenet, BISENET, M3)
    assert in_m3.dtype == np.uint8
    assert np.array_equal(classes.convert_labels(in_m3, M3, BISENET), in_bisenet)
    as_tensor = classes.convert_labels(torch.from_numpy(in_bisenet), BISENET, M3)
    assert torch.equal(as_tensor, torch.from_numpy(in_m3))
    chosen = palette.shipped_palette()
    by_names = np.array(regions.LABELS)[in_bisenet]
    expected = palette.render_label_map(by_names, chosen)
    assert np.array_equal(palette.render_label_map(in_m3, chosen), expected)
    assert np.array_equal(palette.render_label_map(in_bisenet, chosen, order=BISENET), expected)
    with pytest.raises(InvalidInputError, match="outside 0..18"):
        classes.convert_labels(np.array([[19]]), BISENET, M3)


def test_class_names_are_folded_and_unknown_names_refused():
    assert classes.canonical_name(" Eyeglasses ") == "eye_g"
    assert classes.canonical_name("l-brow") == "l_brow"
    with pytest.raises(InvalidInputError, match="unknown face class"):
        classes.canonical_name("moustache")


# --------------------------------------------------------------------------------------- palettes

def test_shipped_palettes_are_the_documented_colour_lists():
    assert palette.shipped_palette_names()[0] == palette.DEFAULT_PALETTE
    celebamask = palette.shipped_palette("celebamask_hq")
    assert np.array_equal(celebamask.array(BISENET), regions.PALETTE)   # the parser's own colours, by name
    voc = palette.shipped_palette("dml_csr_voc").array(M3)
    for index in range(19):   # PASCAL-VOC bit interleave, indexed in DML-CSR's order
        expected, label = [0, 0, 0], index
        for bit in range(8):
            for channel in range(3):
                expected[channel] |= ((label >> channel) & 1) << (7 - bit)
            label >>= 3
        assert voc[index].tolist() == expected


def test_palette_json_round_trip_and_folding():
    chosen = random_palette()
    text = palette.palette_to_json(chosen)
    back, notes = palette.parse_palette_json(text)
    assert back.colours == chosen.colours and not notes and list(back.colours) == list(classes.m3face_classes())
    bare = {"Eyeglasses": [1, 2, 3], "skin": [4, 5, 6]}
    partial, notes = palette.parse_palette_json(json.dumps(bare), base=palette.shipped_palette())
    assert partial.colours["eye_g"] == (1, 2, 3) and partial.colours["hair"] == palette.shipped_palette().colours["hair"]
    assert len(notes) == 1 and "celebamask_hq" in notes[0] and "hair" in notes[0]


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"skin": [1, 2, 3]}', "lacks the classes"),
    ('{"skin": [1, 2, 300]}', "three integers"),
    ('{"skin": "red"}', "three integers"),
    ('{"moustache": [1, 2, 3]}', "unknown face class"),
    ('{"eye_g": [1, 2, 3], "eyeglasses": [1, 2, 3]}', "twice"),
    ('[1, 2, 3]', "JSON object"),
    ('{"format": "other", "classes": {}}', "format"),
])
def test_bad_palette_json_is_refused_with_the_input_named(text, message):
    with pytest.raises(InvalidInputError, match=message) as caught:
        palette.parse_palette_json(text, "palette_json")
    assert "palette_json" in str(caught.value)


def test_labels_from_colours_inverts_rendering():
    labels = face_like_labels(128)
    for chosen in (palette.shipped_palette("celebamask_hq"), palette.shipped_palette("dml_csr_voc"), random_palette()):
        rgb = palette.render_label_map(labels, chosen)
        assert np.array_equal(palette.labels_from_colours(rgb, chosen), labels)
        as_image = torch.from_numpy(rgb[None].astype(np.float32) / 255.0)   # an IMAGE batch works too
        assert np.array_equal(palette.labels_from_colours(as_image, chosen)[0], labels)
    rgb = palette.render_label_map(labels, palette.shipped_palette())
    rgb[0, 0] = (7, 250, 120)   # far from every colour
    found = palette.labels_from_colours(rgb, palette.shipped_palette(), max_distance=10)
    assert found[0, 0] == palette.UNMATCHED and np.array_equal(found[1:], labels[1:])


# -------------------------------------------------------------------------------- calibration

@pytest.mark.parametrize("make", [lambda: palette.shipped_palette("celebamask_hq"),
                                  lambda: palette.shipped_palette("dml_csr_voc"), permuted_known_palette, random_palette])
@pytest.mark.parametrize("quality", [None, 90])
def test_palette_round_trip_png_and_jpeg(make, quality):
    """A map rendered with P, calibrated back from its image (PNG, or JPEG at quality 90), gives P exactly.

    Exact recovery after JPEG needs P's colours among the known palette colours (the snapping targets):
    JPEG's colour conversion moves some colours by 1-2 levels and nothing in the image tells which.
    For any other P the JPEG result is within 2 levels (checked on the random palette).
    """
    chosen = make()
    labels = face_like_labels()
    rgb = palette.render_label_map(labels, chosen)
    image = rgb if quality is None else jpeg(rgb, quality)
    base = palette.shipped_palette("dml_csr_voc" if chosen.name == "celebamask_hq" else "celebamask_hq")
    result = calibrate.calibrate_palette(image, labels, base, known_colours())
    assert not result.missing and not result.shared
    if quality is not None and chosen.name == "random":
        for name, colour in chosen.colours.items():
            assert np.abs(np.subtract(result.palette.colours[name], colour)).max() <= 2, name
        return
    assert result.palette.colours == chosen.colours
    assert not result.unmatched and not calibrate.warning_lines(result)


def test_calibration_reports_unmatched_shared_and_missing():
    labels = face_like_labels(256)
    names = classes.m3face_classes()
    chosen = random_palette()
    merged = chosen.with_colours({"l_lip": chosen.colours["u_lip"]}, "merged lips")   # a mask with one lip colour
    rgb = palette.render_label_map(labels, merged)
    parse = labels.copy()
    parse[np.isin(parse, [names.index("hair"), names.index("hat")])] = 0   # a parser that cannot see hair or hats
    parse[parse == names.index("r_eye")] = names.index("l_eye")            # ... calls both eyes l_eye
    parse[parse == names.index("nose")] = names.index("r_eye")             # ... and the nose r_eye
    result = calibrate.calibrate_palette(rgb, parse, palette.shipped_palette(), snap=0)
    eyes = {chosen.colours["l_eye"], chosen.colours["r_eye"]}
    assert result.palette.colours["l_eye"] in eyes
    assert {c.colour for c in result.unmatched} == {chosen.colours["hair"], chosen.colours["hat"]} | (
        eyes - {result.palette.colours["l_eye"]})
    assert "nose" in result.missing and result.palette.colours["nose"] == palette.shipped_palette().colours["nose"]
    assert result.palette.colours["r_eye"] == chosen.colours["nose"]
    assert sorted(next(iter(result.shared.values()))) == ["l_lip", "u_lip"] and len(result.shared) == 1
    warnings = "\n".join(calibrate.warning_lines(result))
    assert f"unmatched mask colour {list(chosen.colours['hair'])}" in warnings
    assert "taken by u_lip, l_lip" in warnings
    report = "\n".join(calibrate.report_lines(result))
    assert "kept from the base palette: nose" in report and report.count("WARNING") == len(warnings.splitlines())


def test_a_part_too_thin_for_jpeg_is_estimated_and_flagged():
    """A 3-pixel stripe's colour cannot survive 4:2:0 JPEG (colour at half resolution): it is marked, not hidden."""
    labels = face_like_labels()
    names = classes.m3face_classes()
    labels[labels == names.index("mouth")] = names.index("u_lip")
    labels[343:346, 226:286] = names.index("mouth")
    chosen = random_palette()
    result = calibrate.calibrate_palette(jpeg(palette.render_label_map(labels, chosen)), labels,
                                         palette.shipped_palette(), snap=0)
    assert "mouth" in result.estimated
    assert any(line.startswith("mouth got") for line in calibrate.warning_lines(result))
    lossless = calibrate.calibrate_palette(palette.render_label_map(labels, chosen), labels, palette.shipped_palette())
    assert lossless.palette.colours == chosen.colours and not calibrate.warning_lines(lossless)


def test_dominant_colours_cluster_jpeg_noise():
    labels = face_like_labels(256)
    chosen = palette.shipped_palette()
    found = calibrate.dominant_colours(jpeg(palette.render_label_map(labels, chosen)))
    big = {c.colour for c in found.clusters if c.share > 0.01}
    expected = {chosen.colours[n] for n, share in zip(classes.m3face_classes(),
                                                        np.bincount(labels.ravel(), minlength=19) / labels.size,
                                                        strict=True) if share > 0.02}
    assert len(big) >= len(expected)
    for colour in expected:   # each big flat region gives a cluster within 2 levels of its colour
        assert min(np.abs(np.subtract(colour, c)).max() for c in big) <= 2


# ----------------------------------------------------------------------------------------- framing

def test_face_window_geometry_and_crop():
    face = Face(bbox=np.array([40, 50, 80, 100], np.float32), score=1.0,
                kps=np.array([[50, 70], [70, 70], [60, 80], [52, 90], [68, 90]], np.float32),
                landmarks=np.array([[40.0, 50.0], [80.0, 100.0]], np.float32))
    analysis = FaceAnalysis(faces=[[face]], image_sizes=[(200, 300)], backend="t", model_id="t")
    (window,), notes = framing.face_windows(analysis, 1, 200, 300, "face", 2.0)
    assert (window.x0, window.y0, window.side) == (10.0, 25.0, 100.0) and not notes
    moved = framing.faces_in_window(window, 50)[0]
    assert moved.bbox.tolist() == [15.0, 12.5, 35.0, 37.5] and moved.landmarks[1].tolist() == [35.0, 37.5]
    image = torch.rand(200, 300, 3)
    exact = framing.crop_window(image, framing.Window(0, 10.0, 25.0, 100.0, [face]), 100)
    assert torch.allclose(exact, image[25:125, 10:110], atol=1e-4)   # scale 1: the crop is the slice
    (whole,), _ = framing.face_windows(analysis, 1, 200, 300, "image")
    assert (whole.x0, whole.y0, whole.side) == (0.0, -50.0, 300.0)
    letterboxed = framing.crop_window(image, whole, 300)
    assert letterboxed[:50].abs().max() == 0 and torch.allclose(letterboxed[50:250], image, atol=1e-4)


def test_no_face_and_bad_inputs_are_typed_errors():
    empty = FaceAnalysis(faces=[[]], image_sizes=[(64, 64)], backend="t", model_id="t")
    with pytest.raises(NoFaceError, match="no face was found in 'image'"):
        segmentation.segmentation_maps(landmark_parser(), torch.rand(1, 64, 64, 3), empty, palette.shipped_palette())
    with pytest.raises(InvalidInputError):
        segmentation.segmentation_maps(landmark_parser(), torch.rand(64, 3), empty, palette.shipped_palette())
    with pytest.raises(InvalidInputError, match="framing"):
        framing.face_windows(empty, 1, 64, 64, "portrait")
    face = Face(bbox=np.array([10, 10, 40, 40], np.float32), score=1.0, kps=np.full((5, 2), 25, np.float32))
    no_landmarks = FaceAnalysis(faces=[[face]], image_sizes=[(64, 64)], backend="t", model_id="t")
    with pytest.raises(InvalidInputError, match="68/106-point landmarks"):
        landmarks.landmark_maps(torch.rand(1, 64, 64, 3), no_landmarks, landmarks.shipped_style())
    with pytest.raises(InvalidInputError, match="another aspect ratio"):
        segmentation.labels_at_size(torch.zeros(10, 20, dtype=torch.long), 20, 20)


# ------------------------------------------------------------------------------------ real photo

def test_segmentation_map_of_a_real_photo_and_its_calibration():
    from test_face_parsing import _astronaut_inputs

    image, _, analysis = _astronaut_inputs()
    chosen = permuted_known_palette()
    result = segmentation.segmentation_maps(landmark_parser(), image, analysis, chosen)
    assert result.maps.shape == result.crops.shape == (1, 512, 512, 3) and result.sources == [0]
    rgb = palette.as_uint8_rgb(result.maps[0])
    assert np.array_equal(rgb, palette.render_label_map(result.labels[0], chosen))
    present = {classes.m3face_classes()[i] for i in torch.unique(result.labels).tolist()}
    assert {"skin", "nose", "l_eye", "r_eye", "l_brow", "u_lip", "l_lip", "neck"} <= present
    # The photo crop re-parsed (as the palette node does) gives back the map's colours, also through JPEG.
    labels, _ = segmentation.parse_to_m3face(landmark_parser(), result.crops,
                                             framing.window_analysis(analysis, framing.face_windows(
                                                 analysis, 1, 512, 512)[0], 512))
    calibration = calibrate.calibrate_palette(jpeg(rgb), labels[0].numpy(), palette.shipped_palette(), known_colours())
    learnt = {v.name for v in calibration.votes}
    assert learnt >= {"skin", "nose", "l_eye", "r_eye", "u_lip", "l_lip"}
    assert all(calibration.palette.colours[n] == chosen.colours[n] for n in learnt)


# -------------------------------------------------------------------------------- landmark styles

def test_default_style_is_the_packs_landmark_groups():
    style = landmarks.shipped_style()
    assert [(g.name, g.points[0], g.points[-1], g.closed, g.colour) for g in style.groups] == [
        (name, first, last, closed, colour) for name, first, last, closed, colour in LANDMARK_GROUPS]
    assert all(g.points == tuple(range(g.points[0], g.points[-1] + 1)) for g in style.groups)
    assert (style.canvas, style.draw, style.thickness) == ((0, 0, 0), "lines", 2)
    assert landmarks.parse_style_json(landmarks.style_to_json(style)) == style


@pytest.mark.parametrize("change, message", [
    ({"groups": []}, "non-empty 'groups'"),
    ({"groups": [{"points": [0, 68], "colour": [1, 2, 3]}]}, "0..67"),
    ({"groups": [{"points": [0, 1]}]}, "'colour'"),
    ({"draw": "dots"}, "draw must be one of"),
    ({"thickness": 0}, "1..64"),
    ({"canvas": [0, 0]}, "canvas"),
])
def test_bad_style_json_is_refused(change, message):
    data = json.loads(landmarks.style_to_json(landmarks.shipped_style()))
    data.update(change)
    with pytest.raises(InvalidInputError, match=message):
        landmarks.parse_style_json(json.dumps(data))
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        landmarks.parse_style_json("{")


def _square_face() -> np.ndarray:
    """68 points spread over a 512 canvas in the iBUG layout's rough places (only their groups matter here)."""
    rng = np.random.default_rng(0)
    points = np.zeros((68, 2))
    for index, (_, first, last, _, _) in enumerate(LANDMARK_GROUPS):
        count = last - first + 1
        points[first:last + 1, 0] = np.linspace(60, 450, count)
        points[first:last + 1, 1] = 40 + 50 * index + rng.uniform(-5, 5, count)
    return points


def test_landmark_drawing_follows_the_style():
    points = _square_face()
    style = landmarks.shipped_style()
    canvas = landmarks.draw_landmarks([points], 512, 512, style)
    for group in style.groups:
        x, y = np.rint(points[list(group.points)][:2].mean(axis=0)).astype(int)   # on its first segment
        assert tuple(canvas[y, x]) == group.colour, group.name
    assert tuple(canvas[5, 5]) == (0, 0, 0)
    grey = landmarks.style_from_dict({**json.loads(landmarks.style_to_json(style)), "canvas": [30, 30, 30],
                                      "draw": "points", "point_radius": 4})
    dots = landmarks.draw_landmarks([points], 512, 512, grey)
    x, y = np.rint(points[0]).astype(int)
    assert tuple(dots[y + 3, x]) == style.groups[0].colour and tuple(dots[y + 6, x]) == (30, 30, 30)
    thick = landmarks.draw_landmarks([points * 2], 1024, 1024, style)   # twice as long, twice as thick
    assert (thick != 0).any(axis=-1).sum() > 3.0 * (canvas != 0).any(axis=-1).sum()
    closed = [g for g in style.groups if g.closed][0]
    start, end = points[closed.points[0]], points[closed.points[-1]]
    x, y = np.rint((start + end) / 2).astype(int)
    assert tuple(canvas[y, x]) == closed.colour   # the closing segment is drawn


def test_106_point_landmarks_draw_through_the_68_point_map():
    rng = np.random.default_rng(1)
    points106 = rng.uniform(50, 450, (106, 2))
    style = landmarks.shipped_style()
    via_map = landmarks.draw_landmarks([points106[list(LANDMARKS_106_TO_68)]], 512, 512, style)
    assert np.array_equal(landmarks.draw_landmarks([points106], 512, 512, style), via_map)


def test_landmark_map_of_a_real_photo_is_per_face_and_512():
    from test_face_parsing import _astronaut_inputs

    image, face, analysis = _astronaut_inputs()
    double = FaceAnalysis(faces=[[face], [face, face]], image_sizes=[(512, 512)] * 2, backend="t", model_id="t")
    result = landmarks.landmark_maps(image.expand(2, -1, -1, -1), double, landmarks.shipped_style())
    assert result.maps.shape == (3, 512, 512, 3) and result.sources == [0, 1, 1]
    drawn = palette.as_uint8_rgb(result.maps[0])
    jaw = landmarks.shipped_style().groups[0].colour
    assert (drawn == jaw).all(axis=-1).sum() > 300 and torch.equal(result.maps[0], result.maps[1])


def test_style_calibration_from_a_jpeg_sample():
    from test_face_parsing import _astronaut_inputs

    _, face, _ = _astronaut_inputs()
    base = landmarks.shipped_style()
    rng = np.random.default_rng(5)
    colours = [tuple(int(v) for v in c) for c in rng.integers(60, 256, (len(base.groups), 3))]
    target = landmarks.LandmarkStyle("target", tuple(g.__class__(**{**g.__dict__, "colour": c})
                                                     for g, c in zip(base.groups, colours, strict=True)),
                                     canvas=(20, 20, 40), thickness=3)
    points = [face.landmarks * 2.0]   # the astronaut face drawn at twice its size: long enough strokes
    sample = landmarks.draw_landmarks(points, 1024, 1024, target)
    exact = landmarks.calibrate_style(sample, points, base)   # lossless: every colour exactly
    assert exact.style.canvas == (20, 20, 40) and exact.style.thickness == 3 and not exact.warnings
    assert [g.colour for g in exact.style.groups] == colours
    lossy = landmarks.calibrate_style(jpeg(sample, 90), points, base)   # JPEG: within its colour rounding
    got = [lossy.style.canvas] + [g.colour for g in lossy.style.groups]
    assert np.abs(np.subtract(got, [(20, 20, 40)] + colours)).max() <= 3
    assert lossy.style.thickness == 3 and not lossy.warnings


# ------------------------------------------------------------------------------------------- nodes

def test_palette_node_shows_unmatched_colours_on_the_node():
    from likeness.nodes.m3face_maps import M3FacePaletteFromMask, M3FaceSegmentationMap
    from test_face_parsing import _astronaut_inputs

    image, _, analysis = _astronaut_inputs()
    parser = landmark_parser()
    segmentation_map, crop, used = M3FaceSegmentationMap().draw(image, analysis, parser, "dml_csr_voc", 512, "image",
                                                                2.2, -1)
    assert palette.parse_palette_json(used)[0].colours == palette.shipped_palette("dml_csr_voc").colours
    mask = segmentation_map.clone()
    mask[0, :60, :] = torch.tensor([0.2, 0.9, 0.4])   # a band of a colour no parsed class has (hair, say)
    output = M3FacePaletteFromMask().calibrate(mask, image, analysis, parser, "celebamask_hq", 2, 24.0, 3, 2.2)
    palette_json, report, check = output["result"]
    assert any("unmatched mask colour [51, 230, 102]" in text for text in output["ui"]["text"])
    learnt, _ = palette.parse_palette_json(palette_json)
    assert learnt.colours["skin"] == palette.shipped_palette("dml_csr_voc").colours["skin"]
    assert "skin: [128, 0, 0]" in report and check.shape == (1, 512, 512, 3)
    with pytest.raises(InvalidInputError, match="'mask_image' holds 2 images"):
        M3FacePaletteFromMask().calibrate(mask.expand(2, -1, -1, -1), image, analysis, parser, "celebamask_hq", 2,
                                          24.0, 3, 2.2)
