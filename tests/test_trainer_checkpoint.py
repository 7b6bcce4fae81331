"""Atomic checkpoint writes: a SIGKILL at any moment leaves a complete previous checkpoint."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from likeness import safetensors_io
from likeness.errors import CheckpointLayoutError, ModelFileError
from likeness.trainers import checkpoint as ckpt

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

WRITER = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [{root!r}]
    from _bootstrap import load_pack
    load_pack(run_init=False)
    from likeness.trainers.checkpoint import atomic_save
    version = 0
    while True:
        version += 1
        # ~48 MB per file: every tensor holds the version, so a torn file shows mixed or missing values
        tensors = {{f"t{{i}}": torch.full((1024, 1024, 3), float(version)) for i in range(4)}}
        atomic_save(tensors, {path!r}, {{"version": str(version)}})
        print(version, flush=True)
""")


def _check_consistent(path: str) -> int:
    tensors, metadata = ckpt.load_tensors(path)
    version = int(metadata["version"])
    assert sorted(tensors) == ["t0", "t1", "t2", "t3"]
    for tensor in tensors.values():
        assert tensor.shape == (1024, 1024, 3)
        assert float(tensor.min()) == float(tensor.max()) == float(version)
    return version


@pytest.mark.slow
def test_sigkill_while_writing_big_checkpoints_keeps_a_complete_file(tmp_path):
    path = str(tmp_path / "big.safetensors")
    script = WRITER.format(root=ROOT, path=path)
    rng = random.Random(0)
    last_version = 0
    for _round in range(4):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            # wait for at least two complete writes of this round, then kill at a random moment
            written = 0
            deadline = time.monotonic() + 120
            while written < 2 and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                written += 1
            assert written >= 2, proc.stderr.read()[-2000:]
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        version = _check_consistent(path)
        assert version >= 2
        last_version = version
        leftovers = [n for n in os.listdir(tmp_path) if n != "big.safetensors"]
        # a kill inside a write leaves its temp file behind; the next save removes it
        assert all(n.startswith(".big.safetensors.") and n.endswith(".partial") for n in leftovers), leftovers
    ckpt.atomic_save({"t": torch.zeros(1)}, path, {"version": "0"})
    assert os.listdir(tmp_path) == ["big.safetensors"]
    assert last_version >= 2


def test_writer_raising_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.safetensors")
    ckpt.atomic_save({"a": torch.ones(10)}, path, {"version": "1"})

    def broken(tensors, target, metadata):
        with open(target, "wb") as handle:
            handle.write(b"\x00" * 17)
        raise RuntimeError("killed")

    monkeypatch.setattr(safetensors_io, "_write_safetensors", broken)
    with pytest.raises(RuntimeError, match="killed"):
        ckpt.atomic_save({"a": torch.zeros(10)}, path, {"version": "2"})
    tensors, metadata = ckpt.load_tensors(path)
    assert metadata["version"] == "1" and torch.equal(tensors["a"], torch.ones(10))
    assert os.listdir(tmp_path) == ["c.safetensors"]


def test_training_state_round_trip_including_optimizer(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    q = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.01}])
    (p.sum() + q.pow(2).sum()).backward()
    opt.step()
    names = {id(p): "a.p", id(q): "b.q"}
    tensors, scalars = ckpt.optimizer_state_tensors(opt, names)
    gen = torch.Generator().manual_seed(5)
    gen_state = gen.get_state()
    state = ckpt.TrainingState(params={"a.p": p, "b.q": q}, optimizer=tensors, optimizer_scalars=scalars,
                               generator_state=gen_state, global_rng_state=torch.get_rng_state(), step=3,
                               sampler_position=17, losses=[1.0, 0.5, 0.25], metadata={"technique": "toy"})
    path = ckpt.save_training_state(str(tmp_path / "s.safetensors"), state)
    back = ckpt.load_training_state(path)
    assert back.step == 3 and back.sampler_position == 17 and back.losses == [1.0, 0.5, 0.25]
    assert back.metadata["technique"] == "toy"
    assert torch.equal(back.params["a.p"], p.detach()) and torch.equal(back.generator_state, gen_state)

    p2 = torch.nn.Parameter(p.detach().clone())
    q2 = torch.nn.Parameter(q.detach().clone())
    opt2 = torch.optim.AdamW([{"params": [p2], "lr": 0.1}, {"params": [q2], "lr": 0.01}])
    ckpt.load_optimizer_state(opt2, {id(p2): "a.p", id(q2): "b.q"}, back.optimizer, back.optimizer_scalars)
    for a, b in ((p, p2), (q, q2)):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][key], opt2.state[b][key])
    opt.zero_grad()
    (p.sum() + q.pow(2).sum()).backward()
    (p2.sum() + q2.pow(2).sum()).backward()
    opt.step()
    opt2.step()
    assert torch.equal(p, p2) and torch.equal(q, q2)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        ckpt.load_training_state(str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelFileError, match="not a readable"):
        ckpt.load_training_state(str(junk))
    other = ckpt.atomic_save({"x": torch.zeros(1)}, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(CheckpointLayoutError, match="not a Likeness training checkpoint"):
        ckpt.load_training_state(other)
