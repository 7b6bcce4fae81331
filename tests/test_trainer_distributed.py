"""Data-parallel training of the one loop (no host): row sharding, per-row randomness, and two gloo ranks
(started the way torchrun starts them) training the same tensors as one process with the same global batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from likeness.safetensors_io import load_tensors
from likeness.trainers import train
from likeness.trainers.distributed import World, launched_distributed
from likeness.trainers.task import StepContext

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def test_each_rank_takes_an_equal_disjoint_share_of_the_batch():
    indices = [7, 3, 9, 1, 4, 0]
    shares = [World(rank, 3).shard(indices) for rank in range(3)]
    assert shares == [[7, 3], [9, 1], [4, 0]]
    assert World().shard(indices) == indices


def test_per_row_draws_do_not_depend_on_the_number_of_processes():
    whole = StepContext(0, 0, torch.Generator().manual_seed(5), {})
    expected = whole.randn((4, 3)), whole.rand((4,))
    for shard in range(2):
        ctx = StepContext(0, 0, torch.Generator().manual_seed(5), {}, shard=shard, shards=2)
        rows = slice(2 * shard, 2 * shard + 2)
        assert torch.equal(ctx.randn((2, 3)), expected[0][rows])
        assert torch.equal(ctx.rand((2,)), expected[1][rows])
        assert torch.equal(ctx.generator.get_state(), whole.generator.get_state())  # generators stay in step


def test_a_plain_launch_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_distributed()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert not launched_distributed()  # torchrun --nproc-per-node 1


RANK_SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from _bootstrap import load_pack
    load_pack()
    import torch
    torch.set_num_threads(1)
    import test_trainer_distributed as t
    from likeness.safetensors_io import atomic_save
    from likeness.trainers import distributed

    world = distributed.init_from_environment()
    try:
        result = t.run_sharded_toy({batch}, result_path={out!r} + "/result.safetensors")
        atomic_save(dict(result.params, losses=torch.tensor(result.losses, dtype=torch.float64)),
                    {out!r} + f"/rank{{world.rank}}.safetensors", {{}})
    finally:
        distributed.shutdown()
""")


def run_sharded_toy(batch_size: int = 4, **config):
    """A toy regression whose loss is a plain mean over rows with per-row noise (no global-RNG dropout)."""
    from test_trainer_loop import ToyTask, toy_config

    def loss(batch, ctx):
        p = ctx.params
        x = batch["x"] + 0.05 * ctx.randn(batch["x"].shape)
        return (((x @ p["lin.weight"] + p["lin.bias"]) * p["scale.gain"] - batch["y"]) ** 2).mean()

    return train(ToyTask(loss=loss), toy_config(steps=12, batch_size=batch_size, grad_accumulation=2, **config))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(tmp_path, world_size: int = 2, **script) -> list[subprocess.CompletedProcess]:
    """``world_size`` processes with the environment torchrun gives its workers."""
    code = RANK_SCRIPT.format(root=ROOT, tests=TESTS, out=str(tmp_path), **{"batch": 4, **script})
    port = str(_free_port())
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


@pytest.mark.slow
def test_two_gloo_ranks_train_what_one_process_trains(tmp_path):
    single = run_sharded_toy()
    done = launch_ranks(tmp_path)
    assert all(p.returncode == 0 for p in done), "\n".join(p.stderr[-2000:] for p in done)
    ranks = [load_tensors(str(tmp_path / f"rank{r}.safetensors"))[0] for r in range(2)]
    assert sorted(os.listdir(tmp_path)) == ["rank0.safetensors", "rank1.safetensors", "result.safetensors"]
    for name, value in single.params.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name          # the ranks stay identical
        assert torch.allclose(ranks[0][name], value, atol=1e-6, rtol=0), name
    assert torch.allclose(ranks[0]["losses"], torch.tensor(single.losses, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_a_batch_the_ranks_cannot_share_equally_is_refused(tmp_path):
    done = launch_ranks(tmp_path, batch=3)
    assert all(p.returncode != 0 for p in done)
    for proc in done:
        assert "InvalidInputError: the batch size (3) must be a multiple of the number of processes" in proc.stderr
