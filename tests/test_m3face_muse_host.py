"""M3Face Muse nodes in ComfyUI's real executor on tiny aMUSEd folders in the host's models/likeness/m3face/:
text -> condition (seed-deterministic across runs), condition editing, loader errors, progress and cancel."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.host

PROMPT = "This attractive woman has narrow eyes, rosy cheeks, and wears heavy makeup."


@pytest.fixture(scope="module")
def muse_folders(host_env):
    pytest.importorskip("diffusers")
    from m3face_support import write_tiny_muse

    folders = [write_tiny_muse(host_env.models), write_tiny_muse(host_env.models, multilingual=True)]
    yield [os.path.basename(f) for f in folders]
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _saved(host_env, outputs: dict, node_id: str) -> np.ndarray:
    from PIL import Image

    (item,) = outputs[node_id]["images"]
    return np.asarray(Image.open(os.path.join(host_env.output, item["subfolder"], item["filename"])))


def muse_prompt(model: str, seed: int, prefix: str) -> dict:
    save = lambda source, name: {"class_type": "SaveImage", "inputs": {"images": source, "filename_prefix": name}}  # noqa: E731
    sampling = {"steps": 4, "guidance": 10.0, "temperature": 2.0}
    return {
        "1": {"class_type": "LikenessM3FaceMuseLoader", "inputs": {"model": model, "device": "auto"}},
        "2": {"class_type": "LikenessM3FaceTextToCondition", "inputs": {
            "muse": ["1", 0], "prompt": PROMPT, "modality": "segmentation", "seed": seed, "batch_size": 1, **sampling}},
        "3": save(["2", 0], f"{prefix}_condition"),
        "4": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 32, "height": 32}},
        "5": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 16, "height": 16}},
        "6": {"class_type": "MaskComposite", "inputs": {
            "destination": ["4", 0], "source": ["5", 0], "x": 0, "y": 0, "operation": "add"}},
        "7": {"class_type": "LikenessM3FaceEditCondition", "inputs": {
            "muse": ["1", 0], "condition": ["2", 0], "mask": ["6", 0], "prompt": PROMPT + " She wears glasses.",
            "modality": "segmentation", "seed": 3, "strength": 1.0, **sampling}},
        "8": save(["7", 0], f"{prefix}_edited"),
    }


@pytest.mark.parametrize("index", [0, 1], ids=["english", "multilingual"])
def test_text_to_condition_and_edit_in_the_real_executor(index, muse_folders, execute_prompt, host_env):
    model = muse_folders[index]
    first = execute_prompt(muse_prompt(model, 5, f"likeness_muse_{index}_a"))
    again = execute_prompt(muse_prompt(model, 5, f"likeness_muse_{index}_b"))
    other = execute_prompt(muse_prompt(model, 6, f"likeness_muse_{index}_c"))
    condition = _saved(host_env, first, "3")
    assert condition.shape == (32, 32, 3)
    assert np.array_equal(condition, _saved(host_env, again, "3"))
    assert not np.array_equal(condition, _saved(host_env, other, "3"))
    edited = _saved(host_env, first, "8")
    assert edited.shape == (32, 32, 3)
    assert np.array_equal(edited, _saved(host_env, again, "8"))


def test_missing_muse_folder_is_named_at_validation(muse_folders, execute_prompt):
    from likeness.cli.runner import PromptValidationError

    prompt = muse_prompt("no-such-muse", 0, "likeness_muse_missing")
    with pytest.raises(PromptValidationError) as info:
        execute_prompt(prompt)
    message = str(info.value)
    assert "'no-such-muse' is not in models/likeness/m3face" in message


def test_broken_folder_fails_with_the_component(muse_folders, execute_prompt, host_env):
    from likeness.cli.runner import PromptExecutionError

    broken = os.path.join(host_env.models, "likeness", "m3face", "broken-muse")
    shutil.copytree(os.path.join(host_env.models, "likeness", "m3face", muse_folders[0]), broken)
    shutil.rmtree(os.path.join(broken, "vqvae"))
    os.makedirs(os.path.join(broken, "vqvae"))
    try:
        with pytest.raises(PromptExecutionError) as info:
            execute_prompt(muse_prompt("broken-muse", 0, "likeness_muse_broken"))
    finally:
        shutil.rmtree(broken)
    assert info.value.details["node_id"] == "1"
    assert "has no vqvae (vqvae/config.json is missing)" in str(info.value)


def test_progress_reports_every_step_and_cancel_stops_the_run(muse_folders, host_env):
    import comfy.model_management
    import comfy.utils
    import torch

    from likeness.nodes.m3face_muse import M3FaceMuseLoader, M3FaceTextToCondition

    (muse,) = M3FaceMuseLoader().load(muse_folders[0], "auto")
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
        if value == 2 and len(seen) > 5:
            raise comfy.model_management.InterruptProcessingException()

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        M3FaceTextToCondition().generate(muse, PROMPT, "landmark", 5, 10.0, 2.0, 0, 1)
        assert seen == [(step, 5) for step in range(1, 6)]
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            M3FaceTextToCondition().generate(muse, PROMPT, "landmark", 5, 10.0, 2.0, 0, 1)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert seen[5:] == [(1, 5), (2, 5)]
    assert next(muse.transformer.parameters()).device == torch.device("cpu")  # back on the offload device
