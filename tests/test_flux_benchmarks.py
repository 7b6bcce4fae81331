"""Smoke tests of the Flux benchmarks (``benchmarks/flux_identity.py``, ``flux_fusion.py``) at their ``--tiny`` size.

They check that the scripts run end to end (memory workers, timing worker, report) and that every row that runs
patches the model it says it patches (its identity modules run), not the figures.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)

import flux_bench  # noqa: E402
import flux_identity  # noqa: E402


def test_the_full_shape_is_flux1_dev_as_comfyui_detects_it():
    config = flux_bench.Shape().dit_config()
    assert config["axes_dim"] == [16, 56, 56]
    assert (config["hidden_size"], config["num_heads"], config["context_in_dim"], config["vec_in_dim"]) == (
        3072, 24, 4096, 768)
    assert config["guidance_embed"] and config["qkv_bias"]
    assert flux_bench.Shape().image_tokens == 1024
    tiny = flux_bench.TINY.dit_config()
    assert sum(tiny["axes_dim"]) == flux_bench.TINY.dim_head


def test_paired_ratio_is_the_median_of_per_round_ratios():
    runs, base = [(2.0, 1.0), (3.0, 3.0), (4.0, 1.0)], [(1.0, 1.0), (2.0, 2.0), (4.0, 2.0)]
    assert flux_bench.paired_ratio(runs, base) == 1.5
    assert flux_bench.paired_ratio(runs, base, 1) == 1.0


def _run(script: str, *flags: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), "--tiny", "--threads", "1", *flags],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _rows(output: str) -> dict[str, str]:
    """``{row: the rest of its timing line}`` of the printed table."""
    table = output.split("vs unpatched (median of per-round ratios", 1)[1]
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\w[\w-]*) +(\d+\.\d+ .*)$", table, re.M)}


def _calls(line: str) -> int:
    return int(line.split()[4])


@pytest.mark.host
def test_flux_identity_runs_every_row_and_each_runs_its_cross_attentions():
    output = _run("flux_identity.py")
    rows = _rows(output)
    assert "unpatched" in rows
    assert "memory (MiB" in output and re.search(r"^unpatched +\d+ +\d+", output, re.M)
    # 2 double + 4 single blocks: PuLID's schedule puts a cross-attention after double 0 and single 0
    assert _calls(rows["ours"]) == 2, output
    assert re.search(r"target ours/unpatched <= 1.05: x\d", output)
    if os.path.isdir(flux_identity.LLDACING_MIRROR):
        assert _calls(rows["lldacing"]) == 2, output
        assert re.search(r"target ours/lldacing <= 1.00: x\d", output)
    else:
        assert "lldacing: not run: no fetched copy" in output


@pytest.mark.host
def test_flux_fusion_cached_runs_one_reference_pass_and_joins_every_block():
    output = _run("flux_fusion.py", "--rows", "unpatched,cached,per-step")
    rows = _rows(output)
    assert set(rows) == {"unpatched", "cached", "per-step"}, output
    assert _calls(rows["cached"]) == 6, output        # 2 double + 4 single blocks join the face keys
    assert "cached: reference passes: 1 in the warm-up run, [0] in the timed runs" in output
    assert "per-step: reference passes: 1 in the warm-up run, [1] in the timed runs" in output
    assert re.search(r"target cached/unpatched <= 1.15: x\d", output)
    assert re.search(r"^cached +\d+ +\d+ +\d+ +\d+ +\d+ +\+", output, re.M), output
