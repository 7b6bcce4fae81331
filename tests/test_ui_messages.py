"""Messages a person can act on: exception names, advice that fits the failing node, missing-model hints with the
fetch command, and warnings returned as the node's UI text (plain; the host tests run them through ComfyUI)."""
from __future__ import annotations

import logging
import threading

import pytest
import torch

from likeness import errors, model_hints
from likeness.errors import InvalidInputError, ModelFileError, NoFaceError
from likeness.nodes._feedback import shows_warnings, with_ui_text


def comfy_type_name(klass) -> str:
    """What ComfyUI's execution.full_type_name shows in the UI for an exception class."""
    module = klass.__module__
    return klass.__qualname__ if module == "builtins" else f"{module}.{klass.__qualname__}"


# --------------------------------------------------------------------------- exception names

def test_every_pack_exception_prints_as_likeness_dot_name():
    from likeness.cli.fetch import FetchError, HashMismatchError
    from likeness.cli.manifest import ManifestError

    for klass in (errors.LikenessError, InvalidInputError, NoFaceError, ModelFileError, errors.CheckpointLayoutError,
                  errors.IncompatibleEmbedsError, errors.TrainingError, errors.MissingDependencyError, FetchError,
                  HashMismatchError, ManifestError):
        assert comfy_type_name(klass) == f"likeness.{klass.__qualname__}"


def test_a_subclass_defined_anywhere_gets_the_public_name():
    class LateError(errors.LikenessError):
        pass

    assert LateError.__module__ == "likeness"
    assert isinstance(LateError("x"), errors.LikenessError)


# --------------------------------------------------------------------------- advice fits the node

def test_no_face_error_keeps_the_problem_and_swaps_the_advice():
    error = NoFaceError("No usable face in image 0.", "Set on_no_face to 'skip'.")
    assert str(error) == "No usable face in image 0. Set on_no_face to 'skip'."
    other = error.with_advice("Replace the photo.")
    assert isinstance(other, NoFaceError) and str(other) == "No usable face in image 0. Replace the photo."
    assert str(NoFaceError("only a problem")) == "only a problem"


def test_facea_trainer_advice_names_only_its_own_inputs():
    pytest.importorskip("dlib")
    from likeness.face_analysis.analyzers.dlib_backend import load_dlib
    from likeness.techniques.facea_net.training import analyze_largest

    blank = torch.zeros(2, 96, 96, 3)
    with pytest.raises(NoFaceError) as error:
        analyze_largest(load_dlib(), blank)
    message = str(error.value)
    assert "indices [0, 1]" in message and "'images'" in message and "validation_image" in message
    assert "on_no_face" not in message   # the trainer has no such input


def test_inpaint_advice_offers_only_its_own_on_no_face_choice():
    from likeness.techniques.facea_net.pipeline import NO_FACE, NO_FACE_ADVICE

    assert "'pass_through'" in NO_FACE_ADVICE and "'skip'" not in NO_FACE_ADVICE and "skip" not in NO_FACE


# --------------------------------------------------------------------------- missing model files

@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """An empty models folder, for the pack alone ($LIKENESS_MODELS_DIR) and inside ComfyUI (folder_paths)."""
    monkeypatch.setenv("LIKENESS_MODELS_DIR", str(tmp_path))
    from likeness.host import comfy_available

    if comfy_available():
        import folder_paths

        monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
        monkeypatch.setattr(folder_paths, "filename_list_cache", {})
        for name in ("likeness", "insightface"):
            if name in folder_paths.folder_names_and_paths:
                _, extensions = folder_paths.folder_names_and_paths[name]
                monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(tmp_path / name)], extensions))
    return tmp_path


def test_pack_command_as_run_from_the_comfyui_folder(monkeypatch):
    monkeypatch.setattr(model_hints, "PACK_DIR", "/srv/ComfyUI/custom_nodes/likeness")
    assert model_hints.pack_command() == "python custom_nodes/likeness"
    monkeypatch.setattr(model_hints, "PACK_DIR", "/home/me/my packs/likeness")
    assert model_hints.pack_command() == "python '/home/me/my packs/likeness'"


def test_fetch_ids_come_from_the_manifest_by_folder_and_name():
    assert model_hints.fetch_ids(["insightface/models"]) == ["insightface-buffalo_l", "insightface-antelopev2"]
    assert model_hints.fetch_ids(["insightface/models"], "antelopev2") == ["insightface-antelopev2"]
    assert model_hints.fetch_ids(["likeness/faceid"], "faceid/ip-adapter-faceid_sd15.bin") == ["ipadapter-faceid-sd15"]
    assert model_hints.fetch_ids(["likeness/fusion"]) == []


@pytest.mark.parametrize("node_id,input_name,placeholder_attr,folder,fetch_id", [
    ("LikenessInsightFaceLoader", "pack", "NO_PACK", "models/insightface/models", "insightface-antelopev2"),
    ("LikenessConsistentIDLoader", "model_name", "NO_FILE", "models/likeness/consistentid", "consistentid-sd15"),
    ("LikenessFaceIDLoader", "model_name", "NO_FILE", "models/likeness/faceid", "ipadapter-faceid-plusv2-sd15"),
])
def test_an_empty_loader_names_the_folder_and_the_fetch_command(models_dir, node_id, input_name, placeholder_attr,
                                                                folder, fetch_id):
    import importlib

    from likeness import NODE_CLASS_MAPPINGS

    cls = NODE_CLASS_MAPPINGS[node_id]
    placeholder = getattr(importlib.import_module(cls.__module__), placeholder_attr)
    assert cls.INPUT_TYPES()["required"][input_name][0] == [placeholder]
    problem = cls.VALIDATE_INPUTS(**{input_name: placeholder})
    assert isinstance(problem, str) and folder in problem and str(models_dir) in problem
    assert f"models fetch {fetch_id}`" in problem and model_hints.pack_command() in problem
    with pytest.raises(ModelFileError) as error:
        loader_args = {"LikenessInsightFaceLoader": ("CPU", "none", 640, 0.5), "LikenessFaceIDLoader": ("auto",)}
        getattr(cls(), cls.FUNCTION)(placeholder, *loader_args.get(node_id, ()))
    assert f"models fetch {fetch_id}`" in str(error.value)


def test_a_workflow_naming_a_file_that_is_not_here(models_dir):
    from likeness.nodes.consistentid import ConsistentIDLoader
    from likeness.nodes.face_analysis import InsightFaceAnalyzerLoader

    problem = InsightFaceAnalyzerLoader.VALIDATE_INPUTS("antelopev2")
    assert "insightface pack 'antelopev2' was not found" in problem
    assert "models fetch insightface-antelopev2`" in problem and "buffalo_l`" not in problem
    problem = ConsistentIDLoader.VALIDATE_INPUTS("ConsistentID-v1.bin")
    assert problem.startswith("'ConsistentID-v1.bin' is not in models/likeness/consistentid (looked in: ")
    folder = models_dir / "likeness" / "consistentid"
    folder.mkdir(parents=True)
    (folder / "ConsistentID-v1.bin").write_bytes(b"x")
    assert ConsistentIDLoader.VALIDATE_INPUTS("ConsistentID-v1.bin") is True


def test_files_the_pack_trains_name_the_node_that_makes_them(models_dir):
    from likeness.nodes.face_fusion import NO_ADAPTER, FusionAdapterLoader
    from likeness.nodes.facea_net import NO_IDENTITY, LoadIdentity

    assert "Train one with the Train Face Fusion node" in FusionAdapterLoader.VALIDATE_INPUTS(NO_ADAPTER)
    assert "models fetch" not in FusionAdapterLoader.VALIDATE_INPUTS(NO_ADAPTER)
    with pytest.raises(ModelFileError, match=r"No FaceA-Net identity found in models/likeness/identities.*Train one"):
        LoadIdentity().load(NO_IDENTITY)


def test_the_parser_loader_offers_the_fetch_command_and_the_landmark_fallback(models_dir):
    from likeness.face_analysis.parsing import LANDMARKS_CHOICE
    from likeness.face_analysis.parsing.loader import load_face_parser
    from likeness.nodes.face_parsing import FaceParserLoader

    assert FaceParserLoader.VALIDATE_INPUTS(LANDMARKS_CHOICE) is True
    problem = FaceParserLoader.VALIDATE_INPUTS("face_parsing.pth")
    assert "models fetch bisenet-face-parsing`" in problem and "landmarks (no weights)" in problem
    with pytest.raises(ModelFileError, match="models fetch bisenet-face-parsing`"):
        load_face_parser("face_parsing.pth")


# --------------------------------------------------------------------------- warnings reach the UI

class _Node:
    @shows_warnings
    def run(self, warn: bool):
        if warn:
            logging.getLogger("likeness").warning("image %d: no face found; passed through unchanged", 0)
        logging.getLogger("likeness").info("not shown: info")
        return ("result",)


def test_warnings_become_ui_text_and_the_result_is_kept():
    assert _Node().run(False) == ("result",)
    assert _Node().run(True) == {"ui": {"text": ["image 0: no face found; passed through unchanged"]},
                                 "result": ("result",)}


def test_existing_ui_text_is_kept_and_other_threads_are_not_mixed_in():
    assert with_ui_text({"ui": {"text": ["report"]}, "result": (1,)}, ["warning"]) == {
        "ui": {"text": ["report", "warning"]}, "result": (1,)}
    started, release = threading.Event(), threading.Event()

    def other_thread():
        started.wait()
        logging.getLogger("likeness").warning("from another prompt")
        release.set()

    worker = threading.Thread(target=other_thread)
    worker.start()

    class Node:
        @shows_warnings
        def run(self):
            started.set()
            release.wait(5)
            return ("r",)

    assert Node().run() == ("r",)
    worker.join()


def test_reference_images_without_a_face_are_reported():
    import numpy as np

    from likeness.face_analysis.analyze import warn_images_without_face
    from likeness.face_analysis.types import Face, FaceAnalysis

    face = Face(bbox=np.array([0, 0, 10, 10], np.float32), score=0.9, kps=np.zeros((5, 2), np.float32))
    faces = FaceAnalysis(faces=[[face], [], [face]], image_sizes=[(32, 32)] * 3, backend="t", model_id="t")

    class Node:
        @shows_warnings
        def run(self):
            return (warn_images_without_face(faces, "image"),)

    output = Node().run()
    assert output["result"] == ([1],)
    assert output["ui"]["text"] == ["Likeness: image(s) [1] of 'image' have no face and were left out of the identity "
                                    "(2 of 3 used); check Analyze Faces' preview."]


def test_stacking_names_keep_earlier_applications():
    from likeness.attention_patches.injectors import DecoupledInjector, stacking_name

    existing = [DecoupledInjector("face_fusion", None), DecoupledInjector("face_fusion#2", None)]
    assert stacking_name([], "face_fusion") == "face_fusion"
    assert stacking_name(existing, "face_fusion") == "face_fusion#3"
    assert stacking_name(existing, "plusv2") == "plusv2"
