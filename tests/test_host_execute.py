"""A workflow through ComfyUI's real executor, in-process, on the tiny SD1.5 model with pack nodes.

Chain: tiny MODEL/CLIP/VAE (test-only loader) -> CLIPTextEncode x2 -> KSampler -> VAEDecode ->
Likeness "Analyze Faces" (dlib, pass-through when there is no face) -> SaveImage, and Likeness
"Face Identity Similarity" scoring the generated image and a real photo against the photo's face.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.host


def _astronaut_into_input(host_env) -> str:
    import skimage.data
    from PIL import Image

    name = "likeness_astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(os.path.join(host_env.input, name))
    return name


def txt2img_prompt(prefix: str = "likeness_host_execute") -> dict:
    return {
        "1": {"class_type": "LikenessTestTinySD15Loader", "inputs": {"seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "portrait photo of a woman", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 7, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
        "8": {"class_type": "LikenessTestImageStats", "inputs": {"image": ["6", 0]}},
    }


def with_face_nodes(prompt: dict, astronaut: str, prefix: str) -> dict:
    prompt = dict(prompt)
    prompt.update({
        "10": {"class_type": "LikenessDlibFaceLoader", "inputs": {
            "detector": "HOG", "landmarks": "68", "jitters": 0, "det_size": 1600, "upsample": 0}},
        "11": {"class_type": "LikenessAnalyzeFaces", "inputs": {
            "analyzer": ["10", 0], "image": ["6", 0], "selection": "largest", "face_index": 0,
            "on_no_face": "pass_through", "retry": False}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 1], "filename_prefix": prefix + "_preview"}},
        "13": {"class_type": "LoadImage", "inputs": {"image": astronaut}},
        "14": {"class_type": "LikenessAnalyzeFaces", "inputs": {
            "analyzer": ["10", 0], "image": ["13", 0], "selection": "largest", "face_index": 0,
            "on_no_face": "error", "retry": True}},
        "15": {"class_type": "LikenessFaceSimilarity", "inputs": {
            "analyzer": ["10", 0], "image": ["6", 0], "threshold": 0.0, "reference_faces": ["14", 0]}},
        "16": {"class_type": "LikenessFaceSimilarity", "inputs": {
            "analyzer": ["10", 0], "image": ["13", 0], "threshold": 0.0, "reference_faces": ["14", 0]}},
    })
    return prompt


def _saved_image(host_env, outputs: dict, node_id: str) -> np.ndarray:
    from PIL import Image

    (item,) = outputs[node_id]["images"]
    assert item["type"] == "output"
    path = os.path.join(host_env.output, item["subfolder"], item["filename"])
    assert os.path.isfile(path)
    return np.asarray(Image.open(path)).astype(np.float32) / 255.0


def test_tiny_sd15_workflow_with_pack_nodes(execute_prompt, host_test_nodes, host_env):
    pytest.importorskip("dlib")
    astronaut = _astronaut_into_input(host_env)
    events = []
    prompt = with_face_nodes(txt2img_prompt(), astronaut, "likeness_host_execute")
    outputs = execute_prompt(prompt, on_event=lambda event, data: events.append((event, data)))

    image = _saved_image(host_env, outputs, "7")
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0.01  # not constant
    (stats,) = outputs["8"]["stats"]
    assert stats["finite"] and stats["shape"] == [1, 64, 64, 3] and stats["std"] > 0.01

    # Analyze Faces passed the face-less generated image through unchanged as its preview
    preview = _saved_image(host_env, outputs, "12")
    assert preview.shape == (64, 64, 3)

    generated_report, = outputs["15"]["text"]
    assert "image 0: no face" in generated_report and "0/1 passed" in generated_report
    photo_report, = outputs["16"]["text"]
    assert "PASS" in photo_report and "1/1 passed" in photo_report

    executed = [data["node"] for event, data in events if event == "executing" and data.get("node")]
    assert set(executed) == set(prompt)  # one "executing" event per node: the runner's progress lines
    assert any(event == "progress" and data["node"] == "5" for event, data in events)  # sampler steps


def test_second_run_hits_no_stale_state_and_validation_errors_are_reported(execute_prompt, host_test_nodes):
    from likeness.cli.runner import PromptValidationError

    prompt = txt2img_prompt("likeness_host_execute_again")
    prompt["5"]["inputs"]["steps"] = 0  # below KSampler's minimum of 1
    with pytest.raises(PromptValidationError) as info:
        execute_prompt(prompt)
    assert "5" in info.value.node_errors
    assert info.value.node_errors["5"]["errors"][0]["type"] == "value_smaller_than_min"
    assert "node #5 (KSampler)" in str(info.value)


def test_execution_error_names_the_node(execute_prompt, host_test_nodes):
    from likeness.cli.runner import PromptExecutionError

    prompt = txt2img_prompt("likeness_host_execute_error")
    prompt["4"]["inputs"]["width"] = 48  # fine for validation; the face analyzer is not the point here
    prompt["9"] = {"class_type": "LikenessFaceSimilarity", "inputs": {
        "analyzer": ["10", 0], "image": ["6", 0], "threshold": 0.0}}  # no reference: the node raises
    prompt["10"] = {"class_type": "LikenessDlibFaceLoader", "inputs": {
        "detector": "HOG", "landmarks": "5", "jitters": 0, "det_size": 1600, "upsample": 0}}
    pytest.importorskip("dlib")
    with pytest.raises(PromptExecutionError) as info:
        execute_prompt(prompt)
    assert info.value.details["node_id"] == "9"
    assert "Node #9 (LikenessFaceSimilarity) failed" in str(info.value)
    assert "reference" in str(info.value)
