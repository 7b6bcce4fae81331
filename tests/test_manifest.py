"""The model manifest: schema of the shipped file, validation rules, models-folder and yaml resolution."""
from __future__ import annotations

import json
import os
import re
import sys
from urllib.parse import urlsplit

import pytest

from likeness.cli import manifest as mf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_HASH = "26d0d86a1d60d6cc811d3b8862178b461e1eeb651e6fe2b72ba17aa95411e313"


def _raw_manifest() -> dict:
    with open(os.path.join(REPO, "models_manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def _entry(**overrides) -> dict:
    entry = {"id": "x", "filename": "x.safetensors", "folder": "likeness/faceid", "url": "https://example.org/x",
             "sha256": "", "size": None, "approx_size_mb": 1, "license": "MIT", "techniques": ["faceid"],
             "required": False, "notes": ""}
    entry.update(overrides)
    return entry


# --------------------------------------------------------------------------------------------------
# The shipped manifest


def test_shipped_manifest_is_valid_and_loads():
    data = _raw_manifest()
    assert mf.validate_manifest(data) == []
    entries = mf.load_manifest()
    assert len(entries) == len(data["models"]) >= 10
    assert len({e.id for e in entries}) == len(entries), "ids must be unique"


def test_shipped_manifest_urls_are_https_and_hashes_real_or_empty():
    for item in _raw_manifest()["models"]:
        urls = [item["url"]] + [alt["url"] for alt in item.get("alternatives", [])]
        for url in urls:
            parts = urlsplit(url)
            assert parts.scheme == "https" and parts.hostname, f"{item['id']}: {url}"
        for sha in [item["sha256"]] + [alt.get("sha256", "") for alt in item.get("alternatives", [])]:
            assert sha == "" or (re.fullmatch(r"[0-9a-f]{64}", sha) and not mf.is_placeholder_hash(sha)), item["id"]
        # Exact size or an honest approximation, never both missing; a known hash comes with a known size.
        assert item["size"] is not None or item.get("approx_size_mb"), item["id"]
        if item["sha256"]:
            assert isinstance(item["size"], int), item["id"]
        assert item["license"].strip() and item["techniques"], item["id"]


def test_shipped_manifest_covers_the_techniques_files():
    entries = {e.id: e for e in mf.load_manifest()}
    required = {e.id for e in entries.values() if e.required}
    assert {"clip-vit-h-14", "insightface-buffalo_l", "bisenet-face-parsing"} <= required
    assert entries["clip-vit-h-14"].folder == "clip_vision"
    assert entries["clip-vit-h-14"].filename == "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    assert entries["insightface-buffalo_l"].archive_members == (
        "1k3d68.onnx", "2d106det.onnx", "det_10g.onnx", "genderage.onnx", "w600k_r50.onnx")
    assert entries["insightface-antelopev2"].archive_members == (
        "1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx")
    assert entries["insightface-antelopev2"].folder == "insightface/models/antelopev2"
    for pack in ("insightface-buffalo_l", "insightface-antelopev2"):
        assert "non-commercial" in entries[pack].license.lower()
    assert entries["bisenet-face-parsing"].folder == "likeness/parsing"
    assert entries["consistentid-sd15"].folder == "likeness/consistentid"
    assert entries["face-makeup-sd15"].folder == "likeness/face_makeup"
    assert "none stated" in entries["face-makeup-sd15"].license.lower()
    assert entries["ipadapter-faceid-plusv2-sd15"].folder == "likeness/faceid"
    assert entries["ipadapter-faceid-plusv2-sd15-lora"].folder == "loras"
    assert "non-commercial" in entries["ipadapter-faceid-plusv2-sd15"].license.lower()
    m3face = [e for e in entries.values() if e.id.startswith("m3face-")]
    assert m3face and all(e.folder == "controlnet" and "/resolve/" in e.url for e in m3face)
    assert any("/resolve/landmark-mlin/" in e.url for e in m3face)


# --------------------------------------------------------------------------------------------------
# Validation rules


@pytest.mark.parametrize("sha", ["0" * 64, "ab" * 32, "0123456789abcdef" * 4, "deadbeef" * 8, "f" * 63 + "0"])
def test_placeholder_hashes_are_rejected(sha):
    problems = mf.validate_manifest({"models": [_entry(sha256=sha, size=10)]})
    assert any("placeholder" in p for p in problems), problems


def test_real_hash_and_empty_hash_are_accepted():
    assert mf.validate_manifest({"models": [_entry(sha256=REAL_HASH, size=10)]}) == []
    assert mf.validate_manifest({"models": [_entry()]}) == []


@pytest.mark.parametrize("overrides, fragment", [
    ({"url": "http://example.org/x"}, "https"),
    ({"url": "ftp://example.org/x"}, "https"),
    ({"sha256": "xyz"}, "64 hex"),
    ({"size": -1}, "positive integer"),
    ({"size": None, "approx_size_mb": None}, "approx_size_mb"),
    ({"folder": "../outside"}, "relative"),
    ({"folder": "/abs"}, "relative"),
    ({"filename": "a/b.bin"}, "plain file name"),
    ({"id": "Bad Id"}, "id must"),
    ({"required": "yes"}, "true or false"),
    ({"techniques": []}, "techniques"),
    ({"license": ""}, "license"),
    ({"colour": "red"}, "unknown key"),
    ({"archive": {"format": "zip", "members": ["a.onnx"]}}, "must end with .zip"),
    ({"archive": {"format": "tar", "members": ["a.onnx"]}}, "archive must be"),
])
def test_schema_problems_are_reported(overrides, fragment):
    problems = mf.validate_manifest({"models": [_entry(**overrides)]})
    assert any(fragment in p for p in problems), problems


def test_duplicate_ids_and_targets_are_reported():
    problems = mf.validate_manifest({"models": [_entry(), _entry()]})
    assert any("duplicate id" in p for p in problems)
    assert any("already installs" in p for p in problems)


def test_plain_http_is_only_allowed_to_this_machine():
    assert mf.url_problem("http://127.0.0.1:8000/x") is None
    assert mf.url_problem("http://localhost/x") is None
    assert mf.url_problem("http://example.org/x")
    assert mf.url_problem("https://huggingface.co/x") is None


def test_load_manifest_names_every_problem(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"models": [_entry(url="http://evil.example/x", sha256="0" * 64)]}))
    with pytest.raises(mf.ManifestError) as err:
        mf.load_manifest(str(path))
    assert "https" in str(err.value) and "placeholder" in str(err.value)
    with pytest.raises(mf.ManifestError, match="does not exist"):
        mf.load_manifest(str(tmp_path / "missing.json"))


def test_entry_for_file_finds_files_and_archive_members():
    entries = mf.load_manifest()
    assert mf.entry_for_file(entries, "glintr100.onnx").id == "insightface-antelopev2"
    assert mf.entry_for_file(entries, "models/loras/ip-adapter-faceid-plusv2_sd15_lora.safetensors").id == \
        "ipadapter-faceid-plusv2-sd15-lora"
    assert mf.entry_for_file(entries, "nope.bin") is None


# --------------------------------------------------------------------------------------------------
# Where the models folder is


def _fake_comfy(tmp_path):
    root = tmp_path / "ComfyUI"
    pack = root / "custom_nodes" / "likeness"
    pack.mkdir(parents=True)
    (root / "models").mkdir()
    return root, pack


def test_models_dir_from_the_enclosing_comfyui(tmp_path):
    root, pack = _fake_comfy(tmp_path)
    location = mf.resolve_location(env={}, pack_dir=str(pack))
    assert location.models_dir == str(root / "models")
    assert "enclosing ComfyUI" in location.source


def test_models_dir_precedence_flag_then_env(tmp_path):
    _root, pack = _fake_comfy(tmp_path)
    env = {mf.MODELS_DIR_ENV: str(tmp_path / "env_models")}
    assert mf.resolve_location(env=env, pack_dir=str(pack)).models_dir == str(tmp_path / "env_models")
    flag = mf.resolve_location(str(tmp_path / "flag_models"), env=env, pack_dir=str(pack))
    assert flag.models_dir == str(tmp_path / "flag_models") and flag.source == "--models-dir"


def test_outside_comfyui_without_flag_asks_for_models_dir(tmp_path):
    with pytest.raises(mf.ModelsDirError, match="--models-dir"):
        mf.resolve_location(env={}, pack_dir=str(tmp_path / "somewhere" / "pack"))


EXTRA_YAML = """\
# comment
a111:
    base_path: {base}
    checkpoints: models/Stable-diffusion
    loras: |
         models/Lora
         models/LyCORIS
    controlnet: models/ControlNet   # trailing comment

likeness_store:
    base_path: store
    is_default: true
    likeness: |
        likeness_models
    clip_vision: "vision"
relative_only:
    insightface: faces
    unet: diffusion
empty_section:
"""


def _write_yaml(tmp_path, root):
    base = tmp_path / "webui"
    text = EXTRA_YAML.format(base=base)
    (root / "extra_model_paths.yaml").write_text(text)
    return base


def test_extra_model_paths_follow_comfyui_rules(tmp_path):
    root, pack = _fake_comfy(tmp_path)
    base = _write_yaml(tmp_path, root)
    location = mf.resolve_location(env={}, pack_dir=str(pack))
    paths = location.extra_paths
    assert paths["loras"] == [str(base / "models/Lora"), str(base / "models/LyCORIS")]
    assert paths["controlnet"] == [str(base / "models/ControlNet")]
    assert paths["likeness"] == [str(root / "store" / "likeness_models")]  # base_path relative to the yaml
    assert paths["clip_vision"] == [str(root / "store" / "vision")]
    assert paths["insightface"] == [str(root / "faces")]  # no base_path: relative to the yaml's folder
    assert paths["diffusion_models"] == [str(root / "diffusion")]  # legacy key mapped as ComfyUI does
    # The default folder comes first, then ComfyUI's own extra default, then the yaml's.
    assert location.search_dirs("controlnet") == [
        str(root / "models" / "controlnet"), str(root / "models" / "t2i_adapter"), str(base / "models/ControlNet")]


def test_invalid_yaml_is_ignored_with_a_warning(tmp_path):
    root, pack = _fake_comfy(tmp_path)
    (root / "extra_model_paths.yaml").write_text("a111:\n  checkpoints: [unclosed\n")
    warnings = []
    location = mf.resolve_location(env={}, pack_dir=str(pack), warn=warnings.append)
    assert location.extra_paths == {}
    assert len(warnings) == 1 and "not valid YAML" in warnings[0]
    (root / "extra_model_paths.yaml").write_text("- just\n- a list\n")
    mf.resolve_location(env={}, pack_dir=str(pack), warn=warnings.append)
    assert "not a mapping" in warnings[1]


def test_missing_pyyaml_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from likeness.cli.main import main
    from likeness.errors import MissingDependencyError

    root, pack = _fake_comfy(tmp_path)
    _write_yaml(tmp_path, root)
    monkeypatch.setitem(sys.modules, "yaml", None)  # how deps.py sees a package that is not installed
    with pytest.raises(MissingDependencyError, match="pip install pyyaml"):
        mf.resolve_location(env={}, pack_dir=str(pack))
    assert main(["models", "list", "--models-dir", str(root / "models"),
                 "--extra-model-paths", str(root / "extra_model_paths.yaml")]) == 1
    assert "pip install pyyaml" in capsys.readouterr().err


def test_candidate_paths_include_yaml_and_alt_folders(tmp_path):
    root, pack = _fake_comfy(tmp_path)
    _write_yaml(tmp_path, root)
    location = mf.resolve_location(env={}, pack_dir=str(pack))
    entry = mf.find_entry(mf.load_manifest(), "ipadapter-faceid-plusv2-sd15")
    paths = location.candidate_paths(entry, entry.filename)
    assert paths[0] == str(root / "models" / "likeness" / "faceid" / entry.filename)
    assert str(root / "store" / "likeness_models" / "faceid" / entry.filename) in paths
    assert str(root / "models" / "ipadapter" / entry.filename) in paths
    assert location.target_path(entry) == paths[0]


def test_readme_model_table_matches_manifest():
    """README's model table is the output of `models table` (regenerate it when the manifest changes)."""
    import contextlib
    import io

    from conftest import ROOT
    from likeness.cli.main import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["models", "table"]) == 0
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start, end = "<!-- models-table:start -->\n", "\n<!-- models-table:end -->"
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table.strip() == buffer.getvalue().strip()
