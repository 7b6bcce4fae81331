"""Face analysis chains in ComfyUI's real executor (in-process): Load Image -> loader -> Analyze -> Align /
Paste Back / Embeds / Similarity, with the tiny insightface pack in the models folder and with dlib.

The parsing/pose engineer appends their nodes to :func:`face_chain` (node ids 30+ are theirs).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.host


def _save_input(host_env, name: str, array: np.ndarray) -> str:
    from PIL import Image

    Image.fromarray(array).save(os.path.join(host_env.input, name))
    return name


def face_chain(loader: dict, image_name: str, prefix: str) -> dict:
    """Load Image -> analyzer -> Analyze -> Align (224) -> Paste Back, Embeds -> Combine, Similarity."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": loader,
        "3": {"class_type": "LikenessAnalyzeFaces", "inputs": {
            "analyzer": ["2", 0], "image": ["1", 0], "selection": "largest", "face_index": 0,
            "on_no_face": "error", "retry": True}},
        "4": {"class_type": "LikenessAlignFaces", "inputs": {
            "faces": ["3", 0], "image": ["1", 0], "size": "224", "crop_scale": 1.0}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix + "_crop"}},
        "6": {"class_type": "LikenessPasteFacesBack", "inputs": {
            "image": ["1", 0], "faces": ["4", 1], "crops": ["4", 0], "feather": 8}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix + "_pasted"}},
        "8": {"class_type": "LikenessFaceEmbedsFromFaces", "inputs": {"faces": ["3", 0]}},
        "9": {"class_type": "LikenessCombineFaceEmbeds", "inputs": {
            "embeds": ["8", 0], "method": "normalized_mean", "outlier_threshold": 2.5}},
        "10": {"class_type": "LikenessFaceSimilarity", "inputs": {
            "analyzer": ["2", 0], "image": ["1", 0], "threshold": 0.0, "reference_embeds": ["9", 0]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["3", 1], "filename_prefix": prefix + "_preview"}},
    }


def _saved(host_env, outputs: dict, node_id: str) -> np.ndarray:
    from PIL import Image

    (item,) = outputs[node_id]["images"]
    return np.asarray(Image.open(os.path.join(host_env.output, item["subfolder"], item["filename"])))


def test_insightface_tiny_pack_chain_in_the_real_executor(execute_prompt, host_env):
    pytest.importorskip("insightface")
    from onnx_face_models import square_image, write_tiny_insightface_pack

    write_tiny_insightface_pack(os.path.join(host_env.models, "insightface", "models", "likeness_tiny"))
    image_name = _save_input(host_env, "likeness_squares.png", square_image(x=96, y=64))
    loader = {"class_type": "LikenessInsightFaceLoader", "inputs": {
        "pack": "likeness_tiny", "provider": "auto", "landmarks": "106", "det_size": 640, "det_threshold": 0.5}}
    outputs = execute_prompt(face_chain(loader, image_name, "likeness_face_isf"))
    assert _saved(host_env, outputs, "5").shape == (224, 224, 3)
    assert _saved(host_env, outputs, "7").shape == (480, 640, 3)
    report = outputs["10"]["text"][0]
    assert "insightface:likeness_tiny/w600k_r50" in report and "-> PASS" in report


def test_dlib_chain_on_the_astronaut_in_the_real_executor(execute_prompt, host_env):
    pytest.importorskip("dlib")
    import skimage.data

    image_name = _save_input(host_env, "likeness_face_astronaut.png", skimage.data.astronaut())
    loader = {"class_type": "LikenessDlibFaceLoader", "inputs": {
        "detector": "HOG", "landmarks": "68", "jitters": 0, "det_size": 1600, "upsample": 0}}
    outputs = execute_prompt(face_chain(loader, image_name, "likeness_face_dlib"))
    crop = _saved(host_env, outputs, "5").astype(np.float32)
    assert crop.shape == (224, 224, 3) and crop.std() > 10
    pasted = _saved(host_env, outputs, "7").astype(np.float32)
    original = skimage.data.astronaut().astype(np.float32)
    assert np.abs(pasted - original).mean() < 2.0                  # unedited crops paste back almost invisibly
    report = outputs["10"]["text"][0]
    assert "dlib:resnet_v1" in report and "L2 0.0000 -> PASS" in report


def test_no_face_error_names_the_image_in_the_real_executor(execute_prompt, host_env):
    pytest.importorskip("dlib")
    from likeness.cli.runner import PromptExecutionError

    image_name = _save_input(host_env, "likeness_face_blank.png", np.full((128, 128, 3), 90, np.uint8))
    loader = {"class_type": "LikenessDlibFaceLoader", "inputs": {
        "detector": "HOG", "landmarks": "5", "jitters": 0, "det_size": 1600, "upsample": 0}}
    prompt = face_chain(loader, image_name, "likeness_face_blank")
    with pytest.raises(PromptExecutionError) as error:
        execute_prompt(prompt)
    assert "No usable face in 1 of 1 image(s) (indices [0])" in str(error.value.details) + str(error.value)


def test_example_workflow_face_analysis_runs(execute_prompt, host_env):
    """The face-analysis example as shipped (dlib, landmark parser: no model files needed)."""
    pytest.importorskip("dlib")
    import skimage.data

    from host_support import example_prompt

    photo = skimage.data.astronaut()
    _save_input(host_env, "reference_portrait.png", photo)
    _save_input(host_env, "generated.png", np.ascontiguousarray(photo[:, ::-1]))
    prompt = example_prompt("Face analysis - first run, no downloads")
    outputs = execute_prompt(prompt)
    for node_id in ("4", "6", "12", "33", "34", "36"):
        assert outputs[node_id]["images"], node_id
    assert "-> PASS" in outputs["11"]["text"][0]
    saved = outputs["9"]["text"][0]
    assert saved.endswith(os.path.join("likeness", "embeds", "reference_identity.safetensors"))
