"""The Flux example workflows (PuLID-FLUX, Face Fusion on Flux) run through ComfyUI's real executor, on tiny models.

The same graphs as the shipped files, with the three Flux loaders (UNETLoader, DualCLIPLoader, VAELoader) swapped
for the test node that builds a tiny FLUX.1-dev-shaped DiT from ComfyUI's own Flux class with its text encoders and
16-channel VAE. PuLID-FLUX reads a tiny random file in the real layout and a tiny EVA-CLIP tower from the models
folder (the release tower's config swapped for the tiny one); the tiny insightface pack stands in for antelopev2
(its detector finds white squares) and the landmark parser for BiSeNet. Face Fusion gets dlib's faces in real
photos. Sizes about / 8, 2 sampling steps, 3 training steps.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.host

PULID_FILE, EVA_FILE = "pulid_tiny_examples.safetensors", "eva_tiny_examples.pt"
# the examples' photos (x of the white "face"), written under this module's own names
SQUARE_PHOTOS = {"reference_portrait.png": 320, "person_a.png": 96, "person_b.png": 448}
PHOTO_PREFIX = "likeness_flux_"
DLIB_PHOTO = "likeness_flux_astronaut.png"
TRAINED = "workflow_flux_face"
# example -> (its SaveImage prefix, the output size in the file)
WORKFLOWS = {"PuLID-FLUX - portrait": ("likeness_pulid_flux", (896, 1152)),
             "PuLID-FLUX - two people with masks": ("likeness_pulid_flux_two", (1152, 896)),
             "Face Fusion - one identity (Flux)": ("likeness_fusion_flux", (1024, 1024))}
IDENTITY_NODES = ("LikenessApplyPulidFlux", "LikenessApplyFaceFusion")
FLUX_LOADERS = {"UNETLoader": 0, "DualCLIPLoader": 1, "VAELoader": 2}   # -> the tiny loader's output slot


def _eighth(inputs: dict, *names: str) -> None:
    inputs.update({name: max(16, inputs[name] // 8) for name in names})


TINY_INPUTS = {
    "LikenessPulidFluxLoader": lambda inputs: inputs.update(pulid_file=PULID_FILE),
    "LikenessEvaClipLoader": lambda inputs: inputs.update(eva_file=EVA_FILE),
    "LikenessInsightFaceLoader": lambda inputs: inputs.update(provider="CPU"),
    "LikenessFaceParserLoader": lambda inputs: inputs.update(parser="landmarks (no weights)", device="cpu"),
    "LikenessDlibFaceLoader": lambda inputs: inputs.update(landmarks="5"),
    "LikenessApplyFaceFusion": lambda inputs: inputs.update(reference_size=64),
    "LikenessTrainFaceFusion": lambda inputs: inputs.update(steps=3, resolution=64, grad_accumulation=1,
                                                            checkpoint_every=2, name=TRAINED, precision="fp32"),
    "EmptySD3LatentImage": lambda inputs: _eighth(inputs, "width", "height"),
    "SolidMask": lambda inputs: _eighth(inputs, "width", "height"),
    "MaskComposite": lambda inputs: inputs.update(x=inputs["x"] // 8),
    "KSampler": lambda inputs: inputs.update(steps=2),
}


def tiny_prompt(prompt: dict) -> dict:
    """Same graph, tiny: one tiny Flux loader for the model, text encoders and VAE, the tiny PuLID-FLUX / EVA-CLIP
    files, sizes / 8, few steps. Every file loader must be swapped or pointed at a tiny file."""
    prompt = json.loads(json.dumps(prompt))
    loaders = {i: n["class_type"] for i, n in prompt.items() if n["class_type"] in FLUX_LOADERS}
    assert sorted(loaders.values()) == sorted(FLUX_LOADERS), loaders
    (model,) = [i for i, kind in loaders.items() if kind == "UNETLoader"]
    dlib = any(n["class_type"] == "LikenessDlibFaceLoader" for n in prompt.values())
    for node_id in loaders:
        if node_id != model:
            del prompt[node_id]
    prompt[model] = {"class_type": "LikenessTestTinyFluxLoader", "inputs": {"seed": 0}}
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] in loaders:
                node["inputs"][name] = [model, FLUX_LOADERS[loaders[value[0]]]]
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = DLIB_PHOTO if dlib else PHOTO_PREFIX + node["inputs"]["image"]
        TINY_INPUTS.get(node["class_type"], lambda inputs: None)(node["inputs"])
    return prompt


@pytest.fixture(scope="module")
def flux_workflow_env(host_env, host_test_nodes, pack_loaded):
    """Tiny PuLID-FLUX and EVA-CLIP files in the models folder, the tiny insightface pack as antelopev2, photos with
    one white square each (the tiny detector's face) and a real photo for dlib."""
    import importlib

    from PIL import Image
    from safetensors.torch import save_file

    from face_fixtures import astronaut
    from likeness.techniques.pulid_flux import checkpoint, eva_clip
    from onnx_face_models import square_image, tiny_pack_installed
    from pulid_support import EMBED_ENCODER, TINY_CA, TINY_EVA, seeded_, tiny_pulid

    models = host_env.models
    os.makedirs(os.path.join(models, "pulid"), exist_ok=True)
    save_file(checkpoint.state_dict_of(tiny_pulid(seed=2, count=4, encoder=EMBED_ENCODER, ca=TINY_CA)),
              os.path.join(models, "pulid", PULID_FILE))
    os.makedirs(os.path.join(models, "clip_vision"), exist_ok=True)
    eva = seeded_(eva_clip.build_eva_vision(TINY_EVA), 5, 0.05)
    torch.save({f"visual.{k}": v for k, v in eva.state_dict().items()}, os.path.join(models, "clip_vision", EVA_FILE))
    for name, x in SQUARE_PHOTOS.items():
        Image.fromarray(square_image(x=x, y=192, side=64)).save(os.path.join(host_env.input, PHOTO_PREFIX + name))
    Image.fromarray(astronaut()).save(os.path.join(host_env.input, DLIB_PHOTO))
    # the executor runs the pack as ComfyUI imported it: swap the release EVA config for the tiny one there
    hosted = importlib.import_module(f"{pack_loaded.__name__}.techniques.pulid_flux.eva_clip")
    release = hosted.EVA02_L_336
    hosted.EVA02_L_336 = TINY_EVA
    try:
        with tiny_pack_installed(models, "antelopev2"):
            yield host_env
    finally:
        hosted.EVA02_L_336 = release


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_flux_example_workflow_runs(name, flux_workflow_env, execute_prompt):
    pytest.importorskip("insightface")
    pytest.importorskip("dlib")
    from host_support import example_prompt, saved_image

    prefix, size = WORKFLOWS[name]
    full = example_prompt(name)
    (latent,) = [n["inputs"] for n in full.values() if n["class_type"] == "EmptySD3LatentImage"]
    assert (latent["width"], latent["height"]) == size
    (sampler,) = [n["inputs"] for n in full.values() if n["class_type"] == "KSampler"]
    assert (sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (1.0, "euler", "simple")
    prompt = tiny_prompt(full)
    image = saved_image(flux_workflow_env, execute_prompt(prompt), prompt, prefix)
    (tiny,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "EmptySD3LatentImage"]
    assert image.shape == (tiny["height"], tiny["width"], 3) and image.std() > 0
    for node in prompt.values():   # the identity nodes at weight 0: the plain model's image
        if node["class_type"] in IDENTITY_NODES:
            node["inputs"]["weight"] = 0.0
    plain = saved_image(flux_workflow_env, execute_prompt(prompt), prompt, prefix)
    assert np.abs(image.astype(int) - plain).max() > 0, "the identity changed nothing in the image"


def test_two_people_example_chains_two_applies_each_with_its_person_and_half(flux_workflow_env):
    from host_support import example_prompt

    prompt = example_prompt("PuLID-FLUX - two people with masks")
    applies = {i: n["inputs"] for i, n in prompt.items() if n["class_type"] == "LikenessApplyPulidFlux"}
    (first,) = [i for i, a in applies.items() if prompt[a["model"][0]]["class_type"] == "UNETLoader"]
    (second,) = set(applies) - {first}
    assert applies[second]["model"] == [first, 0] and applies[first]["embeds"] != applies[second]["embeds"]
    (latent,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "EmptySD3LatentImage"]
    assert [prompt[applies[i]["mask"][0]]["inputs"]["x"] for i in (first, second)] == [0, latent["width"] // 2]
    (sampler,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "KSampler"]
    assert sampler["model"] == [second, 0]


def test_flux_train_example_runs(flux_workflow_env, execute_prompt):
    """The shipped Flux training workflow with the tiny Flux, a folder of real face photos and 3 steps; the adapter
    it writes is a Flux adapter trained under the example's guidance."""
    pytest.importorskip("dlib")
    from PIL import Image

    from host_support import example_prompt, saved_image
    from likeness.techniques.face_fusion import FluxFusionAdapter, load_fusion_adapter
    from test_fusion_train import face_photos

    env = flux_workflow_env
    folder = os.path.join(env.input, "likeness_faces_flux")
    os.makedirs(folder, exist_ok=True)
    for name, image, caption in face_photos()[:3]:
        Image.fromarray((image.numpy() * 255).round().astype(np.uint8)).save(os.path.join(folder, name + ".png"))
        with open(os.path.join(folder, name + ".txt"), "w") as handle:
            handle.write(caption)
    full = example_prompt("Face Fusion - train an adapter (Flux)")
    (trainer,) = [n["inputs"] for n in full.values() if n["class_type"] == "LikenessTrainFaceFusion"]
    assert (trainer["name"], trainer["folder"], trainer["guidance"]) == ("my_flux_face", "likeness_faces", 3.5)
    prompt = tiny_prompt(full)
    (node,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "LikenessTrainFaceFusion"]
    node["folder"] = "likeness_faces_flux"
    outputs = execute_prompt(prompt)
    (curve,) = [nid for nid, n in prompt.items() if n["class_type"] == "PreviewImage"]
    assert outputs[curve]["images"]
    image = saved_image(env, outputs, prompt, "likeness_fusion_flux_trained")
    assert image.ndim == 3 and image.std() > 0
    adapter = load_fusion_adapter(os.path.join(env.models, "likeness", "fusion", TRAINED + ".safetensors"))
    assert isinstance(adapter, FluxFusionAdapter) and adapter.metadata["layout"] == "dit"
    assert adapter.metadata["trained_steps"] == "3" and adapter.metadata["guidance"] == "3.5"
