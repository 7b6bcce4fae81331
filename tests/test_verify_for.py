"""``models verify --for WORKFLOW.json``: exactly the model files one workflow loads (cli/workflow_models.py)."""
from __future__ import annotations

import inspect
import json
import os

import pytest

from likeness.cli import manifest as mf
from likeness.cli import workflow_models as wf
from likeness.cli.main import main
from likeness.cli.ui_workflow import widget_inputs
from test_cli_models import PAYLOAD, small_entry, write_manifest


@pytest.fixture(autouse=True)
def _no_models_env(monkeypatch):
    monkeypatch.delenv(mf.MODELS_DIR_ENV, raising=False)


@pytest.fixture
def manifest(tmp_path):
    """A present checkpoint (real sha256), a missing adapter and a missing insightface pack."""
    return write_manifest(tmp_path / "manifest.json", [
        small_entry(id="tiny-ckpt", filename="tiny.safetensors", folder="checkpoints"),
        small_entry(id="tiny-faceid", filename="faceid.bin", folder="likeness/faceid"),
        small_entry(id="tiny-pack", filename="pack.zip", folder="insightface/models/tinypack", sha256="", size=None,
                    approx_size_mb=1, archive={"format": "zip", "members": ["det.onnx"]}),
    ])


@pytest.fixture
def models(tmp_path):
    folder = tmp_path / "models"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "tiny.safetensors").write_bytes(PAYLOAD)
    return folder


def ui_node(node_id, kind, values, title=None, inputs=()):
    node = {"id": node_id, "type": kind, "pos": [0, 0], "size": [200, 100], "mode": 0, "inputs": list(inputs),
            "outputs": [], "widgets_values": values}
    if title:
        node["title"] = title
    return node


def ui_workflow(*nodes, links=()):
    return {"last_node_id": 99, "last_link_id": 9, "nodes": list(nodes), "links": list(links), "groups": [],
            "version": 0.4}


def verify_for(capsys, workflow, tmp_path, manifest, models, name="wf.json"):
    path = tmp_path / name
    path.write_text(json.dumps(workflow))
    code = main(["models", "verify", "--for", str(path), "--manifest", manifest, "--models-dir", str(models)])
    return code, capsys.readouterr().out


def _line(out: str, start: str) -> str:
    return next(line for line in out.splitlines() if line.strip().startswith(start))


def test_ui_workflow_reports_present_missing_unknown_and_trainer_made(capsys, tmp_path, manifest, models):
    workflow = ui_workflow(
        {"id": 50, "type": "Note", "pos": [0, 0], "size": [10, 10], "widgets_values": ["read me"]},
        ui_node(1, "CheckpointLoaderSimple", ["tiny.safetensors"]),
        ui_node(2, "LikenessFaceIDLoader", ["faceid/faceid.bin", "auto (from file name)"]),
        ui_node(3, "LoraLoader", ["my_style.safetensors", 0.8, 0.8]),
        ui_node(4, "LikenessTrainFaceFusion", ["anna", 500, 1e-4, 1, 1, 7, "fixed", 50, "auto", 512, 256],
                title="Train Anna"),
        ui_node(5, "LikenessFusionAdapterLoader", ["anna.safetensors"]),
        ui_node(6, "LikenessInsightFaceLoader", ["tinypack", "auto", "none", 640, 0.5]),
        ui_node(7, "LikenessFaceParserLoader", ["landmarks (no weights)", "auto"]),
        ui_node(8, "KSampler", [1, "fixed", 20, 7.0, "euler", "normal", 1.0]),  # not a loader: ignored
    )
    code, out = verify_for(capsys, workflow, tmp_path, manifest, models)
    assert code == 1
    assert "(UI format): 5 model file(s)" in out
    assert "tiny-ckpt" in _line(out, "OK          checkpoints/tiny.safetensors") and "sha256 verified" in out
    missing = _line(out, "MISSING     likeness/faceid/faceid.bin")
    assert "tiny-faceid" in missing and "#2 FaceID / Face-MakeUp Loader" in missing
    assert "models fetch tiny-faceid" in out
    assert "tiny-pack" in _line(out, "MISSING     insightface/models/tinypack")
    unknown = _line(out, "NOT FOUND   loras/my_style.safetensors")
    assert "not in the manifest" in unknown and "models/loras/my_style.safetensors" in unknown
    assert "#4 Train Anna" in _line(out, "MADE        likeness/fusion/anna.safetensors")
    assert "landmarks" not in out
    assert "models fetch tiny-faceid tiny-pack" in out  # one command for every missing manifest file


def test_api_workflow_with_everything_present_exits_0(capsys, tmp_path, manifest, models):
    (models / "likeness" / "faceid").mkdir(parents=True)
    (models / "likeness" / "faceid" / "faceid.bin").write_bytes(PAYLOAD)
    (models / "loras" / "sub").mkdir(parents=True)
    (models / "loras" / "sub" / "mine.safetensors").write_bytes(b"x")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "LikenessFaceIDLoader", "inputs": {"model_name": "faceid/faceid.bin",
                                                               "shortcut": "auto (from file name)"}},
        "3": {"class_type": "LoraLoader", "inputs": {"lora_name": "sub/mine.safetensors", "model": ["1", 0],
                                                     "clip": ["1", 1], "strength_model": 1, "strength_clip": 1}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},  # built in, no file
        "5": {"class_type": "LikenessFaceALoadIdentity", "inputs": {"identity": ["9", 0]}},  # linked: unknown yet
    }
    code, out = verify_for(capsys, prompt, tmp_path, manifest, models)
    assert code == 0, out
    assert "(API format): 3 model file(s)" in out
    assert "OK          likeness/faceid/faceid.bin" in out
    assert "not in the manifest, so not verified" in _line(out, "PRESENT     loras/sub/mine.safetensors")


def test_a_facea_trainer_makes_the_identity_and_the_lora_its_workflow_loads(tmp_path):
    prompt = {"1": {"class_type": "LikenessFaceATrainIdentity", "inputs": {"class_word": "woman",
                                                                            "name": "ben.safetensors"}},
              "2": {"class_type": "LikenessFaceALoadIdentity", "inputs": {"identity": "ben.safetensors"}},
              "3": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "likeness/ben.safetensors"}}}
    needed, written = wf.workflow_files(prompt)
    assert [wf.maker(written, item).node for item in needed] == ["#1 Train Identity (FaceA-Net)"] * 2


def test_a_folder_the_manifest_lists_file_by_file(capsys, tmp_path, models):
    """A diffusers folder (M3Face Muse / AltDiffusion): missing files are named with one fetch command; all in
    place is OK; a folder no entry names stays 'not in the manifest'."""
    folder = "likeness/m3face/Muse-x"
    manifest = write_manifest(tmp_path / "manifest.json", [
        small_entry(id="muse-x-transformer", filename="weights.bin", folder=folder + "/transformer"),
        small_entry(id="muse-x-vqvae", filename="weights.bin", folder=folder + "/vqvae"),
        small_entry(id="muse-y-vqvae", filename="weights.bin", folder="likeness/m3face/Muse-xy/vqvae"),
    ])
    prompt = {"1": {"class_type": "LikenessM3FaceMuseLoader", "inputs": {"model": "Muse-x", "device": "auto"}},
              "2": {"class_type": "LikenessM3FaceMuseLoader", "inputs": {"model": "Muse-z", "device": "auto"}}}
    (models / folder / "vqvae").mkdir(parents=True)
    (models / folder / "vqvae" / "weights.bin").write_bytes(PAYLOAD)
    code, out = verify_for(capsys, prompt, tmp_path, manifest, models)
    missing = _line(out, f"MISSING     {folder} ")
    assert code == 1 and "1 of its 2 manifest files: muse-x-transformer)" in missing and "#1 M3Face Muse" in missing
    assert "models fetch muse-x-transformer " in out and "muse-y" not in out
    assert "not in the manifest" in _line(out, "NOT FOUND   likeness/m3face/Muse-z")
    (models / folder / "transformer").mkdir()
    (models / folder / "transformer" / "weights.bin").write_bytes(PAYLOAD)
    del prompt["2"]
    code, out = verify_for(capsys, prompt, tmp_path, manifest, models)
    assert code == 0 and "(all 2 manifest files: muse-x-transformer …)" in _line(out, f"OK          {folder} ")


def test_placeholder_choice_and_broken_file(capsys, tmp_path, manifest, models):
    workflow = ui_workflow(ui_node(1, "LikenessConsistentIDLoader", ["(no file in models/likeness/consistentid)"]))
    code, out = verify_for(capsys, workflow, tmp_path, manifest, models)
    assert code == 1 and "NO FILE     models/likeness/consistentid/" in out
    (tmp_path / "bad.json").write_text("{not json")
    code = main(["models", "verify", "--for", str(tmp_path / "bad.json"), "--models-dir", str(models)])
    assert code == 2 and "is not readable JSON" in capsys.readouterr().err


def test_plain_verify_says_what_it_checks_and_points_to_for(capsys, tmp_path, manifest, models):
    code = main(["models", "verify", "--manifest", manifest, "--models-dir", str(models)])
    out = capsys.readouterr().out
    assert code == 1
    assert "Checking 3 of 3 manifest entries" in out and "the 3 required ones (tiny-ckpt, tiny-faceid, tiny-pack" in out
    assert "models verify --for WORKFLOW.json" in out


# --------------------------------------------------------------------------------------------------
# The declarations in NODE_FILES against the real node classes


def test_pack_node_declarations_match_the_node_classes():
    from likeness.nodes import NODE_CLASS_MAPPINGS

    for node_type, spec in wf.NODE_FILES.items():
        if not node_type.startswith("Likeness"):
            continue
        cls = NODE_CLASS_MAPPINGS[node_type]
        assert tuple(w.name for w in widget_inputs(cls))[:len(spec.widgets)] == spec.widgets, node_type
    for node_type, cls in NODE_CLASS_MAPPINGS.items():  # every loader with a file dropdown validates it
        if not hasattr(cls, "VALIDATE_INPUTS"):
            continue
        reads = wf.NODE_FILES[node_type].reads
        params = list(inspect.signature(cls.VALIDATE_INPUTS).parameters)
        assert params == list(reads), node_type
        message = cls.VALIDATE_INPUTS(**{p: "zz_missing_file.safetensors" for p in params})
        folder = reads[params[0]].folder
        assert isinstance(message, str) and os.sep + os.path.join(*folder.split("/")) in message, message


def test_trainer_output_declarations_match_the_trainers():
    from likeness.face_analysis.embeds import EMBEDS_FILE_NAMES
    from likeness.techniques.face_fusion import adapter
    from likeness.techniques.facea_net.files import IDENTITY_FILES

    identity = [f"{folder}/{sub}/{name}" for folder, sub, name in (IDENTITY_FILES[k] for k in ("identity", "lora"))]
    assert sorted(wf.NODE_FILES["LikenessFaceATrainIdentity"].writes) == sorted(identity)
    assert wf.NODE_FILES["LikenessTrainFaceFusion"].writes == (f"{adapter.FOLDER}/{adapter.SUBFOLDER}/{{}}.safetensors",)
    assert wf.NODE_FILES["LikenessSaveFaceEmbeds"].writes == ("likeness/embeds/" + EMBEDS_FILE_NAMES[-1],)
    assert wf.NODE_FILES["LikenessSavePulidFluxEmbeds"].writes == ("likeness/pulid_embeds/" + EMBEDS_FILE_NAMES[-1],)


def test_face_parser_weight_free_choice_is_the_parsers():
    from likeness.face_analysis.parsing import LANDMARKS_CHOICE

    assert wf.LANDMARKS_CHOICE == LANDMARKS_CHOICE


@pytest.mark.host
def test_core_loader_declarations_match_comfyui(comfy_ready):
    for node_type, spec in wf.NODE_FILES.items():
        if node_type.startswith("Likeness"):
            continue
        cls = comfy_ready[node_type]
        assert tuple(w.name for w in widget_inputs(cls))[:len(spec.widgets)] == spec.widgets, node_type
