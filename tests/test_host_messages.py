"""Messages reach the UI when graphs run through ComfyUI's real validation and executor (in-process): a missing
insightface pack, a training photo without a face, a face passed through by FaceA-Net inpaint, a NaN reference.
What is checked is what the frontend gets: validation ``node_errors``, the ``execution_error`` details (exception
type and message) and the nodes' ``ui`` outputs (as in ``/history``)."""
from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.host


def _blank_image_nodes(prompt: dict) -> dict:
    prompt.update({
        "1": {"class_type": "LikenessTestTinySD15Loader", "inputs": {"seed": 0}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1, "color": 0}},
        "3": {"class_type": "LikenessDlibFaceLoader", "inputs": {
            "detector": "HOG", "landmarks": "68", "jitters": 0, "det_size": 1600, "upsample": 0}},
    })
    return prompt


def test_missing_insightface_pack_names_the_folder_and_the_fetch_command(execute_prompt, host_test_nodes):
    from likeness.cli.runner import PromptValidationError
    from likeness.nodes.face_analysis import NO_PACK

    for pack, fetch in (("antelopev2", ["insightface-antelopev2"]),
                        (NO_PACK, ["insightface-buffalo_l", "insightface-antelopev2"])):
        prompt = _blank_image_nodes({
            "20": {"class_type": "LikenessInsightFaceLoader", "inputs": {
                "pack": pack, "provider": "auto", "landmarks": "none", "det_size": 640, "det_threshold": 0.5}},
            "21": {"class_type": "LikenessAnalyzeFaces", "inputs": {
                "analyzer": ["20", 0], "image": ["2", 0], "selection": "largest", "face_index": 0,
                "on_no_face": "pass_through", "retry": False}},
            "22": {"class_type": "LikenessTestImageStats", "inputs": {"image": ["21", 1]}},
        })
        with pytest.raises(PromptValidationError) as info:
            execute_prompt(prompt)
        (error,) = info.value.node_errors["20"]["errors"]
        assert error["type"] == "custom_validation_failed", error   # not ComfyUI's bare "value_not_in_list"
        shown = error["details"]
        assert "insightface" in shown and "models" in shown and "Value not in list" not in shown
        for entry_id in fetch:
            assert f"models fetch {entry_id}`" in shown
        assert f"models fetch {entry_id}`" in str(info.value)


def test_a_training_photo_without_a_face_is_a_likeness_error_with_the_trainers_own_advice(execute_prompt,
                                                                                         host_test_nodes):
    from likeness.cli.runner import PromptExecutionError

    prompt = _blank_image_nodes({"7": {"class_type": "LikenessFaceATrainIdentity", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "analyzer": ["3", 0],
        "class_word": "woman", "name": "likeness_no_face", "steps": 1, "seed": 0, "working_size": 64,
        "checkpoint_every": 0, "resume": "fresh"}}})
    with pytest.raises(PromptExecutionError) as info:
        execute_prompt(prompt)
    details = info.value.details
    assert details["node_id"] == "7"
    assert details["exception_type"] == "likeness.NoFaceError"          # not a file path
    message = details["exception_message"]
    assert "No usable face in 1 of 1 image(s) (indices [0])" in message and "'images'" in message
    assert "on_no_face" not in message                                    # the trainer has no such input


@pytest.fixture
def saved_identity(host_env):
    import host_support
    from likeness.techniques.facea_net.identity import save_identity
    from test_facea_host import synthetic_identity

    identity = synthetic_identity("likeness_messages", host_support.build_tiny_sd15(in_channels=9), 1)
    path = save_identity(identity, os.path.join(host_env.models, "likeness", "identities",
                                                "likeness_messages.safetensors"))
    yield os.path.basename(path)
    os.remove(path)


class _ShownOnNodes:
    """Stands in for ``PromptServer.instance``: records what would be drawn on each node."""

    def __init__(self):
        self.texts: list[tuple[str, str]] = []

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((str(node_id), text))


def test_inpaint_pass_through_reaches_the_ui(execute_prompt, host_test_nodes, saved_identity, monkeypatch):
    import server

    shown = _ShownOnNodes()
    monkeypatch.setattr(server.PromptServer, "instance", shown, raising=False)
    prompt = _blank_image_nodes({
        "4": {"class_type": "LikenessFaceALoadIdentity", "inputs": {"identity": saved_identity}},
        "5": {"class_type": "LikenessFaceAInpaint", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "analyzer": ["3", 0],
            "identity": ["4", 0], "selection": "largest", "text": "a face", "negative": "blurry", "seed": 0,
            "steps": 1, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "on_no_face": "pass_through", "working_size": 64}},
        "6": {"class_type": "LikenessTestImageStats", "inputs": {"image": ["5", 0]}},
    })
    outputs = execute_prompt(prompt)
    (text,) = outputs["5"]["text"]
    assert "image 0: no face found; passed through unchanged" in text
    assert ("5", text) in shown.texts                                  # drawn on the node in the frontend too
    assert outputs["6"]["stats"][0]["finite"]


def test_nan_reference_into_apply_face_fusion_is_refused_naming_the_input(execute_prompt, host_test_nodes):
    from likeness.cli.runner import PromptExecutionError

    prompt = {
        "1": {"class_type": "LikenessTestTinySD15Loader", "inputs": {"seed": 0}},
        "2": {"class_type": "LikenessTestNaNImage", "inputs": {"batch": 3, "nan_index": 2}},
        "3": {"class_type": "LikenessFusionAdapterNew", "inputs": {"model": ["1", 0]}},
        "4": {"class_type": "LikenessApplyFaceFusion", "inputs": {
            "model": ["1", 0], "fusion_adapter": ["3", 0], "vae": ["1", 2], "weight": 1.0, "start_at": 0.0,
            "end_at": 1.0, "capture": "per step (paper)", "reference": ["2", 0], "reference_size": 64}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a portrait", "clip": ["1", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["6", 0], "seed": 0,
            "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "LikenessTestImageStats", "inputs": {"image": ["8", 0]}},
    }
    with pytest.raises(PromptExecutionError) as info:
        execute_prompt(prompt)
    details = info.value.details
    assert details["node_id"] == "4" and details["exception_type"] == "likeness.InvalidInputError"
    assert details["exception_message"].startswith("'reference' image 2 has NaN/infinite pixels")
