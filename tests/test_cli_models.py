"""``models list|verify|table`` and the ``run`` hand-over, through ``main([...])`` (no network)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from likeness.cli import manifest as mf
from likeness.cli.main import main, render_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAYLOAD = b"likeness test weights\n" * 512  # 11 kB, with a real sha256 below


@pytest.fixture(autouse=True)
def _no_models_env(monkeypatch):
    monkeypatch.delenv(mf.MODELS_DIR_ENV, raising=False)


def write_manifest(path, entries) -> str:
    path.write_text(json.dumps({"models": entries}))
    return str(path)


def small_entry(**overrides) -> dict:
    entry = {"id": "tiny-adapter", "filename": "tiny.safetensors", "folder": "likeness/faceid",
             "url": "https://example.org/tiny.safetensors", "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
             "size": len(PAYLOAD), "license": "MIT", "techniques": ["faceid"], "required": True, "notes": ""}
    entry.update(overrides)
    return entry


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def verify(capsys, manifest, models, *extra) -> tuple[int, str, str]:
    return run_main(capsys, "models", "verify", "--manifest", manifest, "--models-dir", str(models), *extra)


# --------------------------------------------------------------------------------------------------
# verify with the shipped manifest


def test_verify_on_empty_models_folder_lists_every_required_file(tmp_path, capsys):
    models = tmp_path / "models"
    code, out, _ = run_main(capsys, "models", "verify", "--models-dir", str(models))
    assert code == 1
    for entry in mf.load_manifest():
        if not entry.required:
            continue
        assert f"MISSING     {entry.id}" in out
        for name in entry.installed_files:
            assert os.path.join(str(models), *entry.folder.split("/"), name) in out
        assert f"models fetch {entry.id} --models-dir {models}" in out
    assert "models fetch --required" in out


def test_verify_all_lists_optional_files_too(tmp_path, capsys):
    code, out, _ = run_main(capsys, "models", "verify", "--all", "--models-dir", str(tmp_path))
    assert code == 1
    assert all(f"MISSING     {e.id}" in out for e in mf.load_manifest())


def test_verify_subprocess_from_the_pack_folder(tmp_path):
    models = tmp_path / "empty_models"
    result = subprocess.run([sys.executable, REPO, "models", "verify", "--models-dir", str(models)],
                            capture_output=True, text=True, timeout=60, env={**os.environ, mf.MODELS_DIR_ENV: ""})
    assert result.returncode == 1, result.stderr
    assert str(models / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors") in result.stdout
    assert str(models / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx") in result.stdout
    assert "Traceback" not in result.stderr


def test_models_commands_do_not_import_torch():
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "from _bootstrap import load_pack; load_pack(run_init=False);"
            "from likeness.cli.main import main; import io, contextlib;"
            "buf = io.StringIO();\n"
            "with contextlib.redirect_stdout(buf): rc = main(['models', 'table']);\n"
            "print(rc, 'torch' in sys.modules, 'numpy' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["0", "False", "False"], result.stderr


def test_without_models_dir_outside_comfyui_the_error_asks_for_it(capsys):
    if mf.enclosing_comfyui() is not None:
        pytest.skip("the checkout sits inside a ComfyUI custom_nodes folder")
    code, _, err = run_main(capsys, "models", "verify")
    assert code == 2
    assert "--models-dir" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# verify with a small manifest fixture: ok, corrupt, truncated, unverified, nested


def _install(models, entry, data: bytes, name=None):
    folder = models.joinpath(*entry["folder"].split("/"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or entry["filename"])
    path.write_bytes(data)
    return path


def test_verify_good_file_is_ok(tmp_path, capsys):
    entry = small_entry()
    manifest = write_manifest(tmp_path / "m.json", [entry])
    path = _install(tmp_path / "models", entry, PAYLOAD)
    code, out, _ = verify(capsys, manifest, tmp_path / "models")
    assert code == 0, out
    assert f"OK          tiny-adapter: {path} (sha256 verified)" in out
    assert "All required files are in place" in out


def test_verify_reports_a_corrupted_file_as_hash_mismatch(tmp_path, capsys):
    entry = small_entry()
    manifest = write_manifest(tmp_path / "m.json", [entry])
    corrupted = bytearray(PAYLOAD)
    corrupted[100] ^= 0xFF  # same size, one byte flipped
    path = _install(tmp_path / "models", entry, bytes(corrupted))
    code, out, _ = verify(capsys, manifest, tmp_path / "models")
    assert code == 1
    assert f"CORRUPT     tiny-adapter (required): {path}" in out
    assert "hash mismatch" in out and hashlib.sha256(bytes(corrupted)).hexdigest() in out
    assert "models fetch tiny-adapter" in out


def test_verify_reports_a_truncated_file_as_size_mismatch(tmp_path, capsys):
    entry = small_entry()
    manifest = write_manifest(tmp_path / "m.json", [entry])
    _install(tmp_path / "models", entry, PAYLOAD[:1000])
    code, out, _ = run_main(capsys, "models", "verify", "--quick", "--manifest", manifest,
                            "--models-dir", str(tmp_path / "models"))
    assert code == 1
    assert "size mismatch: 1000 bytes, expected" in out


def test_verify_file_without_published_hash_is_present_unverified(tmp_path, capsys):
    entry = small_entry(sha256="", size=None, approx_size_mb=0.011)
    manifest = write_manifest(tmp_path / "m.json", [entry])
    _install(tmp_path / "models", entry, PAYLOAD)
    code, out, _ = verify(capsys, manifest, tmp_path / "models")
    assert code == 0
    assert "UNVERIFIED  tiny-adapter" in out
    assert "present, unverified (no published hash)" in out


def test_verify_without_hash_flags_a_much_too_small_file(tmp_path, capsys):
    entry = small_entry(sha256="", size=None, approx_size_mb=5)
    manifest = write_manifest(tmp_path / "m.json", [entry])
    _install(tmp_path / "models", entry, PAYLOAD)
    code, out, _ = verify(capsys, manifest, tmp_path / "models")
    assert code == 1
    assert "probably an interrupted download" in out


def test_verify_accepts_an_alternative_source(tmp_path, capsys):
    other = b"full upstream release\n" * 600
    entry = small_entry(alternatives=[{"url": "https://example.org/other", "sha256": hashlib.sha256(other).hexdigest(),
                                       "size": len(other)}])
    manifest = write_manifest(tmp_path / "m.json", [entry])
    _install(tmp_path / "models", entry, other)
    code, out, _ = verify(capsys, manifest, tmp_path / "models")
    assert code == 0, out
    assert "sha256 verified (the alternative from https://example.org/other)" in out


def test_optional_missing_file_does_not_fail_verify(tmp_path, capsys):
    entry = small_entry(required=False)
    manifest = write_manifest(tmp_path / "m.json", [entry])
    code, out, _ = run_main(capsys, "models", "verify", "--manifest", manifest, "--models-dir", str(tmp_path))
    assert code == 0
    assert "1 optional files not installed" in out
    code, out, _ = run_main(capsys, "models", "verify", "--all", "--manifest", manifest, "--models-dir", str(tmp_path))
    assert code == 0 and "MISSING     tiny-adapter (optional" in out


def test_verify_finds_files_in_extra_model_paths(tmp_path, capsys):
    entry = small_entry()
    manifest = write_manifest(tmp_path / "m.json", [entry])
    comfy = tmp_path / "ComfyUI"
    (comfy / "models").mkdir(parents=True)
    (comfy / "extra_model_paths.yaml").write_text(
        "shared:\n    base_path: ../shared\n    likeness: |\n        likeness_files\n")
    shared = tmp_path / "shared" / "likeness_files" / "faceid"
    shared.mkdir(parents=True)
    (shared / "tiny.safetensors").write_bytes(PAYLOAD)
    code, out, _ = run_main(capsys, "models", "verify", "--manifest", manifest, "--models-dir", str(comfy / "models"))
    assert code == 0, out
    assert f"Extra model paths: {comfy / 'extra_model_paths.yaml'} (likeness)" in out
    assert str(shared / "tiny.safetensors") in out


ARCHIVE_ENTRY = {"id": "face-pack", "filename": "face-pack.zip", "folder": "insightface/models/face-pack",
                 "url": "https://example.org/face-pack.zip", "sha256": "", "size": None, "approx_size_mb": 1,
                 "license": "Non-commercial research only", "techniques": ["face_analysis"], "required": True,
                 "notes": "", "archive": {"format": "zip", "members": ["det.onnx", "rec.onnx"]}}


def test_verify_archive_members_and_the_nested_folder_mistake(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.json", [ARCHIVE_ENTRY])
    models = tmp_path / "models"
    nested = models / "insightface" / "models" / "face-pack" / "face-pack"
    nested.mkdir(parents=True)
    for name in ("det.onnx", "rec.onnx"):
        (nested / name).write_bytes(b"onnx")
    code, out, _ = run_main(capsys, "models", "verify", "--manifest", manifest, "--models-dir", str(models))
    assert code == 1
    assert f"found at {nested / 'det.onnx'}: move the files up into {nested.parent}" in out
    for name in ("det.onnx", "rec.onnx"):
        os.replace(nested / name, nested.parent / name)
    code, out, _ = run_main(capsys, "models", "verify", "--manifest", manifest, "--models-dir", str(models))
    assert code == 0
    assert "UNVERIFIED  face-pack" in out and "present, unverified (no published hash)" in out


# --------------------------------------------------------------------------------------------------
# list, table, run


def test_list_shows_every_entry_and_status(tmp_path, capsys):
    entry = small_entry()
    manifest = write_manifest(tmp_path / "m.json", [entry, small_entry(id="other", filename="other.bin")])
    _install(tmp_path / "models", entry, PAYLOAD)
    code, out, _ = run_main(capsys, "models", "list", "--manifest", manifest, "--models-dir", str(tmp_path / "models"))
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("tiny-adapter", "other"))}
    assert lines["tiny-adapter"].rstrip().endswith("present")
    assert lines["other"].rstrip().endswith("missing")
    assert "likeness/faceid/tiny.safetensors" in lines["tiny-adapter"]


def test_list_works_without_a_models_folder(capsys):
    code, out, _ = run_main(capsys, "models", "list")
    assert code == 0
    assert "clip-vit-h-14" in out and "insightface-antelopev2" in out


def test_table_is_markdown_generated_from_the_manifest(capsys):
    code, out, _ = run_main(capsys, "models", "table")
    assert code == 0
    entries = mf.load_manifest()
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(rows) == len(entries)
    assert out == render_table(entries)
    assert "| `insightface-buffalo_l` |" in out and "Non-commercial research only" in out
    assert "≈ 669 MB (no published hash)" in out


def test_usage_errors_exit_2(capsys):
    assert main(["models"]) == 2
    assert main(["models", "fetch", "no-such-id", "--models-dir", "/tmp/x"]) == 2
    assert "Known ids" in capsys.readouterr().err


def test_run_is_handed_to_the_runner(capsys):
    code = main(["run", "--help"])
    out = capsys.readouterr().out
    assert code == 0
    assert "WORKFLOW" in out and "--set" in out


def test_verify_finds_a_file_in_a_subfolder_like_comfyui_does(tmp_path, capsys):
    entry = small_entry(folder="loras")
    manifest = write_manifest(tmp_path / "m.json", [entry])
    sub = tmp_path / "models" / "loras" / "faces"
    sub.mkdir(parents=True)
    (sub / "tiny.safetensors").write_bytes(PAYLOAD)
    code, out, _ = verify(capsys, manifest, tmp_path / "models")
    assert code == 0, out
    assert f"OK          tiny-adapter: {sub / 'tiny.safetensors'}" in out
