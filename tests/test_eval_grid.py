"""The ``eval`` command's pure parts: the grid (identities, sweeps, seeds, cells), the workflow bindings,
the resume bookkeeping, the metric cache, and the tables (mean ± std, best in bold). No ComfyUI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from likeness.evaluation import bindings as bd
from likeness.evaluation import eval_report, grid, measure, records, tables
from likeness.evaluation.metrics import MetricModels
from likeness.evaluation.prompts import BUILT_IN_SETS, PromptSetError, load_prompts


def _photo(path, value: int = 0) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return str(path)


# --------------------------------------------------------------------------------------------------
# Grid


def test_identity_split_takes_reference_by_name_else_the_first_photo(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        _photo(tmp_path / "ann" / name) if name != "notes.txt" else (tmp_path / "ann" / name).write_text("x")
    ann = grid.split_identity(str(tmp_path / "ann"))
    assert (os.path.basename(ann.reference), [os.path.basename(p) for p in ann.held_out]) == ("a.jpg", ["b.png"])
    _photo(tmp_path / "ann" / "reference.png")
    ann = grid.split_identity(str(tmp_path / "ann"))
    assert os.path.basename(ann.reference) == "reference.png"
    assert [os.path.basename(p) for p in ann.held_out] == ["a.jpg", "b.png"]


def test_identities_from_a_folder_of_folders_and_single_folders(tmp_path):
    _photo(tmp_path / "people" / "ann" / "1.png")
    _photo(tmp_path / "people" / "ben" / "1.png")
    _photo(tmp_path / "cy" / "1.png")
    found = grid.find_identities([str(tmp_path / "people"), str(tmp_path / "cy")])
    assert [i.name for i in found] == ["ann", "ben", "cy"]
    assert found[0].held_out == ()
    with pytest.raises(grid.GridError, match="several identity folders are named ann"):
        grid.find_identities([str(tmp_path / "people"), str(tmp_path / "people" / "ann")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(grid.GridError, match="neither photos nor identity folders"):
        grid.find_identities([str(tmp_path / "empty")])
    with pytest.raises(grid.GridError, match="does not exist"):
        grid.find_identities([str(tmp_path / "absent")])


def test_sweep_parsing():
    assert grid.parse_sweep("KSampler.cfg=4,6.5,8") == grid.Sweep("KSampler", "cfg", (4, 6.5, 8))
    assert grid.parse_sweep("FaceID Apply.weight=0.6, 1") == grid.Sweep("FaceID Apply", "weight", (0.6, 1))
    assert grid.parse_sweep("3.sampler_name=euler,ddim").values == ("euler", "ddim")
    assert grid.parse_sweep('Positive.text=["a, b", "c"]').values == ("a, b", "c")
    assert grid.parse_sweep("My.Node.enabled=true,false") == grid.Sweep("My.Node", "enabled", (True, False))
    for bad in ("KSampler.cfg", "cfg=1,2", ".cfg=1", "KSampler.=1", "KSampler.cfg=", "KSampler.cfg=1,,2"):
        with pytest.raises(grid.GridError):
            grid.parse_sweep(bad)
    with pytest.raises(grid.GridError, match="repeats"):
        grid.parse_sweep("KSampler.cfg=4,4")


def test_variants_are_workflows_times_sweep_combinations():
    sweeps = [grid.parse_sweep("KSampler.cfg=4,6"), grid.parse_sweep("Apply.weight=0.5,1")]
    one = grid.build_variants(["/w/faceid.json"], sweeps)
    assert [v.name for v in one] == ["KSampler.cfg=4, Apply.weight=0.5", "KSampler.cfg=4, Apply.weight=1",
                                     "KSampler.cfg=6, Apply.weight=0.5", "KSampler.cfg=6, Apply.weight=1"]
    assert one[1].settings == (("KSampler", "cfg", 4), ("Apply", "weight", 1))
    two = grid.build_variants(["/w/a.json", "/x/b.json"], sweeps[:1])
    assert [v.name for v in two] == ["a [KSampler.cfg=4]", "a [KSampler.cfg=6]", "b [KSampler.cfg=4]",
                                     "b [KSampler.cfg=6]"]
    assert [v.name for v in grid.build_variants(["/w/a.json", "/x/b.json"], [])] == ["a", "b"]
    with pytest.raises(grid.GridError, match="several workflow files are named a"):
        grid.build_variants(["/w/a.json", "/x/a.json"], [])


def test_cells_run_variant_by_variant_with_unique_file_safe_keys(tmp_path):
    ann = grid.Identity("Ann B.", "/p/ann.png", ())
    ben = grid.Identity("ben", "/p/ben.png", ())
    variants = grid.build_variants(["/w/a.json"], [grid.parse_sweep("Apply.weight=0.5,1")])
    cells = grid.build_cells(variants, [ann, ben], ["p0", "p1"], [0, 7])
    assert len(cells) == 16 and [c.variant for c in cells[:8]] == [variants[0]] * 8
    keys = [c.key for c in cells]
    assert len(set(keys)) == 16 and all(grid.slug(k, 200) == k for k in keys)
    assert cells[3].key.endswith("__Ann-B__p01__s7")
    assert grid.parse_seeds("0-2,10") == [0, 1, 2, 10] and grid.parse_seeds("5") == [5]
    with pytest.raises(grid.GridError, match="repeats a seed"):
        grid.build_cells(variants, [ann], ["p"], [1, 1])
    with pytest.raises(grid.GridError, match="not a seed"):
        grid.parse_seeds("a")
    # long names that share a prefix stay apart
    long_a, long_b = "x" * 80 + "a", "x" * 80 + "b"
    assert grid.variant_slug(long_a) != grid.variant_slug(long_b)


def test_prompt_sets_and_files(tmp_path):
    assert len(load_prompts("recontext")) == 20 and load_prompts("portrait") == list(BUILT_IN_SETS["portrait"])
    assert all("person" in p for p in load_prompts("recontext"))
    path = tmp_path / "prompts.txt"
    path.write_text("# mine\na cat\n\n  a dog  \n")
    assert load_prompts(str(path)) == ["a cat", "a dog"]
    path.write_text("# nothing\n")
    with pytest.raises(PromptSetError, match="holds no prompts"):
        load_prompts(str(path))
    with pytest.raises(PromptSetError, match="neither a built-in"):
        load_prompts("nope")


# --------------------------------------------------------------------------------------------------
# Bindings


def _workflow():
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}, "_meta": {"title": "Reference photo"}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "pose.png"}, "_meta": {"title": "Pose"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["1", 1]}, "_meta": {"title": "Positive"}},
        "11": {"class_type": "KSampler", "inputs": {"seed": 42}},
        "12": {"class_type": "KSamplerAdvanced", "inputs": {"noise_seed": 1}},
        "13": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}},
    }


def test_bindings_follow_titles_and_sampler_classes():
    prompt = _workflow()
    found = bd.resolve_bindings(prompt)
    assert found == bd.Bindings(("5", "image"), ("7", "text"), (("11", "seed"), ("12", "noise_seed")), ("13",))
    bound = bd.bind(prompt, found, "/photos/ann.png", "a photo of a person on a beach", 3)
    assert bound["5"]["inputs"]["image"] == "/photos/ann.png" and bound["6"]["inputs"]["image"] == "pose.png"
    assert bound["7"]["inputs"] == {"text": "a photo of a person on a beach", "clip": ["1", 1]}
    assert bound["11"]["inputs"]["seed"] == 3 and bound["12"]["inputs"]["noise_seed"] == 3
    assert prompt["11"]["inputs"]["seed"] == 42  # the variant's prompt is left as it was


def test_bindings_fall_back_to_the_only_load_image_and_consistentid_encode():
    prompt = _workflow()
    del prompt["6"], prompt["7"]
    prompt["5"]["_meta"] = {}
    prompt["9"] = {"class_type": "LikenessConsistentIDEncode", "inputs": {"prompt": "p", "negative": "n"}}
    found = bd.resolve_bindings(prompt)
    assert found.image == ("5", "image") and found.prompt == ("9", "prompt")


def test_bindings_fail_clearly_when_the_workflow_lacks_an_input():
    prompt = _workflow()
    prompt["6"]["_meta"]["title"] = "Reference photo"
    with pytest.raises(bd.BindingError, match=r"several nodes could take the identity photo \(#5, #6\)"):
        bd.resolve_bindings(prompt)
    prompt = _workflow()
    del prompt["5"]
    prompt["6"]["class_type"] = "LoadImageMask"
    with pytest.raises(bd.BindingError, match="no input for the identity photo.*--image-input"):
        bd.resolve_bindings(prompt)
    for node, what in (("7", "no input for the prompt"), ("13", "saves no image")):
        prompt = _workflow()
        del prompt[node]
        with pytest.raises(bd.BindingError, match=what):
            bd.resolve_bindings(prompt)
    prompt = _workflow()
    del prompt["11"], prompt["12"]
    with pytest.raises(bd.BindingError, match="no sampler"):
        bd.resolve_bindings(prompt)
    assert bd.resolve_bindings(prompt, seeds=[("1", "seed")]).seeds == (("1", "seed"),)


# --------------------------------------------------------------------------------------------------
# Resume bookkeeping and the metric cache


def test_a_cell_is_finished_only_with_a_record_of_the_same_fingerprint(tmp_path):
    store = records.CellStore(str(tmp_path))
    assert store.finished("k", "f1") is None
    record = records.CellRecord("k", "f1", ["images/v/k_0.png"], 1.5, 300.0, "rss")
    store.save(record)
    assert store.finished("k", "f1") is None  # its image is not there
    _photo(tmp_path / "images" / "v" / "k_0.png")
    assert store.finished("k", "f1") == record
    assert store.finished("k", "f2") is None  # made from another workflow or photo: run again
    assert os.listdir(tmp_path / "cells") == ["k.json"]  # no temporary file left behind
    (tmp_path / "cells" / "k.json").write_text('{"key": "k"')  # a damaged record counts as missing
    assert store.finished("k", "f1") is None
    (tmp_path / "cells" / "k.json").write_text(json.dumps({"key": "k", "other": 1}))
    assert store.load("k") is None


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    records.atomic_write_json(str(path), {"a": 1})

    def broken_dumps(*args, **kwargs):
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(records.json, "dumps", broken_dumps)
    with pytest.raises(KeyboardInterrupt):
        records.atomic_write_json(str(path), {"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["r.json"]


def test_metrics_are_measured_once_per_image_content(tmp_path, monkeypatch):
    calls = []

    def fake_compute(images, *, references, second_photos, prompts, metrics, models):
        calls.append((images.shape[0], metrics, second_photos is not None))
        return [{"image": i, "clip_i": float(images[i].mean()), "notes": ""} for i in range(images.shape[0])]

    monkeypatch.setattr(measure, "compute_metrics", fake_compute)
    identity = grid.Identity("ann", _photo(tmp_path / "ann" / "1.png", 10), (_photo(tmp_path / "ann" / "2.png", 20),))
    variant = grid.Variant("v", "/w.json")
    cell = grid.Cell(variant, identity, 0, "a photo", 0)
    first = _photo(tmp_path / "out" / "a.png", 51)
    copy = _photo(tmp_path / "out" / "b.png", 51)     # same content, another file
    other = _photo(tmp_path / "out" / "c.png", 102)
    measurer = measure.Measurer(MetricModels(), "clip_i,copy_paste", str(tmp_path / "out"), {"clip": "tiny"})
    rows = measurer.rows(cell, [first, other])
    assert calls == [(2, ["copy_paste", "clip_i"], True)]
    assert rows[0]["clip_i"] == pytest.approx(0.2) and rows[1]["clip_i"] == pytest.approx(0.4)
    assert measurer.rows(cell, [copy]) == [rows[0]] and len(calls) == 1  # cached by content
    other_prompt = grid.Cell(variant, identity, 1, "another prompt", 0)
    measurer.rows(other_prompt, [first])
    assert len(calls) == 2  # the prompt is part of what a value depends on
    alone = grid.Identity("ben", identity.reference, ())
    measurer.rows(grid.Cell(variant, alone, 0, "a photo", 0), [first])
    assert calls[-1] == (1, ["clip_i"], False)  # no held-out photo: no copy-paste check
    with pytest.raises(Exception, match="cannot measure outside_mask"):
        measure.Measurer(MetricModels(), "outside_mask", str(tmp_path), {})
    assert "outside_mask" not in measure.Measurer(MetricModels(), "all", str(tmp_path), {}).names


# --------------------------------------------------------------------------------------------------
# Tables


def test_mean_std_formatting():
    assert tables.format_mean_std(0.51234, 0.0345) == "0.512 ± 0.035"
    assert tables.format_mean_std(31.5, 2.25, digits=2) == "31.50 ± 2.25"
    assert tables.format_mean_std(float("inf"), float("nan")) == "inf"
    assert tables.format_mean_std(None, None) == "–"


def test_comparison_table_bolds_the_best_per_column_in_its_direction():
    def rows(variant, facesim, dlib_l2, seconds, copy_sim):
        return [{"variant": variant, "identity": "ann", "facesim_arcface": f, "dlib_l2": d, "copy_sim_ref": copy_sim,
                 "seconds": s, "peak_memory_mb": 100.0} for f, d, s in zip(facesim, dlib_l2, seconds, strict=True)]

    data = (rows("FaceID", [0.4, 0.6], [0.5, 0.5], [2.0, 2.0], 0.9)
            + rows("Fusion", [0.7, 0.7], [0.4, 0.6], [3.0, 5.0], 0.3)
            + rows("MakeUp", [0.6, 0.8], [0.3, 0.3], [2.0, 2.0], 0.5))
    table = eval_report.comparison_table(data)
    assert table.rows == ["FaceID", "Fusion", "MakeUp"]
    assert table.columns == ["facesim_arcface", "dlib_l2", "copy_sim_ref", "seconds", "peak_memory_mb"]
    assert table.cells[0] == ["0.500 ± 0.100", "0.500 ± 0.000", "0.900 ± 0.000", "2.000 ± 0.000", "100.000 ± 0.000"]
    # facesim: a tie between Fusion and MakeUp (both bold); dlib_l2 and seconds: lower is better;
    # copy_sim_ref describes, never ranked; equal memory: all bold.
    assert [row[0] for row in table.bold] == [False, True, True]
    assert [row[1] for row in table.bold] == [False, False, True]
    assert [row[2] for row in table.bold] == [False, False, False]
    assert [row[3] for row in table.bold] == [True, False, True]
    markdown = table.markdown()
    assert "| variant | facesim_arcface | dlib_l2 |" in markdown
    assert "| MakeUp | **0.700 ± 0.100** | **0.300 ± 0.000** |" in markdown
    markup = table.html()
    assert "<tr><th>Fusion</th><td><b>0.700 ± 0.000</b></td><td>0.500 ± 0.100</td>" in markup


def test_a_column_measured_for_one_variant_has_no_best_and_missing_cells_show_a_dash():
    data = [{"variant": "a", "clip_t": 0.3}, {"variant": "b", "clip_t": None}]
    table = tables.summary_table("t", "variant", {"a": data[:1], "b": data[1:]}, ["clip_t"])
    assert table.cells == [["0.300 ± 0.000"], ["–"]] and table.bold == [[False], [False]]


def test_rows_csv_lists_cell_fields_metrics_and_notes():
    text = eval_report.rows_csv([
        {"variant": "v", "identity": "ann", "prompt_index": 0, "prompt": "a, b", "seed": 1, "image": "i.png",
         "seconds": 1.0, "peak_memory_mb": 2.0, "memory_kind": "rss", "clip_t": 0.25, "notes": ""},
        {"variant": "v", "identity": "ann", "prompt_index": 0, "prompt": "c", "seed": 2, "image": "j.png",
         "seconds": 1.0, "peak_memory_mb": 2.0, "memory_kind": "rss", "clip_t": None, "dino": 0.5,
         "notes": "clip_t: no text"}])
    lines = text.splitlines()
    assert lines[0] == ("variant,identity,prompt_index,prompt,seed,image,seconds,peak_memory_mb,memory_kind,"
                        "clip_t,dino,notes")
    assert lines[1] == 'v,ann,0,"a, b",1,i.png,1.0,2.0,rss,0.25,,'
    assert lines[2] == "v,ann,0,c,2,j.png,1.0,2.0,rss,,0.5,clip_t: no text"


# --------------------------------------------------------------------------------------------------
# The command's plan (no ComfyUI)


def _parsed(*argv):
    import argparse

    from likeness.cli import eval as eval_cli

    parser = argparse.ArgumentParser()
    eval_cli.add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def test_plan_from_the_command_line(tmp_path):
    from likeness.cli import eval as eval_cli

    _photo(tmp_path / "people" / "ann" / "1.png")
    _photo(tmp_path / "people" / "ben" / "1.png")
    args = _parsed("a.json", "b.json", "--identities", str(tmp_path / "people"), "--prompt-count", "3",
                   "--seeds", "0-1", "--sweep", "KSampler.cfg=4,6", "--out", str(tmp_path / "out"))
    plan = eval_cli.build_plan(args)
    assert len(plan.cells) == 4 * 2 * 3 * 2 and plan.prompts == load_prompts("recontext")[:3]
    assert plan.describe() == "48 cells: 4 variant(s) × 2 identities × 3 prompt(s) × 2 seed(s)."
    with pytest.raises(grid.GridError, match="NODE.INPUT=v1,v2"):
        eval_cli.build_plan(_parsed("a.json", "--identities", str(tmp_path / "people"), "--sweep", "cfg=1",
                                    "--out", "x"))


def test_the_fingerprint_follows_the_photo_content_not_its_path(tmp_path):
    from likeness.cli import eval as eval_cli

    photo = _photo(tmp_path / "ann" / "1.png", 10)
    identity = grid.Identity("ann", photo, ())
    cell = grid.Cell(grid.Variant("v", "/w.json"), identity, 0, "p", 0)
    bindings = bd.resolve_bindings(_workflow())
    bound = bd.bind(_workflow(), bindings, photo, "p", 0)
    first = eval_cli.cell_fingerprint(cell, bound, bindings)
    moved = _photo(tmp_path / "elsewhere" / "1.png", 10)
    moved_cell = grid.Cell(cell.variant, grid.Identity("ann", moved, ()), 0, "p", 0)
    assert eval_cli.cell_fingerprint(moved_cell, bd.bind(_workflow(), bindings, moved, "p", 0), bindings) == first
    _photo(tmp_path / "ann" / "1.png", 99)  # the photo replaced: the cell is run again
    assert eval_cli.cell_fingerprint(cell, bound, bindings) != first
    other_seed = bd.bind(_workflow(), bindings, photo, "p", 1)
    assert eval_cli.cell_fingerprint(cell, other_seed, bindings) != eval_cli.cell_fingerprint(cell, bound, bindings)


def test_command_line_errors_are_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    from likeness.cli import eval as eval_cli
    from likeness.cli import main as cli_main

    monkeypatch.setattr(eval_cli.runner, "setup_logging", lambda verbose: None)
    code = cli_main.main(["eval", "a.json", "--identities", str(tmp_path / "nobody"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: identity folder") and "does not exist" in err and "Traceback" not in err
    _photo(tmp_path / "ann" / "1.png")
    code = eval_cli.main(["a.json", "--identities", str(tmp_path / "ann"), "--prompts", "nope", "--out", "x"])
    assert code == 2 and "neither a built-in prompt set" in capsys.readouterr().err
    assert eval_cli.main(["a.json"]) == 2  # --identities and --out are required (argparse's own message)


def test_progress_bar_writes_one_line_per_cell_to_a_log():
    import io

    from likeness.cli.console import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(4, stream)
    bar.show("running")  # not a terminal: nothing until the cell ends
    bar.advance("a 1.0 s")
    bar.message("cell b failed: no face")
    bar.advance("b FAILED")
    assert stream.getvalue().splitlines() == ["[######..................] 1/4  a 1.0 s", "cell b failed: no face",
                                              "[############............] 2/4  b FAILED"]


def test_cell_cost_measures_time_and_the_resident_peak_on_the_cpu():
    import mmap
    import time

    from likeness.evaluation.cost import MB, measure_cell, resident_bytes

    before = resident_bytes() / MB
    with measure_cell(cuda=False) as cost:
        # 64 MiB of fresh pages touched while the cell runs and returned before it ends. An anonymous map, not
        # a numpy array: malloc may serve an array from heap pages an earlier test left resident.
        block = mmap.mmap(-1, 64 << 20)
        block.write(b"\1" * (64 << 20))
        time.sleep(0.1)
        block.close()
    assert cost.memory_kind == "rss" and cost.seconds >= 0.1
    assert cost.peak_memory_mb >= before + 60 and resident_bytes() / MB < cost.peak_memory_mb


def test_cell_cost_samples_the_resident_memory_where_the_kernel_peak_cannot_be_reset(monkeypatch):
    from likeness.evaluation import cost as cost_module

    monkeypatch.setattr(cost_module, "_reset_resident_peak", lambda: False)
    with cost_module.measure_cell(cuda=False) as cost:
        block = np.ones(16 << 20, np.uint8)
    held = cost_module.resident_bytes() / cost_module.MB
    del block
    assert cost.memory_kind == "rss" and cost.peak_memory_mb >= held - 1  # at least what was held at the end
