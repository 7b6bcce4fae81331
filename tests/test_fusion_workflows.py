"""The shipped Face Fusion example workflows run through ComfyUI's real executor (tiny models swapped in)."""
from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.host

WORKFLOWS = ["Face Fusion - one identity", "Face Fusion - several photos of one person", "Face Fusion - two people"]


def _tiny(prompt: dict, image_name: str) -> dict:
    """Same graph, small: tiny model loader, a new (untrained) adapter, small sizes, 2 steps."""
    prompt = json.loads(json.dumps(prompt))
    for node_id, node in prompt.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node.update(class_type="LikenessTestTinySD15Loader", inputs={"seed": 0})
            ckpt = node_id
        elif kind == "LoadImage":
            inputs["image"] = image_name
        elif kind == "EmptyLatentImage":
            inputs.update(width=inputs["width"] // 8, height=inputs["height"] // 8)
        elif kind == "KSampler":
            inputs.update(steps=2, sampler_name="euler", scheduler="normal")
        elif kind == "LikenessApplyFaceFusion":
            inputs["reference_size"] = 64
        elif kind == "SolidMask":
            inputs.update(width=max(1, inputs["width"] // 8), height=max(1, inputs["height"] // 8))
        elif kind == "MaskComposite":
            inputs["x"] //= 8
    for node in prompt.values():
        if node["class_type"] == "LikenessFusionAdapterLoader":
            node.update(class_type="LikenessFusionAdapterNew", inputs={"model": [ckpt, 0]})
    return prompt


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_workflow_runs(name, execute_prompt, host_test_nodes, host_env):
    pytest.importorskip("dlib")
    import skimage.data
    from PIL import Image

    from host_support import example_prompt, saved_image

    image_name = "likeness_fusion_astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(os.path.join(host_env.input, image_name))
    prompt = _tiny(example_prompt(name), image_name)
    image = saved_image(host_env, execute_prompt(prompt), prompt)
    assert image.ndim == 3 and image.std() > 0
