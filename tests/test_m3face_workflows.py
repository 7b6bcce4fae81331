"""The shipped M3Face example workflows run end to end through ComfyUI's real executor, as the headless runner
runs them, with tiny models of the real architectures swapped in.

Each example is converted from its UI file the way ``python <pack> run`` converts it; then only what a tiny model
needs changes: the checkpoint becomes the tiny SD1.5, model names point at tiny aMUSEd / AltDiffusion folders and
tiny FaceControlNet files (written by ``m3face_support`` / ``m3face_generation_support``), sizes shrink and the
step counts drop to 2. The graph itself (nodes, links, the other widget values) is the shipped one. ComfyUI's stock
ControlNet loader only detects full-width SD ControlNets, so the English examples' stock loader is swapped for
``M3Face FaceControlNet Loader`` reading the tiny file (the stock path is tested in ``test_m3face_generation_host``).
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.host

ENGLISH_TEXT = ["M3Face - text to mask to face", "M3Face - text to landmarks to face"]
FROM_PHOTO = ["M3Face - repaint the hair region", "M3Face - Imagic edit from an edited mask"]
MULTILINGUAL = "M3Face - multilingual prompt"
TINY_SD15_CONTROLNET = "m3face_example_tiny_sd15.safetensors"
TINY_ALT_CONTROLNET = "m3face_example_tiny_alt.safetensors"
PHOTO = "likeness_m3face_example_astronaut.png"
EDITED_MASK = "m3face_edited_mask.png"  # the name the Imagic example's note tells the user to save the edit as
MAP_SIZE = 256  # photo maps: big enough for dlib to find the face again in the map's frame, small for tiny Muse


@pytest.fixture(scope="module")
def tiny_models(host_env):
    """Tiny aMUSEd folders (English, multilingual), the tiny AltDiffusion folder and the two tiny ControlNets."""
    pytest.importorskip("diffusers")
    from m3face_generation_support import (
        tiny_alt_controlnet_config,
        tiny_sd15_controlnet_config,
        write_face_controlnet,
        write_tiny_altdiffusion_folder,
    )
    from m3face_support import write_tiny_muse

    written = [write_tiny_muse(host_env.models), write_tiny_muse(host_env.models, multilingual=True),
               write_tiny_altdiffusion_folder(host_env.models, name="AltDiffusion-example-tiny"),
               write_face_controlnet(host_env.models, TINY_SD15_CONTROLNET, seed=8, config=tiny_sd15_controlnet_config()),
               write_face_controlnet(host_env.models, TINY_ALT_CONTROLNET, seed=9, config=tiny_alt_controlnet_config())]
    names = {"muse": os.path.basename(written[0]), "ml_muse": os.path.basename(written[1]),
             "alt": os.path.basename(written[2])}
    yield names
    for path in written:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


@pytest.fixture(scope="module")
def photo(host_env):
    pytest.importorskip("dlib")
    import skimage.data
    from PIL import Image

    Image.fromarray(skimage.data.astronaut()).save(os.path.join(host_env.input, PHOTO))
    edited = np.zeros((MAP_SIZE, MAP_SIZE, 3), dtype=np.uint8)
    edited[MAP_SIZE // 4:, MAP_SIZE // 4: 3 * MAP_SIZE // 4] = (204, 0, 0)  # a 'skin' block, as a user might paint
    Image.fromarray(edited).save(os.path.join(host_env.input, EDITED_MASK))
    return PHOTO


def _tiny_base(prompt: dict) -> str | None:
    """Swap the SD1.5 checkpoint for the tiny SD1.5; returns the loader's id (None without one)."""
    for node_id, node in prompt.items():
        if node["class_type"] == "CheckpointLoaderSimple":
            node.update(class_type="LikenessTestTinySD15Loader", inputs={"seed": 0})
            return node_id
    return None


def _shrink(kind: str, inputs: dict) -> None:
    """Few steps and small sizes, in place (the shipped values are the official ones)."""
    if kind == "EmptyLatentImage":
        inputs.update(width=inputs["width"] // 8, height=inputs["height"] // 8)
    elif kind == "KSampler":
        inputs.update(steps=2, sampler_name="euler")
    elif kind in ("LikenessM3FaceTextToCondition", "LikenessM3FaceEditCondition"):
        inputs["steps"] = 2
    elif kind == "LikenessM3FaceSegmentationMap":
        inputs["size"] = MAP_SIZE
    elif kind == "LikenessM3FaceImagicTrain":
        inputs.update(embedding_steps=2, finetune_steps=2, resolution=64, checkpoint_every=0, precision="fp32",
                      name="m3face_example_test", resume="fresh")


def _tiny(prompt: dict, names: dict) -> dict:
    ckpt = _tiny_base(prompt)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        _shrink(kind, inputs)
        if kind == "ControlNetLoader":
            node.update(class_type="LikenessM3FaceControlNetLoader", inputs={
                "control_net_name": TINY_SD15_CONTROLNET, "heads": "auto", "model": [ckpt, 0]})
        elif kind == "LikenessM3FaceControlNetLoader":
            inputs["control_net_name"] = TINY_ALT_CONTROLNET
        elif kind == "LikenessM3FaceMuseLoader":
            inputs["model"] = names["ml_muse" if inputs["model"].endswith("mlin") else "muse"]
        elif kind == "LikenessM3FaceAltDiffusionLoader":
            inputs["folder"] = names["alt"]
        elif kind == "LoadImage" and inputs["image"] != EDITED_MASK:
            inputs["image"] = PHOTO
        elif kind == "LikenessFaceParserLoader":
            inputs.update(parser="landmarks (no weights)", device="cpu")  # no BiSeNet weights offline
        elif kind == "LikenessFaceRegions":
            inputs["region"] = "whole_face"  # the landmark parser has no hair class
    return prompt


def _saved(host_env, outputs: dict, prompt: dict, kind: str = "SaveImage") -> list[np.ndarray]:
    from PIL import Image

    images = []
    for node_id, node in prompt.items():
        if node["class_type"] == kind:
            for item in outputs[node_id]["images"]:
                path = os.path.join(host_env.output if item["type"] == "output" else host_env.temp, item["subfolder"],
                                    item["filename"])
                images.append(np.asarray(Image.open(path).convert("RGB")))
    return images


def _run(name: str, names: dict, execute_prompt, host_env) -> tuple[dict, dict]:
    from host_support import example_prompt

    prompt = _tiny(example_prompt(name), names)
    outputs = execute_prompt(prompt)
    (image,) = _saved(host_env, outputs, prompt)
    assert image.ndim == 3 and image.std() > 0, name
    return prompt, outputs


@pytest.mark.parametrize("name", ENGLISH_TEXT)
def test_text_to_condition_to_face(name, tiny_models, execute_prompt, host_env, host_test_nodes):
    prompt, outputs = _run(name, tiny_models, execute_prompt, host_env)
    (condition,) = _saved(host_env, outputs, prompt, "PreviewImage")
    assert condition.shape == (32, 32, 3)  # the tiny Muse's own size


def test_repaint_the_hair_region(tiny_models, photo, execute_prompt, host_env, host_test_nodes):
    prompt, outputs = _run(FROM_PHOTO[0], tiny_models, execute_prompt, host_env)
    (edited,) = _saved(host_env, outputs, prompt, "PreviewImage")
    (mask,) = _saved(host_env, outputs, prompt, "MaskPreview")
    assert edited.shape == mask.shape == (MAP_SIZE, MAP_SIZE, 3)  # the region lines up with the map's frame
    assert 0 < (mask[..., 0] > 127).mean() < 1  # a region to regenerate, not the whole map


def test_imagic_edit_from_an_edited_mask(tiny_models, photo, execute_prompt, host_env, host_test_nodes):
    prompt, outputs = _run(FROM_PHOTO[1], tiny_models, execute_prompt, host_env)
    original, curves = _saved(host_env, outputs, prompt, "PreviewImage")
    assert original.shape == (MAP_SIZE, MAP_SIZE, 3) and curves.std() > 0
    saved = os.path.join(host_env.models, "likeness", "m3face_imagic", "m3face_example_test.safetensors")
    assert os.path.isfile(saved)  # the embeddings M3Face Load Imagic Embedding reuses


def _settings(prompt: dict, kind: str, *names: str) -> list[tuple]:
    return [tuple(node["inputs"][n] for n in names) for node in prompt.values() if node["class_type"] == kind]


@pytest.mark.parametrize("name", [*ENGLISH_TEXT, *FROM_PHOTO, MULTILINGUAL])
def test_examples_keep_the_official_settings(name, pack_loaded):
    """The shipped values are the recommended ones (the tests above only shrink them)."""
    from host_support import example_prompt

    prompt = example_prompt(name)
    assert set(_settings(prompt, "KSampler", "sampler_name", "steps", "cfg", "seed")) == {("uni_pc", 20, 7.5, 1337)}
    assert set(_settings(prompt, "ControlNetApplyAdvanced", "strength", "start_percent", "end_percent")) == {
        (1.0, 0.0, 1.0)}
    assert set(_settings(prompt, "EmptyLatentImage", "width", "height")) == {(512, 512)}
    for kind in ("LikenessM3FaceTextToCondition", "LikenessM3FaceEditCondition"):
        assert set(_settings(prompt, kind, "steps", "guidance", "temperature")) <= {(12, 10.0, 2.0)}
    assert set(_settings(prompt, "LikenessM3FaceImagicTrain", "embedding_steps", "embedding_lr", "finetune_steps",
                         "finetune_lr", "finetune_mode", "layers")) <= {(500, 1e-3, 1000, 5e-5, "up_blocks", "2and3")}


def test_multilingual_prompt(tiny_models, execute_prompt, host_env, host_test_nodes):
    prompt, _ = _run(MULTILINGUAL, tiny_models, execute_prompt, host_env)
    texts = [node["inputs"]["text"] for node in prompt.values()
             if node["class_type"] == "LikenessM3FaceMultilingualTextEncode"]
    assert any("femme" in text for text in texts)  # the shipped prompt is French
