"""The headless runner (``cli/runner.py``): argument handling, messages, and real runs (UI and API format).

Tests without the ``host`` marker use fake node classes and run everywhere (CI); ``host`` tests use
the real ComfyUI (in-process, and one ``python <pack> run`` subprocess on a tiny checkpoint).
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from likeness.cli import runner

# --------------------------------------------------------------------------------------------------
# Pure parts (no ComfyUI)


def test_parse_override_reads_json_values_and_keeps_text():
    assert runner.parse_override("3.seed=42") == ("3", "seed", 42)
    assert runner.parse_override("KSampler.cfg=7.5") == ("KSampler", "cfg", 7.5)
    assert runner.parse_override("Positive.text=a photo, 85mm") == ("Positive", "text", "a photo, 85mm")
    assert runner.parse_override("My.Title.enabled=true") == ("My.Title", "enabled", True)
    assert runner.parse_override('6.text="42"') == ("6", "text", "42")
    for bad in ("3seed=1", "3.seed", ".seed=1", "3.=1"):
        with pytest.raises(runner.UsageError, match="NODE.INPUT=VALUE"):
            runner.parse_override(bad)


def _prompt():
    return {
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20}, "_meta": {"title": "KSampler"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a"}, "_meta": {"title": "Positive"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "b"}, "_meta": {"title": "Negative"}},
    }


def test_overrides_find_nodes_by_id_title_or_unique_class():
    prompt = _prompt()
    runner.apply_overrides(prompt, [("3", "steps", 4), ("Positive", "text", "x"), ("KSampler", "seed", 9)])
    assert prompt["3"]["inputs"] == {"seed": 9, "steps": 4}
    assert prompt["6"]["inputs"]["text"] == "x"
    with pytest.raises(runner.UsageError, match="several nodes"):
        runner.apply_overrides(prompt, [("CLIPTextEncode", "text", "y")])
    with pytest.raises(runner.UsageError, match="no node 'Sampler'"):
        runner.apply_overrides(prompt, [("Sampler", "steps", 1)])
    with pytest.raises(runner.UsageError, match="has no input 'step'"):
        runner.apply_overrides(prompt, [("3", "step", 1)])


def test_api_format_is_recognised_and_copied():
    prompt = _prompt()
    assert runner.to_api_prompt(prompt) == prompt and runner.to_api_prompt(prompt) is not prompt
    assert runner.to_api_prompt({"prompt": prompt}) == prompt
    with pytest.raises(runner.UsageError, match="neither API format"):
        runner.to_api_prompt({"hello": 1})


@pytest.fixture
def manifest(tmp_path, monkeypatch):
    path = tmp_path / "models_manifest.json"
    common = {"sha256": "", "size": 1, "license": "x", "techniques": ["test"], "notes": ""}
    path.write_text(json.dumps({"models": [
        {"id": "sd15-base", "filename": "v1-5-pruned-emaonly.safetensors", "folder": "checkpoints",
         "url": "https://example.invalid/x", "required": False, **common},
        {"id": "bisenet", "filename": "face_parsing_bisenet.pth", "folder": "likeness/parsing",
         "url": "https://example.invalid/y", "required": True, **common}]}))
    monkeypatch.setattr(runner, "MANIFEST_PATH", str(path))
    return path


def test_missing_model_message_names_the_fetch_command(manifest):
    node_errors = {"4": {"class_type": "CheckpointLoaderSimple", "dependent_outputs": ["9"], "errors": [{
        "type": "value_not_in_list", "message": "Value not in list",
        "details": "ckpt_name: 'v1-5-pruned-emaonly.safetensors' not in []",
        "extra_info": {"input_name": "ckpt_name", "received_value": "v1-5-pruned-emaonly.safetensors"}}]}}
    prompt = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {}}}
    text = runner.describe_validation_error(prompt, {"message": "Prompt outputs failed validation"}, node_errors)
    assert "node #4 (CheckpointLoaderSimple)" in text
    assert "'v1-5-pruned-emaonly.safetensors'" in text and "models fetch sd15-base" in text
    assert "\n" not in text  # one paragraph


def test_execution_error_mentioning_a_manifest_file_gets_the_fetch_command(manifest):
    details = {"node_id": "12", "exception_type": "likeness.errors.ModelFileError",
               "exception_message": "face_parsing_bisenet.pth was not found in models/likeness/parsing"}
    text = runner.describe_execution_error({"12": {"class_type": "LikenessFaceParser", "inputs": {}}}, details)
    assert text.startswith("Node #12 (LikenessFaceParser) failed: ModelFileError:")
    assert "models fetch bisenet" in text


def test_messages_survive_a_missing_or_invalid_manifest(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "MANIFEST_PATH", str(tmp_path / "absent.json"))
    assert runner.manifest_entries() == [] and runner.fetch_hint("x.safetensors") == ""
    (tmp_path / "invalid.json").write_text(json.dumps({"models": [{"id": "x"}]}))
    monkeypatch.setattr(runner, "MANIFEST_PATH", str(tmp_path / "invalid.json"))
    assert runner.manifest_entries() == []


def test_ui_workflows_are_converted_with_the_given_node_classes():
    class Latent:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"width": ("INT", {"default": 512}), "height": ("INT", {"default": 512})}}

    workflow = {"nodes": [{"id": 1, "type": "Latent", "mode": 0, "inputs": [], "outputs": [],
                           "widgets_values": [64, 32]}], "links": []}
    assert runner.to_api_prompt(workflow, {"Latent": Latent}) == {
        "1": {"class_type": "Latent", "inputs": {"width": 64, "height": 32}, "_meta": {"title": "Latent"}}}
    with pytest.raises(runner.WorkflowFormatError, match="not installed"):
        runner.to_api_prompt(workflow, {})
    assert runner.exit_code_for(runner.WorkflowFormatError("x")) == runner.EXIT_USAGE
    assert runner.exit_code_for(runner.PromptExecutionError("x")) == runner.EXIT_EXECUTION
    assert runner.exit_code_for(runner.HostSetupError("x")) == runner.EXIT_USAGE


def test_bad_workflow_path_and_comfyui_path_are_usage_errors(tmp_path):
    with pytest.raises(runner.UsageError, match="does not exist"):
        runner.read_workflow(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(runner.UsageError, match="not readable JSON"):
        runner.read_workflow(str(tmp_path / "bad.json"))
    with pytest.raises(runner.UsageError, match="not a ComfyUI folder"):
        runner.find_comfyui(str(tmp_path))


def test_comfyui_is_found_from_the_enclosing_custom_nodes_folder(tmp_path, monkeypatch):
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy").mkdir(parents=True)
    (comfy / "custom_nodes").mkdir()
    for name in ("main.py", "folder_paths.py", "nodes.py"):
        (comfy / name).write_text("")
    pack = comfy / "custom_nodes" / "comfyui-likeness"
    os.symlink(ROOT, pack, target_is_directory=True)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(runner, "PACK_DIR", str(pack))
    monkeypatch.chdir(tmp_path)
    assert runner.find_comfyui() == str(comfy)
    monkeypatch.setenv("COMFYUI_PATH", str(comfy))
    assert runner.find_comfyui() == str(comfy)


# --------------------------------------------------------------------------------------------------
# Real ComfyUI


TEMPLATES = "comfyui_workflow_templates"


@pytest.mark.host
def test_comfyui_template_workflows_convert_and_validate(pack_loaded):
    """Every UI-format template shipped with ComfyUI whose nodes are installed converts to an API prompt
    that ComfyUI's validator accepts, except for model/image files that are not on this machine."""
    import asyncio

    import execution
    templates = pytest.importorskip(TEMPLATES)
    folder = os.path.join(os.path.dirname(templates.__file__), "templates")
    checked = 0
    problems = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path, encoding="utf-8") as f:
            workflow = json.load(f)
        if not isinstance(workflow, dict) or "nodes" not in workflow:
            continue
        try:
            prompt = runner.to_api_prompt(workflow)
        except runner.WorkflowFormatError:
            continue  # subgraphs, API (cloud) nodes or audio nodes that are not loaded here
        valid = asyncio.run(execution.validate_prompt("t", prompt, None))
        checked += 1
        for node_id, info in (valid[3] or {}).items():
            for reason in info["errors"]:
                value = reason.get("extra_info", {}).get("received_value")
                file_like = isinstance(value, str) and os.path.splitext(value)[1].lower() in {
                    ".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".png", ".jpg", ".jpeg", ".webp", ".gguf"}
                if reason["type"] == "value_not_in_list" and file_like:
                    continue
                if reason["type"] == "custom_validation_failed" and re.search(r"Invalid \w+ file", reason["details"]):
                    continue
                problems.append((os.path.basename(path), node_id, info["class_type"], reason["details"][:120]))
    assert checked >= 20, f"only {checked} templates were convertible"
    assert not problems, problems


@pytest.mark.host
def test_ui_workflow_runs_through_the_executor(execute_prompt, host_test_nodes, host_env):
    """The same tiny txt2img chain saved in UI format (with a reroute and a seed primitive) runs."""
    def node(id_, type_, inputs=(), widgets=None, outputs=()):
        return {"id": id_, "type": type_, "mode": 0, "inputs": [
            {"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": n, "type": t, "links": links} for n, t, links in outputs],
            **({"widgets_values": widgets} if widgets is not None else {})}

    workflow = {"nodes": [
        node(1, "LikenessTestTinySD15Loader", widgets=[0, "fixed"],
             outputs=[("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [2, 3]), ("VAE", "VAE", [8])]),
        node(2, "CLIPTextEncode", inputs=[("clip", "CLIP", 2)], widgets=["a portrait"]),
        node(3, "CLIPTextEncode", inputs=[("clip", "CLIP", 3)], widgets=["blurry"]),
        node(4, "EmptyLatentImage", widgets=[64, 64, 1]),
        node(10, "Reroute", inputs=[("", "*", 1)], outputs=[("", "MODEL", [9])]),
        node(11, "PrimitiveNode", widgets=[99, "randomize"], outputs=[("INT", "INT", [10])]),
        node(5, "KSampler", inputs=[("model", "MODEL", 9), ("positive", "CONDITIONING", 4),
                                    ("negative", "CONDITIONING", 5), ("latent_image", "LATENT", 6),
                                    ("seed", "INT", 10)],
             widgets=[1, "randomize", 2, 4.0, "euler", "normal", 1.0]),
        node(6, "VAEDecode", inputs=[("samples", "LATENT", 7), ("vae", "VAE", 8)]),
        node(7, "SaveImage", inputs=[("images", "IMAGE", 11)], widgets=["likeness_ui_run"]),
        node(12, "MarkdownNote", widgets=["# notes"]),
    ], "links": [[1, 1, 0, 10, 0, "MODEL"], [2, 1, 1, 2, 0, "CLIP"], [3, 1, 1, 3, 0, "CLIP"],
                 [4, 2, 0, 5, 1, "CONDITIONING"], [5, 3, 0, 5, 2, "CONDITIONING"], [6, 4, 0, 5, 3, "LATENT"],
                 [7, 5, 0, 6, 0, "LATENT"], [8, 1, 2, 6, 1, "VAE"], [9, 10, 0, 5, 0, "MODEL"],
                 [10, 11, 0, 5, 4, "INT"], [11, 6, 0, 7, 0, "IMAGE"]]}
    prompt = runner.to_api_prompt(workflow)
    assert prompt["5"]["inputs"]["seed"] == 99 and prompt["5"]["inputs"]["steps"] == 2
    assert prompt["5"]["inputs"]["model"] == ["1", 0]
    outputs = execute_prompt(prompt)
    (item,) = outputs["7"]["images"]
    assert os.path.isfile(os.path.join(host_env.output, item["subfolder"], item["filename"]))


@pytest.mark.host
def test_run_reports_a_missing_model_without_a_traceback(pack_loaded, manifest, tmp_path, capsys,
                                                         isolated_runner_state, host_env):
    workflow = tmp_path / "wf.json"
    with open(os.path.join(ROOT, "tests", "data", "txt2img_smoke.json"), encoding="utf-8") as f:
        workflow.write_text(f.read())
    parser = __import__("argparse").ArgumentParser()
    runner.add_run_arguments(parser)
    args = parser.parse_args([str(workflow), "--out", str(tmp_path / "out"), "--comfyui", host_env.comfy_path])
    code = runner.run_from_args(args)
    err = capsys.readouterr().err
    assert code == runner.EXIT_USAGE
    assert "'v1-5-pruned-emaonly.safetensors'" in err and "models fetch sd15-base" in err
    assert "Traceback" not in err


@pytest.fixture(scope="session")
def runner_base(tmp_path_factory, comfy_ready):
    """A ComfyUI base directory whose models/checkpoints holds the tiny single-file SD1.5 checkpoint."""
    from host_support import cached_tiny_sd15_checkpoint

    base = tmp_path_factory.mktemp("runner_base")
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.symlink(cached_tiny_sd15_checkpoint(), checkpoints / "tiny_sd15.safetensors")
    return base


@pytest.mark.host
def test_run_command_executes_the_example_workflow_on_a_tiny_checkpoint(runner_base, tmp_path, host_env):
    """``python <pack> run tests/data/txt2img_smoke.json`` with the stock CheckpointLoaderSimple
    loading a tiny checkpoint in real SD1.5 single-file format (found through --base-directory)."""
    from PIL import Image

    out = tmp_path / "out"
    command = [sys.executable, ROOT, "run", os.path.join(ROOT, "tests", "data", "txt2img_smoke.json"),
               "--comfyui", host_env.comfy_path, "--base-directory", str(runner_base), "--out", str(out),
               "--set", "CheckpointLoaderSimple.ckpt_name=tiny_sd15.safetensors",
               "--set", "3.steps=2", "--set", "5.width=64", "--set", "5.height=64"]
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("[1/7] #4 CheckpointLoaderSimple") for line in lines), result.stdout
    assert sum(line.startswith("[") for line in lines) == 7  # one progress line per node
    images = sorted(out.glob("likeness_smoke_*.png"))
    assert len(images) == 1, result.stdout
    pixels = np.asarray(Image.open(images[0]))
    assert pixels.shape == (64, 64, 3)
    assert pixels.std() > 1  # not a constant image
