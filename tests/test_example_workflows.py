"""The shipped example workflows as files, without ComfyUI: the frontend's format, layout and names.

The browser test (``test_browser_frontend.py``) checks the same in the real frontend where Chromium is
installed; this one runs everywhere, on the stored positions and sizes.
"""
from __future__ import annotations

import json
import os

import pytest

from likeness import NODE_CLASS_MAPPINGS
from likeness.cli.ui_workflow import map_widget_values
from workflow_layout import EXAMPLES, EXAMPLES_DIR, Box, layout_problems

NAMES = sorted(e.name for e in EXAMPLES)
TRAINERS = {"LikenessTrainFaceFusion", "LikenessTrainConsistentID", "LikenessFaceATrainIdentity",
            "LikenessFaceAAttributeTransfer", "LikenessM3FaceImagicTrain"}
# Loader input -> the trainers whose outputs it loads
TRAINED_FILES = {("LikenessFusionAdapterLoader", "adapter_name"): {"LikenessTrainFaceFusion"},
                 ("LikenessFaceALoadIdentity", "identity"): {"LikenessFaceATrainIdentity",
                                                             "LikenessFaceAAttributeTransfer"}}
SECOND_IDENTITY = "ben.safetensors"  # the two-people example's note says to train it under this name
NODE_TITLE = 30


def load(name: str) -> dict:
    with open(os.path.join(EXAMPLES_DIR, name + ".json"), encoding="utf-8") as handle:
        return json.load(handle)


def pack_widgets(node: dict) -> dict:
    return map_widget_values(NODE_CLASS_MAPPINGS[node["type"]], node.get("widgets_values"))


def test_the_folder_holds_exactly_the_examples_each_with_a_thumbnail():
    files = sorted(os.listdir(EXAMPLES_DIR))
    assert [f for f in files if f.endswith(".json")] == sorted(n + ".json" for n in NAMES)  # "x (SDXL)" before "x."
    assert [f for f in files if f.endswith(".jpg")] == sorted(n + ".jpg" for n in NAMES)
    assert set(files) == {n + ext for n in NAMES for ext in (".json", ".jpg")}
    for name in NAMES:
        assert os.path.getsize(os.path.join(EXAMPLES_DIR, name + ".jpg")) < 100_000, name
        with open(os.path.join(EXAMPLES_DIR, name + ".jpg"), "rb") as handle:
            assert handle.read(3) == b"\xff\xd8\xff", name


@pytest.mark.parametrize("name", NAMES)
def test_example_is_in_the_frontend_format_opening_at_100_percent(name):
    workflow = load(name)
    assert workflow["version"] == 0.4 and workflow["extra"]["ds"]["scale"] == 1
    ids = {node["id"] for node in workflow["nodes"]}
    assert workflow["last_node_id"] == max(ids) and workflow["last_link_id"] == max(link[0] for link in workflow["links"])
    for link in workflow["links"]:
        _id, source, _slot, target, _target_slot, kind = link
        assert source in ids and target in ids and isinstance(kind, str), link
    for node in workflow["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "properties"} <= set(node), node["id"]
        if node["type"] != "Note":
            assert node["properties"]["Node name for S&R"] == node["type"]
        if node["type"] in NODE_CLASS_MAPPINGS:
            pack_widgets(node)  # widget values map onto the node's inputs


@pytest.mark.parametrize("name", NAMES)
def test_example_layout_has_no_overlaps_and_a_note_in_every_group(name):
    workflow = load(name)
    nodes = [Box(f"#{n['id']} {n['type']}", n["pos"][0], n["pos"][1] - NODE_TITLE, n["size"][0],
                 n["size"][1] + NODE_TITLE) for n in workflow["nodes"]]
    groups = [Box(g["title"], *g["bounding"]) for g in workflow["groups"]]
    assert not layout_problems(nodes, groups)
    notes = [box for box, node in zip(nodes, workflow["nodes"], strict=True) if node["type"] == "Note"]
    assert len(notes) == len(groups) and all(any(g.contains(n) for n in notes) for g in groups)
    assert all(g["title"] and g["color"] for g in workflow["groups"])


@pytest.mark.parametrize("name", NAMES)
def test_seeds_are_fixed_and_trainer_seeds_have_no_randomize_control(name):
    for node in load(name)["nodes"]:
        values = node.get("widgets_values") or []
        if node["type"] in TRAINERS:
            seed = pack_widgets(node)["seed"]
            assert isinstance(seed, int) and "randomize" not in values and "fixed" not in values
        elif node["type"] in ("KSampler", "LikenessApplyFaceFusion", "LikenessFaceAInpaint"):
            assert "fixed" in values and "randomize" not in values, (node["id"], values)


def test_trainer_seed_inputs_tell_the_frontend_not_to_randomize():
    for node_type in TRAINERS:
        spec = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
        seed = {**spec["required"], **spec.get("optional", {})}["seed"]
        assert seed[0] == "INT" and seed[1]["control_after_generate"] is False, node_type


def test_checkpoints_come_from_the_manifest_and_loaders_name_what_the_trainers_write():
    with open(os.path.join(os.path.dirname(EXAMPLES_DIR), "models_manifest.json"), encoding="utf-8") as handle:
        manifest = {os.path.basename(e["filename"]) for e in json.load(handle)["models"]}
    trained = {kind: set() for kind in TRAINERS}
    loaded = []
    for name in NAMES:
        for node in load(name)["nodes"]:
            if node["type"] == "CheckpointLoaderSimple":
                assert node["widgets_values"][0] in manifest, (name, node["widgets_values"])
            elif node["type"] in TRAINERS:
                trained[node["type"]].add(pack_widgets(node)["name"] + ".safetensors")
            for (kind, widget), trainers in TRAINED_FILES.items():
                if node["type"] == kind:
                    loaded.append((name, pack_widgets(node)[widget], trainers))
    for name, value, trainers in loaded:
        written = set().union(*(trained[t] for t in trainers)) | {SECOND_IDENTITY}
        assert value in written, f"{name} loads {value}; the trainer examples write {sorted(written)}"


def test_every_model_file_an_example_reads_is_in_the_manifest_or_made_by_an_example():
    """What 'models verify --for' reads from each example: every file widget of a known loader names a manifest
    file (so 'models fetch' can get it) or a file one of the examples writes (a trainer's, a saved embedding)."""
    from likeness.cli import workflow_models as wf
    from likeness.cli.manifest import load_manifest

    entries = load_manifest()
    files = {name: wf.workflow_files(wf.load_prompt(os.path.join(EXAMPLES_DIR, name + ".json"))[0]) for name in NAMES}
    written = [w for _needed, made in files.values() for w in made]
    written.append(wf.WrittenFile("likeness/identities/" + SECOND_IDENTITY, "the two-identities example's note"))
    unknown = {name: [f"{n.relative} ({', '.join(n.nodes)})" for n in needed
                      if wf.manifest_entry(entries, n) is None and not wf.folder_entries(entries, n)
                      and wf.maker(written, n) is None]
               for name, (needed, _made) in files.items()}
    assert not {name: found for name, found in unknown.items() if found}
    (loaders,) = [{n.relative for n in files[name][0]} for name in ["PuLID-FLUX - portrait"]]
    assert loaders >= {"diffusion_models/flux1-dev.safetensors", "text_encoders/clip_l.safetensors",
                       "text_encoders/t5xxl_fp16.safetensors", "vae/ae.safetensors",
                       "pulid/pulid_flux_v0.9.1.safetensors", "clip_vision/EVA02_CLIP_L_336_psz14_s6B.pt",
                       "insightface/models/antelopev2", "likeness/parsing/face_parsing.pth"}


@pytest.mark.parametrize("name", [n for n in NAMES if "Flux" in n or "FLUX" in n])
def test_flux_example_notes_name_the_fetch_id_of_every_file_they_read(name):
    """FLUX.1's files are large and spread over four folders: the notes name each one's 'models fetch' id."""
    from likeness.cli import workflow_models as wf
    from likeness.cli.manifest import load_manifest

    entries = load_manifest()
    (example,) = [e for e in EXAMPLES if e.name == name]
    notes = " ".join(stage.note for stage in example.stages)
    needed, _written = wf.workflow_files(wf.load_prompt(os.path.join(EXAMPLES_DIR, name + ".json"))[0])
    ids = [wf.manifest_entry(entries, n).id for n in needed]
    assert "flux1-dev" in ids and [i for i in ids if i not in notes] == []
