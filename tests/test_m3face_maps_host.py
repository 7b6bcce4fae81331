"""M3Face map nodes in ComfyUI's real executor on a real photo (skimage's astronaut, dlib 68 landmarks, the
landmark parser): segmentation map -> palette learnt back from it -> the map redrawn with the learnt palette;
landmark map -> style learnt back from it."""
from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.host


def _saved(host_env, outputs: dict, node_id: str) -> np.ndarray:
    from PIL import Image

    (item,) = outputs[node_id]["images"]
    return np.asarray(Image.open(os.path.join(host_env.output, item["subfolder"], item["filename"])).convert("RGB"))


def _analyze(image: list) -> dict:
    return {"class_type": "LikenessAnalyzeFaces", "inputs": {
        "analyzer": ["2", 0], "image": image, "selection": "largest", "face_index": 0, "on_no_face": "error",
        "retry": True}}


def m3face_map_prompt(image_name: str) -> dict:
    save = lambda source, prefix: {"class_type": "SaveImage", "inputs": {"images": source, "filename_prefix": prefix}}  # noqa: E731
    framing = {"size": 512, "framing": "face", "crop_scale": 2.2, "face_index": -1}
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "LikenessDlibFaceLoader", "inputs": {
            "detector": "HOG", "landmarks": "68", "jitters": 0, "det_size": 1600, "upsample": 0}},
        "3": _analyze(["1", 0]),
        "4": {"class_type": "LikenessFaceParserLoader", "inputs": {"parser": "landmarks (no weights)", "device": "cpu"}},
        "5": {"class_type": "LikenessM3FaceSegmentationMap", "inputs": {
            "image": ["1", 0], "faces": ["3", 0], "parser": ["4", 0], "palette": "dml_csr_voc", **framing}},
        "6": save(["5", 0], "likeness_m3face_segmentation"),
        "7": save(["5", 1], "likeness_m3face_crop"),
        "8": _analyze(["5", 1]),
        "9": {"class_type": "LikenessM3FacePaletteFromMask", "inputs": {
            "mask_image": ["5", 0], "photo": ["5", 1], "faces": ["8", 0], "parser": ["4", 0],
            "base_palette": "celebamask_hq", "erode": 2, "colour_radius": 24.0, "snap": 3, "crop_scale": 2.2}},
        "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}},
        "11": {"class_type": "PreviewAny", "inputs": {"source": ["9", 1]}},
        "12": {"class_type": "LikenessM3FaceSegmentationMap", "inputs": {
            "image": ["5", 1], "faces": ["8", 0], "parser": ["4", 0], "palette": "celebamask_hq",
            "palette_json": ["9", 0], **{**framing, "framing": "image"}}},
        "13": save(["12", 0], "likeness_m3face_segmentation_learnt"),
        "14": {"class_type": "LikenessM3FaceLandmarkMap", "inputs": {
            "image": ["1", 0], "faces": ["3", 0], "style": "default", **framing}},
        "15": save(["14", 0], "likeness_m3face_landmarks"),
        "16": {"class_type": "LikenessM3FaceLandmarkStyleFromSample", "inputs": {
            "sample_landmark_image": ["14", 0], "faces": ["8", 0], "base_style": "default"}},
        "17": {"class_type": "PreviewAny", "inputs": {"source": ["16", 0]}},
    }


def test_m3face_map_nodes_on_a_real_photo(execute_prompt, host_env):
    pytest.importorskip("dlib")
    import skimage.data
    from PIL import Image

    from likeness.techniques.m3face import classes, landmarks, palette

    image_name = "likeness_m3face_astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(os.path.join(host_env.input, image_name))
    outputs = execute_prompt(m3face_map_prompt(image_name))

    voc = palette.shipped_palette("dml_csr_voc")
    segmentation = _saved(host_env, outputs, "6")
    assert segmentation.shape == (512, 512, 3) and _saved(host_env, outputs, "7").shape == (512, 512, 3)
    found = palette.labels_from_colours(segmentation, voc, max_distance=0)
    assert (found != palette.UNMATCHED).all()   # every pixel is a palette colour
    names = {classes.m3face_classes()[i] for i in np.unique(found)}
    assert {"background", "skin", "nose", "l_eye", "r_eye", "u_lip", "l_lip"} <= names

    learnt, _ = palette.parse_palette_json(outputs["10"]["text"][0])
    report = outputs["11"]["text"][0]
    learnt_names = [line.split(":")[0] for line in report.splitlines() if "px agree" in line]
    assert {"skin", "nose", "l_eye", "r_eye", "u_lip", "l_lip"} <= set(learnt_names)
    assert all(learnt.colours[n] == voc.colours[n] for n in learnt_names), report
    redrawn = _saved(host_env, outputs, "13")   # the crop parsed again, drawn with the learnt palette
    skin = np.array(voc.colours["skin"])
    assert (redrawn == skin).all(axis=-1).sum() > 0.5 * (segmentation == skin).all(axis=-1).sum()

    drawing = _saved(host_env, outputs, "15")
    default = landmarks.shipped_style()
    assert drawing.shape == (512, 512, 3) and (drawing == default.groups[0].colour).all(axis=-1).sum() > 300
    style = landmarks.parse_style_json(outputs["17"]["text"][0])
    assert style.canvas == (0, 0, 0) and [g.colour for g in style.groups] == [g.colour for g in default.groups]
    assert style.thickness in (2, 3)


def test_m3face_nodes_refuse_bad_input_with_the_input_named(execute_prompt, host_env):
    pytest.importorskip("dlib")
    import skimage.data
    from PIL import Image

    from likeness.cli.runner import PromptExecutionError

    blank = "likeness_m3face_blank.png"
    Image.fromarray(np.full((128, 128, 3), 200, np.uint8)).save(os.path.join(host_env.input, blank))
    prompt = {k: v for k, v in m3face_map_prompt(blank).items() if k in ("1", "2", "3", "4", "5", "6")}
    prompt["3"]["inputs"]["on_no_face"] = "pass_through"
    with pytest.raises(PromptExecutionError) as error:
        execute_prompt(prompt)
    assert error.value.details.get("exception_type") == "likeness.NoFaceError"
    assert "no face was found in 'image'" in error.value.details.get("exception_message", "")

    photo = "likeness_m3face_astronaut_bad_palette.png"
    Image.fromarray(skimage.data.astronaut()).save(os.path.join(host_env.input, photo))
    prompt = {k: v for k, v in m3face_map_prompt(photo).items() if k in ("1", "2", "3", "4", "5", "6")}
    prompt["5"]["inputs"]["palette_json"] = '{"skin": [1, 2, 3], "moustache": [4, 5, 6]}'
    with pytest.raises(PromptExecutionError) as error:
        execute_prompt(prompt)
    assert error.value.details.get("exception_type") == "likeness.InvalidInputError"
    assert "moustache" in error.value.details["exception_message"]
    assert "palette_json" in error.value.details["exception_message"]
