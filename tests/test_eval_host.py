"""``python <pack> eval`` on a real ComfyUI with tiny models: a 2 identities × 2 prompts × 2 variants grid (the
variants from one ``--sweep``) writes the per-image CSV, the tables and the contact sheets; a run stopped by
``--max-cells`` and a run killed in the middle of a cell are resumed, and only the missing cells are run.

The workflow is a tiny img2img (tiny SD1.5 of ``tests/host_nodes``): the identity photo goes through the
VAE, so every cell's image depends on its photo, prompt and seed. Metrics: CLIP-T, CLIP-I and DINO with the
tiny CLIP and DINO of ``evaluation_support`` (loaded from folders by ``--clip``/``--dino``, as a user's).
"""
from __future__ import annotations

import argparse
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.host

WORKFLOW = {
    "1": {"class_type": "LikenessTestTinySD15Loader", "inputs": {"seed": 0}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "unused.png"}, "_meta": {"title": "Reference photo"}},
    "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
    "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["1", 1]}, "_meta": {"title": "Positive"}},
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]},
          "_meta": {"title": "Negative"}},
    "6": {"class_type": "KSampler", "inputs": {
        "seed": 1, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 0.8,
        "model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["3", 0]}},
    "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
    "8": {"class_type": "SaveImage", "inputs": {"filename_prefix": "eval_test", "images": ["7", 0]}},
}


@pytest.fixture
def eval_inputs(tmp_path, host_test_nodes, pack_loaded):
    """The workflow file, two identity folders (a reference and a held-out photo each), a prompt file, the
    tiny CLIP and DINO folders."""
    from evaluation_support import write_tiny_clip, write_tiny_dino

    workflow = tmp_path / "img2img.json"
    workflow.write_text(json.dumps(WORKFLOW))
    rng = np.random.default_rng(0)
    for person, tint in (("ann", (200, 120, 90)), ("ben", (90, 140, 210))):
        for name in ("reference.png", "second.png"):
            pixels = np.clip(np.array(tint) + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
            os.makedirs(tmp_path / "people" / person, exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / "people" / person / name)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a person at the beach\na photo of a person in a forest\n")
    clip = write_tiny_clip(str(tmp_path / "clip"))
    dino = write_tiny_dino(str(tmp_path / "dino"))
    return tmp_path, workflow, prompts, clip, dino


def _args(base, workflow, prompts, clip, dino, comfy_path, *extra):
    from likeness.cli import eval as eval_cli

    parser = argparse.ArgumentParser()
    eval_cli.add_eval_arguments(parser)
    return parser.parse_args([str(workflow), "--identities", str(base / "people"), "--prompts", str(prompts),
                              "--seeds", "3", "--sweep", "KSampler.cfg=3,5", "--out", str(base / "out"),
                              "--clip", clip, "--dino", dino, "--comfyui", comfy_path, "--device", "cpu", *extra])


class Killed(BaseException):
    """Stands for the process being killed while a cell runs (nothing after it runs)."""


def test_eval_writes_the_tables_and_resumes_only_the_missing_cells(eval_inputs, host_env, isolated_runner_state,
                                                                    monkeypatch):
    from likeness.cli import eval as eval_cli
    from likeness.cli import runner

    base, workflow, prompts, clip, dino = eval_inputs
    out = base / "out"
    executed: list[dict] = []
    real_execute = runner.execute_prompt
    kill_at = {"call": None}

    def counting_execute(prompt, on_event=None, executor=None):
        executed.append(prompt)
        if kill_at["call"] == len(executed):
            raise Killed()
        return real_execute(prompt, on_event=on_event, executor=executor)

    monkeypatch.setattr(runner, "execute_prompt", counting_execute)
    args = _args(base, workflow, prompts, clip, dino, host_env.comfy_path)
    plan = eval_cli.build_plan(args)
    keys = [cell.key for cell in plan.cells]
    assert len(keys) == 8 and len({c.variant.name for c in plan.cells}) == 2

    # 1. --max-cells 2: two cells, then the tables of what is finished
    first = eval_cli.run_eval(_args(base, workflow, prompts, clip, dino, host_env.comfy_path, "--max-cells", "2"))
    assert first.computed == keys[:2] and first.remaining == 6 and not first.failed and first.measured == 2
    assert len(_csv_rows(out)) == 2

    # 2. killed while the second cell of this run executes: one more finished cell, no record for the killed one
    kill_at["call"], executed[:] = 2, []
    with pytest.raises(Killed):
        eval_cli.run_eval(args)
    assert sorted(os.listdir(out / "cells")) == sorted(k + ".json" for k in keys[:3])

    # 3. the same command again: exactly the five missing cells run
    kill_at["call"], executed[:] = None, []
    third = eval_cli.run_eval(args)
    assert third.skipped == keys[:3] and third.computed == keys[3:] and not third.failed and third.remaining == 0
    assert len(executed) == 5 and third.measured == 5  # the earlier cells' metrics come from the cache
    assert [(p["6"]["inputs"]["cfg"], p["6"]["inputs"]["seed"]) for p in executed] == [(3, 3)] + [(5, 3)] * 4
    assert {p["2"]["inputs"]["image"] for p in executed} == {str(base / "people" / n / "reference.png")
                                                             for n in ("ann", "ben")}
    _check_outputs(out, keys)

    # 4. once more: nothing runs and nothing is measured again
    executed[:] = []
    fourth = eval_cli.run_eval(args)
    assert fourth.computed == [] and fourth.skipped == keys and executed == [] and fourth.measured == 0
    assert len(_csv_rows(out)) == 8


def _csv_rows(out) -> list[dict]:
    with open(out / "results.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _check_outputs(out, keys: list[str]) -> None:
    rows = _csv_rows(out)
    assert len(rows) == 8
    assert {r["variant"] for r in rows} == {"KSampler.cfg=3", "KSampler.cfg=5"}
    assert {r["identity"] for r in rows} == {"ann", "ben"} and {r["seed"] for r in rows} == {"3"}
    for row in rows:
        assert os.path.isfile(out / row["image"])
        assert float(row["seconds"]) > 0 and float(row["peak_memory_mb"]) > 0 and row["memory_kind"] == "rss"
        for column in ("clip_t", "clip_i", "dino"):
            assert -1.0 <= float(row[column]) <= 1.0
    report = (out / "report.md").read_text(encoding="utf-8")
    header = next(line for line in report.splitlines() if line.startswith("| variant |"))
    assert sorted(header.strip("| ").split(" | ")) == sorted(["variant", "clip_t", "clip_i", "dino", "seconds",
                                                              "peak_memory_mb"])
    assert report.count("| KSampler.cfg=") == 2 and "±" in report and "**" in report
    assert "<table>" in (out / "report.html").read_text(encoding="utf-8")
    assert len(os.listdir(out / "tables")) == 4  # a Markdown and an HTML table per variant
    sheets = sorted(os.listdir(out / "sheets"))
    assert len(sheets) == 4 and all(Image.open(out / "sheets" / s).size[0] > 64 for s in sheets)
    images = sorted(os.listdir(out / "images"))
    assert len(images) == 2 and sum(len(os.listdir(out / "images" / d)) for d in images) == 8
    assert not os.listdir(out / ".comfyui_output")  # every image was filed under images/


COMPARED_EXAMPLES = ("FaceID PlusV2 - portrait (baseline)", "Face-MakeUp - portrait", "ConsistentID - portrait",
                     "Face Fusion - one identity")


@pytest.mark.parametrize("name", COMPARED_EXAMPLES)
def test_the_examples_compared_in_the_readme_bind_photo_prompt_seed_and_output(name, pack_loaded):
    """The README's eval command runs these four examples unchanged: each has exactly one place for the photo,
    the prompt and the seed by the documented rules, and saves its image."""
    from host_support import example_prompt
    from likeness.evaluation.bindings import resolve_bindings

    prompt = example_prompt(name)
    found = resolve_bindings(prompt)
    assert prompt[found.image[0]]["class_type"] == "LoadImage"
    assert prompt[found.image[0]]["_meta"]["title"] == "Reference photo"
    expected_prompt = "LikenessConsistentIDEncode" if name.startswith("ConsistentID") else "CLIPTextEncode"
    assert prompt[found.prompt[0]]["class_type"] == expected_prompt
    assert [prompt[n]["class_type"] for n, _ in found.seeds] == ["KSampler"]
    assert [prompt[n]["class_type"] for n in found.outputs] == ["SaveImage"]


def test_eval_command_line_stops_and_resumes_in_a_subprocess(tmp_path, host_env, comfy_ready):
    """``python <pack> eval`` as a user runs it: the stock checkpoint loader on a tiny single-file checkpoint
    (found through --base-directory), no metric models (time and memory only), stopped by --max-cells and
    run again."""
    import subprocess
    import sys

    from conftest import ROOT
    from host_support import cached_tiny_sd15_checkpoint

    checkpoints = tmp_path / "base" / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.symlink(cached_tiny_sd15_checkpoint(), checkpoints / "tiny_sd15.safetensors")
    workflow = dict(WORKFLOW, **{"1": {"class_type": "CheckpointLoaderSimple",
                                       "inputs": {"ckpt_name": "tiny_sd15.safetensors"}}})
    (tmp_path / "img2img.json").write_text(json.dumps(workflow))
    os.makedirs(tmp_path / "ann")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "ann" / "reference.png")
    (tmp_path / "prompts.txt").write_text("a photo of a person\n")
    command = [sys.executable, ROOT, "eval", str(tmp_path / "img2img.json"), "--identities", str(tmp_path / "ann"),
               "--prompts", str(tmp_path / "prompts.txt"), "--sweep", "KSampler.denoise=0.5,0.9",
               "--out", str(tmp_path / "out"), "--comfyui", host_env.comfy_path,
               "--base-directory", str(tmp_path / "base"), "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}

    def run(*extra):
        result = subprocess.run(command + list(extra), capture_output=True, text=True, timeout=600,
                                cwd=str(tmp_path), env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    assert "1 cell(s) run, 0 already finished, 0 failed, 1 left for the next run." in run("--max-cells", "1")
    assert "1 cell(s) run, 1 already finished, 0 failed. 1 image(s) measured" in run()
    rows = _csv_rows(tmp_path / "out")
    assert [r["variant"] for r in rows] == ["KSampler.denoise=0.5", "KSampler.denoise=0.9"]
    assert "| variant | seconds | peak_memory_mb |" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
