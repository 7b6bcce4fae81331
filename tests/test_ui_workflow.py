"""UI-format workflow -> API prompt (``cli/ui_workflow.py``), on workflows shaped as ComfyUI's editor saves them.

The node classes are stand-ins with the ``INPUT_TYPES`` of ComfyUI's core nodes (the conversion reads
nothing else); the host test ``test_comfyui_template_workflows_convert_and_validate`` checks the real
ones against ComfyUI's shipped templates.
"""
from __future__ import annotations

import pytest

from likeness.cli import ui_workflow as uw

# --------------------------------------------------------------------------------------------------
# Node classes with the INPUT_TYPES of ComfyUI's core nodes


class CheckpointLoaderSimple:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (["a.safetensors", "b.safetensors"],)}}


class CLIPTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)}}


class EmptyLatentImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 512, "min": 16}), "height": ("INT", {"default": 512}),
                             "batch_size": ("INT", {"default": 1, "min": 1})}}


class KSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
            "steps": ("INT", {"default": 20}), "cfg": ("FLOAT", {"default": 8.0}),
            "sampler_name": (["euler", "dpmpp_2m"],), "scheduler": (["normal", "karras"],),
            "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
            "denoise": ("FLOAT", {"default": 1.0})}}


class LatentUpscaleBy:  # LATENT in -> LATENT out: bypassed in some workflows below
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "upscale_method": (["nearest-exact", "bilinear"],),
                             "scale_by": ("FLOAT", {"default": 1.5})}}


class VAEDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}


class SaveImage:
    DISPLAY_NAME = "Save Image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT"}}


class RepeatCount:  # a plain INT widget followed by a combo whose choices look like control values
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"default": 1}), "policy": (["fixed", "random"],),
                             "label": ("STRING", {"default": "", "forceInput": True}),
                             "mode": ("COMBO", {"options": ["a", "b"], "default": "b"})}}


NODE_CLASSES = {cls.__name__: cls for cls in (CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler,
                                              LatentUpscaleBy, VAEDecode, SaveImage, RepeatCount)}


# --------------------------------------------------------------------------------------------------
# A workflow as the editor serialises it (LGraph.serialize, schema version 0.4)


class EditorGraph:
    """Nodes with id/type/pos/size/flags/order/mode/inputs/outputs/properties/widgets_values, and links
    as ``[id, origin_id, origin_slot, target_id, target_slot, type]``, as ``workflow.json`` holds them."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, type_: str, widgets=None, inputs=(), outputs=(), mode: int = 0, title: str | None = None,
            node_id: int | None = None) -> dict:
        """``inputs``: (name, type) or (name, type, widget name) for a widget converted to an input."""
        node_id = node_id if node_id is not None else len(self.nodes) + 1
        node = {"id": node_id, "type": type_, "pos": [100.0 * node_id, 80.0], "size": [315, 98],
                "flags": {}, "order": len(self.nodes), "mode": mode,
                "inputs": [self._input(spec) for spec in inputs],
                "outputs": [{"name": name, "type": kind, "links": [], "slot_index": slot}
                            for slot, (name, kind) in enumerate(outputs)],
                "properties": {"Node name for S&R": type_}}
        if widgets is not None:
            node["widgets_values"] = widgets
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    @staticmethod
    def _input(spec) -> dict:
        item = {"name": spec[0], "type": spec[1], "link": None}
        if len(spec) > 2:
            item["widget"] = {"name": spec[2]}
        return item

    def connect(self, origin: dict, origin_slot: int, target: dict, target_slot: int) -> int:
        link_id = len(self.links) + 1
        kind = origin["outputs"][origin_slot]["type"]
        self.links.append([link_id, origin["id"], origin_slot, target["id"], target_slot, kind])
        origin["outputs"][origin_slot]["links"].append(link_id)
        target["inputs"][target_slot]["link"] = link_id
        return link_id

    def workflow(self) -> dict:
        return {"last_node_id": max(n["id"] for n in self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}


def txt2img(graph: EditorGraph | None = None):
    """The default txt2img graph: loader, two prompts, empty latent, KSampler, decode, save."""
    graph = graph or EditorGraph()
    loader = graph.add("CheckpointLoaderSimple", ["b.safetensors"],
                       outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], node_id=4)
    positive = graph.add("CLIPTextEncode", ["a portrait"], inputs=[("clip", "CLIP")],
                         outputs=[("CONDITIONING", "CONDITIONING")], node_id=6, title="Positive")
    negative = graph.add("CLIPTextEncode", ["blurry"], inputs=[("clip", "CLIP")],
                         outputs=[("CONDITIONING", "CONDITIONING")], node_id=7)
    latent = graph.add("EmptyLatentImage", [64, 96, 1], outputs=[("LATENT", "LATENT")], node_id=5)
    sampler = graph.add("KSampler", [42, "randomize", 8, 7.5, "dpmpp_2m", "karras", 0.75],
                        inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")], node_id=3)
    decode = graph.add("VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                       node_id=8)
    save = graph.add("SaveImage", ["portrait"], inputs=[("images", "IMAGE")], node_id=9)
    for origin, origin_slot, target, target_slot in (
            (loader, 1, positive, 0), (loader, 1, negative, 0), (loader, 0, sampler, 0), (positive, 0, sampler, 1),
            (negative, 0, sampler, 2), (latent, 0, sampler, 3), (sampler, 0, decode, 0), (loader, 2, decode, 1),
            (decode, 0, save, 0)):
        graph.connect(origin, origin_slot, target, target_slot)
    return graph, {"loader": loader, "sampler": sampler, "decode": decode, "latent": latent, "save": save}


def convert(graph: EditorGraph) -> dict:
    return uw.ui_to_api(graph.workflow(), NODE_CLASSES)


# --------------------------------------------------------------------------------------------------
# Widgets


def test_widget_values_map_in_input_order_and_skip_the_seed_control_value():
    graph, _ = txt2img()
    prompt = convert(graph)
    assert sorted(prompt, key=int) == ["3", "4", "5", "6", "7", "8", "9"]
    assert prompt["3"] == {"class_type": "KSampler", "_meta": {"title": "KSampler"}, "inputs": {
        "seed": 42, "steps": 8, "cfg": 7.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 0.75,
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}}
    assert prompt["5"]["inputs"] == {"width": 64, "height": 96, "batch_size": 1}
    assert prompt["6"]["inputs"] == {"text": "a portrait", "clip": ["4", 1]}
    assert prompt["6"]["_meta"]["title"] == "Positive"
    assert prompt["9"]["_meta"]["title"] == "Save Image"  # no title: the class's display name


@pytest.mark.parametrize("control", ["fixed", "increment", "decrement", "randomize", True, False])
def test_every_control_value_is_skipped_including_old_booleans(control):
    graph, nodes = txt2img()
    nodes["sampler"]["widgets_values"] = [7, control, 3, 5.0, "euler", "normal", 1.0]
    inputs = convert(graph)["3"]["inputs"]
    assert (inputs["seed"], inputs["steps"], inputs["cfg"], inputs["sampler_name"]) == (7, 3, 5.0, "euler")


def test_a_control_looking_value_after_a_plain_int_belongs_to_the_next_combo_if_it_offers_it():
    graph = EditorGraph()
    graph.add("RepeatCount", [3, "fixed", "a"])
    graph.add("RepeatCount", [3, "randomize", "random", "a"])  # "randomize" is no policy: a control value
    prompt = convert(graph)
    assert prompt["1"]["inputs"] == {"count": 3, "policy": "fixed", "mode": "a"}
    assert prompt["2"]["inputs"] == {"count": 3, "policy": "random", "mode": "a"}


def test_missing_values_take_defaults_and_force_input_is_no_widget():
    graph = EditorGraph()
    graph.add("RepeatCount")  # an old file without widgets_values
    graph.add("SaveImage", inputs=[("images", "IMAGE")])
    prompt = convert(graph)
    assert prompt["1"]["inputs"] == {"count": 1, "policy": "fixed", "mode": "b"}  # first choice, COMBO default
    assert prompt["2"]["inputs"] == {"filename_prefix": "ComfyUI"}


def test_widget_values_saved_as_a_dict_map_by_name():
    graph = EditorGraph()
    graph.add("EmptyLatentImage", {"width": 128, "height": 64, "unknown": 1})
    assert convert(graph)["1"]["inputs"] == {"width": 128, "height": 64, "batch_size": 1}


# --------------------------------------------------------------------------------------------------
# Links


def test_a_widget_converted_to_an_input_takes_its_link_over_the_stored_value():
    graph, nodes = txt2img()
    sampler = nodes["sampler"]
    sampler["inputs"].append({"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": None})
    primitive = graph.add("PrimitiveNode", [5, "fixed"], outputs=[("INT", "INT")], node_id=20)
    graph.connect(primitive, 0, sampler, len(sampler["inputs"]) - 1)
    assert convert(graph)["3"]["inputs"]["steps"] == 5  # the widget's stored value (8) is superseded
    assert "20" not in convert(graph)


def test_primitive_seed_value_is_inlined_and_its_control_value_ignored():
    graph, nodes = txt2img()
    sampler = nodes["sampler"]
    sampler["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": None})
    seed = graph.add("PrimitiveNode", [1234, "randomize"], outputs=[("INT", "INT")], title="Seed", node_id=21)
    graph.connect(seed, 0, sampler, len(sampler["inputs"]) - 1)
    assert convert(graph)["3"]["inputs"]["seed"] == 1234


def test_links_follow_chains_of_reroutes():
    graph, nodes = txt2img()
    first = graph.add("Reroute", inputs=[("", "*")], outputs=[("", "MODEL")], node_id=30)
    second = graph.add("Reroute", inputs=[("", "*")], outputs=[("", "MODEL")], node_id=31)
    graph.links = [link for link in graph.links if link[3] != 3 or link[4] != 0]  # drop loader -> sampler
    graph.connect(nodes["loader"], 0, first, 0)
    graph.connect(first, 0, second, 0)
    graph.connect(second, 0, nodes["sampler"], 0)
    prompt = convert(graph)
    assert prompt["3"]["inputs"]["model"] == ["4", 0]
    assert not {"30", "31"} & set(prompt)


def test_links_follow_kjnodes_set_and_get_pairs():
    graph, nodes = txt2img()
    setter = graph.add("SetNode", ["vae"], inputs=[("VAE", "VAE")], outputs=[("*", "*")], node_id=40)
    getter = graph.add("GetNode", ["vae"], outputs=[("VAE", "VAE")], node_id=41)
    graph.links = [link for link in graph.links if link[3] != 8 or link[4] != 1]  # drop loader -> decode.vae
    graph.connect(nodes["loader"], 2, setter, 0)
    graph.connect(getter, 0, nodes["decode"], 1)
    assert convert(graph)["8"]["inputs"]["vae"] == ["4", 2]
    graph.connect(setter, 0, nodes["decode"], 1)  # a SetNode also passes its input straight through
    assert convert(graph)["8"]["inputs"]["vae"] == ["4", 2]


def test_bypassed_node_passes_its_matching_input_through_and_muted_nodes_are_dropped():
    graph, nodes = txt2img()
    upscale = graph.add("LatentUpscaleBy", ["bilinear", 2.0], inputs=[("samples", "LATENT")],
                        outputs=[("LATENT", "LATENT")], mode=uw.MODE_BYPASSED, node_id=50)
    graph.links = [link for link in graph.links if link[3] != 8 or link[4] != 0]  # drop sampler -> decode
    graph.connect(nodes["sampler"], 0, upscale, 0)
    graph.connect(upscale, 0, nodes["decode"], 0)
    graph.add("SaveImage", ["muted"], inputs=[("images", "IMAGE")], mode=uw.MODE_MUTED, node_id=51)
    graph.connect(nodes["decode"], 0, graph.nodes[-1], 0)
    prompt = convert(graph)
    assert prompt["8"]["inputs"]["samples"] == ["3", 0]
    assert not {"50", "51"} & set(prompt)


def test_bypassed_node_passes_the_first_input_of_its_output_type_when_the_same_slot_differs():
    graph, nodes = txt2img()
    blend = graph.add("LatentWithVAE", inputs=[("vae", "VAE"), ("samples", "LATENT")],
                      outputs=[("LATENT", "LATENT")], mode=uw.MODE_BYPASSED, node_id=52)
    graph.links = [link for link in graph.links if link[3] != 8 or link[4] != 0]  # drop sampler -> decode
    graph.connect(nodes["loader"], 2, blend, 0)
    graph.connect(nodes["sampler"], 0, blend, 1)
    graph.connect(blend, 0, nodes["decode"], 0)
    assert convert(graph)["8"]["inputs"]["samples"] == ["3", 0]


def test_an_input_fed_by_a_muted_node_is_left_unconnected():
    graph, nodes = txt2img()
    nodes["latent"]["mode"] = uw.MODE_MUTED
    prompt = convert(graph)
    assert "5" not in prompt and "latent_image" not in prompt["3"]["inputs"]


def test_links_in_the_newer_dict_schema_convert_the_same():
    graph, _ = txt2img()
    expected = convert(graph)
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    workflow = graph.workflow()
    workflow["links"] = [dict(zip(keys, link, strict=True)) for link in workflow["links"]]
    assert uw.ui_to_api(workflow, NODE_CLASSES) == expected


def test_a_reroute_cycle_leaves_the_input_unconnected():
    graph, nodes = txt2img()
    first = graph.add("Reroute", inputs=[("", "*")], outputs=[("", "MODEL")], node_id=60)
    second = graph.add("Reroute", inputs=[("", "*")], outputs=[("", "MODEL")], node_id=61)
    graph.links = [link for link in graph.links if link[3] != 3 or link[4] != 0]
    graph.connect(first, 0, second, 0)
    graph.connect(second, 0, first, 0)
    graph.connect(second, 0, nodes["sampler"], 0)
    assert "model" not in convert(graph)["3"]["inputs"]


# --------------------------------------------------------------------------------------------------
# Front-end-only content and errors


def test_notes_and_groups_are_ignored():
    graph, _ = txt2img()
    expected = convert(graph)
    graph.add("Note", ["remember the seed"], node_id=70)
    graph.add("MarkdownNote", ["# Model links"], node_id=71)
    graph.groups.append({"title": "Sampling", "bounding": [0, 0, 800, 400], "color": "#3f789e", "font_size": 24})
    assert convert(graph) == expected


def test_unknown_node_types_and_subgraphs_are_reported():
    graph, nodes = txt2img()
    nodes["loader"]["type"] = "SomePackLoader"
    with pytest.raises(uw.WorkflowFormatError, match="'SomePackLoader' .*node #4.*not installed"):
        convert(graph)
    with pytest.raises(uw.WorkflowFormatError, match="subgraphs"):
        uw.ui_to_api({"nodes": [], "links": [], "definitions": {"subgraphs": [{"id": "x"}]}}, NODE_CLASSES)


def test_format_detection_and_id_order():
    graph, _ = txt2img()
    assert uw.is_ui_format(graph.workflow()) and not uw.is_api_format(graph.workflow())
    assert uw.is_api_format(convert(graph)) and not uw.is_api_format({})
    assert sorted(["10", "9", "b", "a", "100"], key=uw.node_id_key) == ["9", "10", "100", "a", "b"]
