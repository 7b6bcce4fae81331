"""The SDXL example workflows run through ComfyUI's real executor, on tiny models.

The same graphs as the shipped files, with the model loaders swapped for test nodes registered here: the tiny
SDXL-shaped UNet with the tiny SDXL text encoder (CLIP-L + CLIP-G layout) and VAE, the tiny CLIP vision, scaled-down
random InstantID / FaceID-PlusV2 / ConsistentID files and a scaled-down IdentityNet for that UNet; Face Fusion
starts from a new (untrained) adapter, as its example does. The tiny insightface pack (its detector finds white
squares) stands in for antelopev2 / buffalo_l, the landmark parser for BiSeNet; dlib examples get the astronaut
photo. Sizes are divided by about 8, 2 steps.
"""
from __future__ import annotations

import os

import pytest

from test_example_workflows_faceid import (
    IMAGES,
    PACK,
    TINY_INPUTS,
    LikenessTestTinyClipVision,
    LikenessTestTinyConsistentID,
    face_photo,
    pack_module,
)

pytestmark = pytest.mark.host

# example -> (its SaveImage prefix, the output size in the file: 1024 px or the official script's)
WORKFLOWS = {"InstantID - portrait (SDXL)": ("likeness_instantid", (1024, 1024)),
             "FaceID PlusV2 - portrait (SDXL)": ("likeness_faceid_plusv2_sdxl", (1024, 1024)),
             "ConsistentID - portrait (SDXL)": ("likeness_consistentid_sdxl", (864, 1152)),
             "Face Fusion - one identity (SDXL)": ("likeness_fusion_sdxl", (1024, 1024))}
# loaders the tests run as they are: the tiny pack / the landmark parser / dlib's own detector
NO_FILE_LOADERS = ("LikenessInsightFaceLoader", "LikenessFaceParserLoader", "LikenessDlibFaceLoader")
DLIB_PHOTO = "likeness_sdxl_astronaut.png"   # dlib (Face Fusion, FaceA-Net) needs a real face, not a white square


class LikenessTestTinySDXLLoader:
    """MODEL + CLIP + VAE: the tiny SDXL UNet (1280-d pooled + size conds), the tiny SDXL text encoder, tiny VAE."""
    CATEGORY = "Likeness/Tests"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        import host_support
        from host_support import TINY_SDXL_POOLED_DIM, build_tiny_sdxl_clip

        return host_support.build_tiny_sdxl(), build_tiny_sdxl_clip(pooled_dim=TINY_SDXL_POOLED_DIM), host_support.build_tiny_vae()


class LikenessTestTinyInstantID:
    """A scaled-down random InstantID ip-adapter.bin (Resampler + IP-only processors) for the tiny SDXL UNet."""
    CATEGORY = "Likeness/Tests"
    RETURN_TYPES = ("FACE_MAKEUP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def load(self, model):
        from faceid_support import random_instantid_checkpoint
        from likeness.techniques.faceid.lora import transformer_blocks

        channels = [r.channels for r in transformer_blocks(model)]
        return (pack_module("techniques.faceid.checkpoint").load_faceid_state_dict(
            random_instantid_checkpoint(channels, 64), source="ip-adapter.bin"),)


class LikenessTestTinyFaceIDPlusV2SDXL:
    """A scaled-down random FaceID-PlusV2 SDXL file (projector + LoRA/IP processors) for the tiny SDXL UNet."""
    CATEGORY = "Likeness/Tests"
    RETURN_TYPES = ("FACE_MAKEUP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip_vision": ("CLIP_VISION",)}}

    def load(self, model, clip_vision):
        import host_support
        from faceid_support import random_faceid_checkpoint
        from likeness.techniques.faceid.lora import transformer_blocks

        channels = [r.channels for r in transformer_blocks(model)]
        groups = random_faceid_checkpoint(channels, 64, clip_dim=host_support.clip_vision_width(clip_vision), rank=4)
        checkpoint = pack_module("techniques.faceid.checkpoint").load_faceid_state_dict(
            groups, source="tiny-faceid-plusv2_sdxl.bin")
        assert checkpoint.variant.value == "faceid_plusv2", checkpoint.variant
        return (checkpoint,)


class LikenessTestTinyIdentityNet:
    """A scaled-down random IdentityNet (SDXL diffusers ControlNet, 64-d context) built as the pack builds it."""
    CATEGORY = "Likeness/Tests"
    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        import torch

        from test_faceid_sdxl_host import TINY_SDXL_CONTROLNET

        layout = pack_module("techniques.faceid.controlnet_layout")
        generator = torch.Generator().manual_seed(5)
        sd = {k: torch.randn(s, generator=generator) * (0.02 if len(s) > 1 else 0.1)
              for k, s in layout.expected_controlnet_shapes(TINY_SDXL_CONTROLNET).items()}
        shape = layout.validate_controlnet_state_dict(sd, "IdentityNet")
        return (pack_module("techniques.faceid.controlnet").build_id_controlnet(sd, shape, "IdentityNet"),)


TEST_NODES = {c.__name__: c for c in (LikenessTestTinySDXLLoader, LikenessTestTinyInstantID,
                                      LikenessTestTinyFaceIDPlusV2SDXL, LikenessTestTinyIdentityNet,
                                      LikenessTestTinyClipVision, LikenessTestTinyConsistentID)}


def _tiny_loader(node: dict, ckpt: str, vision: str | None) -> None:
    """Model loaders become the test loaders (tiny models built in memory)."""
    kind, inputs = node["class_type"], node["inputs"]
    if kind == "CheckpointLoaderSimple":
        node.update(class_type="LikenessTestTinySDXLLoader", inputs={})
    elif kind == "CLIPVisionLoader":
        node.update(class_type="LikenessTestTinyClipVision", inputs={})
    elif kind == "LikenessConsistentIDLoader" and inputs["model_name"] == "ConsistentID_SDXL-v1.bin":
        node.update(class_type="LikenessTestTinyConsistentID", inputs={"model": [ckpt, 0], "clip_vision": [vision, 0]})
    elif kind == "ControlNetLoader" and inputs["control_net_name"] == "instantid-controlnet.safetensors":
        node.update(class_type="LikenessTestTinyIdentityNet", inputs={})
    elif kind == "LikenessFaceIDLoader" and inputs["model_name"].startswith("instantid/"):
        node.update(class_type="LikenessTestTinyInstantID", inputs={"model": [ckpt, 0]})
    elif kind == "LikenessFaceIDLoader" and inputs["model_name"] == "faceid/ip-adapter-faceid-plusv2_sdxl.bin":
        node.update(class_type="LikenessTestTinyFaceIDPlusV2SDXL", inputs={"model": [ckpt, 0], "clip_vision": [vision, 0]})


def _tiny_fusion(inputs: dict) -> None:
    inputs["reference_size"] = 64


def _tiny_latent(inputs: dict) -> None:
    """About 1/8 of the size, on a multiple of 32 (the tiny UNet halves the latent twice)."""
    inputs.update({name: max(32, round(inputs[name] / 256) * 32) for name in ("width", "height")})


def tiny_prompt(prompt: dict) -> dict:
    """Same graph, tiny: test loaders, the tiny insightface pack and the landmark face parser, sizes about / 8,
    2 steps. Every loader must be swapped."""
    import json

    from likeness.face_analysis.parsing import LANDMARKS_CHOICE

    prompt = json.loads(json.dumps(prompt))
    ckpt = next(i for i, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple")
    vision = next((i for i, n in prompt.items() if n["class_type"] == "CLIPVisionLoader"), None)
    dlib = any(n["class_type"] == "LikenessDlibFaceLoader" for n in prompt.values())
    tiny = {**TINY_INPUTS, "EmptyLatentImage": _tiny_latent, "LikenessApplyFaceFusion": _tiny_fusion}
    for node in prompt.values():
        if node["class_type"] == "LikenessFaceParserLoader":
            node["inputs"].update(parser=LANDMARKS_CHOICE, device="cpu")
        if node["class_type"] == "LoadImage" and dlib:
            node["inputs"]["image"] = DLIB_PHOTO
        tiny.get(node["class_type"], lambda inputs: None)(node["inputs"])
        _tiny_loader(node, ckpt, vision)
    loaders = [n["class_type"] for n in prompt.values() if n["class_type"].endswith("Loader")
               and n["class_type"] not in TEST_NODES
               and n["class_type"] not in NO_FILE_LOADERS]
    assert not loaders, f"no tiny stand-in for {loaders}"
    return prompt


@pytest.fixture(scope="module")
def sdxl_workflow_env(host_env, host_test_nodes):
    import nodes
    from PIL import Image

    from face_fixtures import astronaut
    from onnx_face_models import write_tiny_insightface_pack

    write_tiny_insightface_pack(os.path.join(host_env.models, "insightface", "models", PACK))
    for name, (h, w) in IMAGES.items():
        Image.fromarray(face_photo(h, w)).save(os.path.join(host_env.input, name))
    Image.fromarray(astronaut()).save(os.path.join(host_env.input, DLIB_PHOTO))
    saved = {k: nodes.NODE_CLASS_MAPPINGS.get(k) for k in TEST_NODES}
    nodes.NODE_CLASS_MAPPINGS.update(TEST_NODES)
    yield host_env
    for k, v in saved.items():
        if v is None:
            nodes.NODE_CLASS_MAPPINGS.pop(k, None)
        else:
            nodes.NODE_CLASS_MAPPINGS[k] = v
    import comfy.model_management

    comfy.model_management.unload_all_models()


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_sdxl_example_workflow_runs(name, sdxl_workflow_env, execute_prompt):
    pytest.importorskip("insightface")
    pytest.importorskip("dlib")

    from host_support import example_prompt, saved_image

    prefix, size = WORKFLOWS[name]
    full = example_prompt(name)
    (latent,) = [n["inputs"] for n in full.values() if n["class_type"] == "EmptyLatentImage"]
    assert (latent["width"], latent["height"]) == size
    prompt = tiny_prompt(full)
    image = saved_image(sdxl_workflow_env, execute_prompt(prompt), prompt, prefix)
    (tiny,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "EmptyLatentImage"]
    assert image.shape == (tiny["height"], tiny["width"], 3) and image.std() > 0
