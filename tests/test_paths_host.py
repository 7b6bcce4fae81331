"""Paths a workflow names stay inside ComfyUI's folders (issue #18), on the real host.

Each test points ComfyUI's input folder at its own temp folder. "Read" is watched through ``open``,
``os.open``, ``os.listdir`` and ``os.scandir`` (process-wide, so the pack copy ComfyUI imported is watched too):
a refused path must be refused before any of them touches it.
"""
from __future__ import annotations

import builtins
import json
import os

import numpy as np
import pytest

from likeness.errors import PathNotAllowedError
from likeness.host import folders, paths

pytestmark = pytest.mark.host

ENV = paths.ALLOW_ANY_PATH_ENV


def _write_photo(path, value: int, caption: str | None = None) -> None:
    from PIL import Image

    Image.fromarray(np.full((24, 32, 3), value, dtype=np.uint8)).save(path)
    if caption is not None:
        with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as handle:
            handle.write(caption)


@pytest.fixture
def layout(tmp_path, monkeypatch, host_env):
    """input/faces (2 photos), outside/ (1 photo), input/etc_link -> /etc, input/outside_link -> outside/,
    input/mixed (one photo and a link to the outside photo); ComfyUI's input folder is input/."""
    import folder_paths

    input_dir, outside = tmp_path / "input", tmp_path / "outside"
    for folder in (input_dir / "faces", input_dir / "mixed", outside):
        folder.mkdir(parents=True)
    _write_photo(str(input_dir / "faces" / "a.png"), 50, "a photo of Ada")
    _write_photo(str(input_dir / "faces" / "b.png"), 200)
    _write_photo(str(outside / "private.png"), 120, "private caption")
    _write_photo(str(input_dir / "mixed" / "own.png"), 90)
    os.symlink("/etc", input_dir / "etc_link")
    os.symlink(outside, input_dir / "outside_link")
    os.symlink(outside / "private.png", input_dir / "mixed" / "linked.png")
    monkeypatch.setattr(folder_paths, "input_directory", str(input_dir))
    monkeypatch.delenv(ENV, raising=False)
    return {"input": str(input_dir), "outside": str(outside)}


@pytest.fixture
def reads(monkeypatch):
    """Every path opened or listed while the test runs (realpath'd)."""
    seen: list[str] = []

    def watch(function):
        def wrapper(path=".", *args, **kwargs):
            if isinstance(path, (str, bytes, os.PathLike)):
                seen.append(os.path.realpath(os.fsdecode(path)))
            return function(path, *args, **kwargs)
        return wrapper

    for owner, name in ((builtins, "open"), (os, "open"), (os, "listdir"), (os, "scandir")):
        monkeypatch.setattr(owner, name, watch(getattr(owner, name)))
    return seen


def _touched(seen: list[str], folder: str) -> list[str]:
    real = os.path.realpath(folder)
    return [p for p in seen if paths.is_inside(p, real)]


def refused_cases(layout) -> dict[str, tuple[str, str]]:
    """case -> (the folder as typed, the real folder it would read)."""
    return {
        "absolute outside": (layout["outside"], layout["outside"]),
        "dot-dot": ("faces/../../outside", layout["outside"]),
        "symlink to /etc": ("etc_link", "/etc"),
    }


@pytest.mark.parametrize("case", ["absolute outside", "dot-dot", "symlink to /etc"])
def test_refused_before_any_file_is_read(layout, reads, case):
    from likeness.trainers.datasets import training_sources

    typed, real = refused_cases(layout)[case]
    with pytest.raises(PathNotAllowedError) as caught:
        training_sources(None, None, paths.resolve_user_path(typed, paths.INPUT, "training folder"))
    message = str(caught.value)
    assert message.startswith("training folder: ") and f"resolves to '{os.path.realpath(real)}'" in message
    assert layout["input"] in message and f"{ENV}=1" in message
    assert _touched(reads, real) == []


def test_a_link_inside_a_folder_counts_as_its_target(layout, reads):
    with pytest.raises(PathNotAllowedError, match="entry 'linked.png'"):
        paths.resolve_user_path("mixed", paths.INPUT, "training folder")
    assert _touched(reads, layout["outside"]) == []


@pytest.mark.parametrize("case", ["absolute outside", "dot-dot", "symlink to /etc"])
def test_the_operator_opt_in_accepts_them(layout, monkeypatch, case):
    monkeypatch.setenv(ENV, "1")
    typed, real = refused_cases(layout)[case]
    resolved = paths.resolve_user_path(typed, paths.INPUT, "training folder")
    assert os.path.realpath(resolved) == os.path.realpath(real)


def test_opt_in_folder_outside_is_read(layout, monkeypatch):
    from likeness.trainers.datasets import training_sources

    monkeypatch.setenv(ENV, "1")
    sources = training_sources(None, None, paths.resolve_user_path(layout["outside"], paths.INPUT))
    assert [(name, caption) for name, _image, caption in sources] == [("private.png", "private caption")]


def test_a_folder_inside_input_works_as_before(layout):
    from likeness.trainers.datasets import training_sources

    for typed in ("faces", " faces ", os.path.join(layout["input"], "faces"), "faces/../faces"):
        resolved = paths.resolve_user_path(typed, paths.INPUT, "training folder")
        assert os.path.realpath(resolved) == os.path.realpath(os.path.join(layout["input"], "faces"))
    assert paths.resolve_user_path("faces") == os.path.join(layout["input"], "faces")  # the path as before
    sources = training_sources(None, None, paths.resolve_user_path("faces"))
    assert [(name, caption) for name, _image, caption in sources] == [("a.png", "a photo of Ada"),
                                                                        ("b.png", "a photo of a person")]


def _train_prompt(folder: str) -> dict:
    return {
        "1": {"class_type": "LikenessTestTinySD15Loader", "inputs": {"seed": 0}},
        "2": {"class_type": "LikenessTrainFaceFusion", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "name": "paths_test", "steps": 1,
            "learning_rate": 1e-4, "batch_size": 1, "grad_accumulation": 1, "seed": 0, "checkpoint_every": 0,
            "resume": "fresh", "resolution": 64, "reference_size": 256, "folder": folder}},
    }


@pytest.mark.parametrize("case", ["absolute outside", "dot-dot", "symlink to /etc"])
def test_train_node_in_the_executor_refuses(layout, reads, execute_prompt, host_test_nodes, host_env, case):
    """What a remote user would queue: ComfyUI's executor reports the refusal and nothing was read."""
    from likeness.cli.runner import PromptExecutionError

    typed, real = refused_cases(layout)[case]
    with pytest.raises(PromptExecutionError) as caught:
        execute_prompt(_train_prompt(typed))
    details = caught.value.details
    assert details["exception_type"].endswith("PathNotAllowedError")
    assert layout["input"] in details["exception_message"] and f"{ENV}=1" in details["exception_message"]
    assert _touched(reads, real) == []
    assert not os.path.exists(os.path.join(host_env.models, "likeness", "fusion", "paths_test.safetensors"))


# ---- model files ------------------------------------------------------------------------------------

@pytest.fixture
def extra_models(tmp_path, monkeypatch, layout):
    """A models folder registered for 'likeness' the way extra_model_paths.yaml adds one, with a real file
    and an operator's symlink to a file elsewhere."""
    import folder_paths

    extra = tmp_path / "extra_models"
    (extra / "identities").mkdir(parents=True)
    (extra / "identities" / "me.safetensors").write_bytes(b"{}")
    elsewhere = tmp_path / "disk2" / "big.safetensors"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"{}")
    os.symlink(elsewhere, extra / "identities" / "linked.safetensors")
    known, extensions = folder_paths.folder_names_and_paths["likeness"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "likeness", ([*known, str(extra)], extensions))
    return extra


def test_model_names_stay_in_the_model_folders(extra_models, reads):
    assert folders.resolve("likeness", "me.safetensors", "identities") == str(extra_models / "identities" /
                                                                             "me.safetensors")
    # links the operator put in a model folder are followed, as ComfyUI's loaders follow them
    assert folders.resolve("likeness", "linked.safetensors", "identities").endswith("linked.safetensors")
    with pytest.raises(PathNotAllowedError, match="likeness file '../../../../../../etc/passwd'"):
        folders.resolve("likeness", "../../../../../../etc/passwd", "identities")
    with pytest.raises(PathNotAllowedError):
        folders.resolve("loras", "/etc/passwd")
    assert _touched(reads, "/etc") == []


def test_model_paths_typed_absolute(extra_models, layout, reads, monkeypatch):
    from likeness.face_analysis.analyzers.insightface_backend import resolve_pack
    from likeness.face_analysis.parsing.loader import load_face_parser

    inside = str(extra_models / "identities" / "me.safetensors")
    assert paths.resolve_user_path(inside, paths.MODEL) == inside
    with pytest.raises(PathNotAllowedError, match="face parser file"):
        load_face_parser(os.path.join(layout["outside"], "private.png"))
    with pytest.raises(PathNotAllowedError, match="insightface pack folder"):
        resolve_pack("/etc")
    assert _touched(reads, layout["outside"]) == [] and _touched(reads, "/etc") == []
    monkeypatch.setenv(ENV, "1")
    assert paths.resolve_user_path("/etc/hostname", paths.MODEL) == "/etc/hostname"


# ---- the command line ----------------------------------------------------------------------------

def test_the_run_command_accepts_any_path(layout, pack_loaded, host_env, tmp_path, monkeypatch,
                                          isolated_runner_state):
    """``python <pack> run`` executes as the local user: the workflow's paths resolve as they always did."""
    import argparse

    from likeness.cli import runner

    resolved = {}

    def execute(prompt, on_event=None):
        folder = prompt["2"]["inputs"]["folder"]
        resolved[folder] = pack_loaded.host.paths.resolve_user_path(folder, "input", "training folder")
        return {}

    monkeypatch.setattr(runner, "execute_prompt", execute)
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(_train_prompt(layout["outside"])))
    parser = argparse.ArgumentParser()
    runner.add_run_arguments(parser)
    args = parser.parse_args([str(workflow), "--out", str(tmp_path / "out"), "--comfyui", host_env.comfy_path])
    assert runner.run_from_args(args) == runner.EXIT_OK
    assert resolved == {layout["outside"]: layout["outside"]}
    assert ENV not in os.environ  # only while the command runs
    with pytest.raises(PathNotAllowedError):
        paths.resolve_user_path(layout["outside"])
