"""The FaceID / Face-MakeUp / ConsistentID example workflows run through ComfyUI's real executor.

Tiny models replace the real files: the tiny SD1.5 loader (host_nodes), test-only nodes registered here for
the tiny CLIP vision and scaled-down random Face-MakeUp / FaceID-PlusV2 / ConsistentID checkpoints, a tiny
buffalo_l-shaped insightface pack written into the temp models dir (its detector finds white squares), and the
landmark face parser instead of BiSeNet.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.host

WORKFLOWS = ["Face-MakeUp - portrait", "Face-MakeUp - head pose from another photo", "Face-MakeUp - mix two identities",
             "FaceID PlusV2 - portrait (baseline)", "ConsistentID - portrait", "ConsistentID - identity in a masked region",
             "Likeness Metrics - measure a Face-MakeUp portrait"]
PACK = "tiny_buffalo_l"
IMAGES = {"reference_portrait.png": (96, 96), "pose_photo.png": (128, 64), "identity_a.png": (96, 96),
          "identity_b.png": (64, 128), "second_photo.png": (96, 96)}


class LikenessTestTinyClipVision:
    CATEGORY = "Likeness/Tests"
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        import host_support

        return (host_support.build_tiny_clip_vision(),)


class LikenessTestTinyFaceIDFile:
    """A scaled-down random Face-MakeUp (with its ControlNet), FaceID-PlusV2 or ConsistentID for the tiny UNet."""
    CATEGORY = "Likeness/Tests"
    RETURN_TYPES = ("FACE_MAKEUP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip_vision": ("CLIP_VISION",),
                             "kind": (["face_makeup", "plusv2", "consistentid"],)}}

    def load(self, model, clip_vision, kind):
        import host_support
        from faceid_support import random_faceid_checkpoint
        from likeness.techniques.faceid.lora import transformer_blocks
        from test_face_makeup_controlnet import tiny_face_makeup_groups

        if kind == "face_makeup":
            return (pack_module("techniques.faceid.checkpoint").load_faceid_state_dict(
                tiny_face_makeup_groups(model, clip_vision), source="tiny-face-makeup.bin"),)
        channels = [r.channels for r in transformer_blocks(model)]
        hidden = host_support.clip_vision_width(clip_vision)
        if kind == "plusv2":
            groups = random_faceid_checkpoint(channels, 64, clip_dim=hidden, rank=4)
            return (pack_module("techniques.faceid.checkpoint").load_faceid_state_dict(
                groups, source="tiny-faceid-plusv2.bin"),)
        groups = random_faceid_checkpoint(channels, 64, clip_dim=hidden, rank=4, facial_encoder=True)
        return (pack_module("techniques.consistentid.loader").load_consistentid_state_dict(
            groups, source="tiny-consistentid.bin"),)


class LikenessTestTinyConsistentID(LikenessTestTinyFaceIDFile):
    RETURN_TYPES = ("CONSISTENTID",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip_vision": ("CLIP_VISION",)}}

    def load(self, model, clip_vision):
        return super().load(model, clip_vision, "consistentid")


def pack_module(name: str):
    """A module of the pack as ComfyUI loaded it (its own module name, so the nodes' isinstance checks pass)."""
    import importlib

    import nodes

    root = nodes.NODE_CLASS_MAPPINGS["LikenessFaceIDLoader"].__module__.rsplit(".nodes.", 1)[0]
    return importlib.import_module(f"{root}.{name}")


TEST_NODES = {c.__name__: c for c in (LikenessTestTinyClipVision, LikenessTestTinyFaceIDFile,
                                      LikenessTestTinyConsistentID)}


def _eighth(inputs: dict, *names: str) -> None:
    inputs.update({name: max(1, inputs[name] // 8) for name in names})


# class -> in-place edit of a node's inputs: small sizes, 2 steps, CPU.
TINY_INPUTS = {
    "LikenessInsightFaceLoader": lambda inputs: inputs.update(pack=PACK, provider="CPU", det_size=256),
    "KSampler": lambda inputs: inputs.update(steps=2),
    "EmptyLatentImage": lambda inputs: _eighth(inputs, "width", "height"),
    "LikenessFaceKeypointMap": lambda inputs: _eighth(inputs, "width", "height"),
    "SolidMask": lambda inputs: _eighth(inputs, "width", "height"),
    "MaskComposite": lambda inputs: inputs.update(x=inputs["x"] // 8),
    "LikenessMetrics": lambda inputs: inputs.update(clip_model="tiny-clip", dino_model="tiny-dino", dlib_judge=False,
                                                    tile=64),
}


def _tiny_loader(node: dict, ckpt: str, vision: str) -> None:
    """Model loaders become the test loaders (tiny models built in memory)."""
    kind, inputs = node["class_type"], node["inputs"]
    if kind == "CheckpointLoaderSimple":
        node.update(class_type="LikenessTestTinySD15Loader", inputs={"seed": 0})
    elif kind == "CLIPVisionLoader":
        node.update(class_type="LikenessTestTinyClipVision", inputs={})
    elif kind == "LikenessFaceIDLoader":
        variant = "face_makeup" if inputs["model_name"].startswith("face_makeup/") else "plusv2"
        node.update(class_type="LikenessTestTinyFaceIDFile",
                    inputs={"model": [ckpt, 0], "clip_vision": [vision, 0], "kind": variant})
    elif kind == "LikenessConsistentIDLoader":
        node.update(class_type="LikenessTestTinyConsistentID", inputs={"model": [ckpt, 0], "clip_vision": [vision, 0]})


def tiny_prompt(prompt: dict) -> dict:
    """Same graph, tiny: test loaders, the tiny insightface pack, small sizes, 2 steps."""
    from likeness.face_analysis.parsing import LANDMARKS_CHOICE

    prompt = json.loads(json.dumps(prompt))
    ckpt = next(i for i, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple")
    vision = next(i for i, n in prompt.items() if n["class_type"] == "CLIPVisionLoader")
    for node in prompt.values():
        if node["class_type"] == "LikenessFaceParserLoader":
            node["inputs"].update(parser=LANDMARKS_CHOICE, device="cpu")
        TINY_INPUTS.get(node["class_type"], lambda inputs: None)(node["inputs"])
        _tiny_loader(node, ckpt, vision)
    return prompt


def face_photo(height: int, width: int) -> np.ndarray:
    """A black photo with one white 64-pixel square on the 32-pixel grid: the tiny detector's 'face'."""
    image = np.zeros((height, width, 3), np.uint8)
    image[32:96, 0:64] = 255
    image[32:96, 0:64, 0] = 200 if width > height else 255     # different identities for different photos
    return image


@pytest.fixture(scope="module")
def workflow_env(host_env, host_test_nodes):
    import nodes
    from PIL import Image

    from evaluation_support import write_tiny_evaluation_models
    from onnx_face_models import write_tiny_insightface_pack

    write_tiny_insightface_pack(os.path.join(host_env.models, "insightface", "models", PACK))
    write_tiny_evaluation_models(host_env.models)
    for name, (h, w) in IMAGES.items():
        Image.fromarray(face_photo(h, w)).save(os.path.join(host_env.input, name))
    saved = {k: nodes.NODE_CLASS_MAPPINGS.get(k) for k in TEST_NODES}
    nodes.NODE_CLASS_MAPPINGS.update(TEST_NODES)
    yield host_env
    for k, v in saved.items():
        if v is None:
            nodes.NODE_CLASS_MAPPINGS.pop(k, None)
        else:
            nodes.NODE_CLASS_MAPPINGS[k] = v


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_workflow_runs(name, workflow_env, execute_prompt):
    pytest.importorskip("insightface")

    from host_support import example_prompt, saved_image

    prompt = tiny_prompt(example_prompt(name))
    outputs = execute_prompt(prompt)
    image = saved_image(workflow_env, outputs, prompt)
    assert image.ndim == 3 and np.isfinite(image).all()
    if name == "Likeness Metrics - measure a Face-MakeUp portrait":
        from likeness.evaluation.bindings import resolve_bindings

        (metrics,) = [nid for nid, node in prompt.items() if node["class_type"] == "LikenessMetrics"]
        (table,) = [nid for nid, node in prompt.items() if node["class_type"] == "PreviewAny"]
        assert "clip_t" in outputs[table]["text"][0] and "dino" in outputs[table]["text"][0], outputs[table]
        positive = prompt[metrics]["inputs"]["prompt"][0]  # the one prompt text, also what eval binds
        assert prompt[positive]["_meta"]["title"] == "Positive" and resolve_bindings(prompt).prompt == (positive, "value")
    if name == "Face-MakeUp - mix two identities":
        (balance,) = [nid for nid, node in prompt.items() if node["class_type"] == "LikenessIdentityMixBalance"]
        assert "identity mixing balance" in outputs[balance]["text"][0]
