"""Mixed precision and CPU memory release for the trainers (plain tensors, no host)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT
from likeness.errors import InvalidInputError
from likeness.trainers.memory import release_free_memory, trims_cpu_memory
from likeness.trainers.precision import compute_dtype, compute_precision, native_bf16


def test_precision_settings_resolve_per_device():
    assert compute_dtype("fp32", "cpu") is None
    assert compute_dtype("bf16", "cpu") is torch.bfloat16
    assert compute_dtype("auto", "cpu") is (torch.bfloat16 if native_bf16("cpu") else None)
    assert compute_dtype("auto", "meta") is None  # no native bf16 known there: plain fp32
    with pytest.raises(InvalidInputError, match="precision must be one of"):
        compute_dtype("fp16", "cpu")
    with pytest.raises(InvalidInputError, match="use fp32"):
        compute_dtype("bf16", "meta")


def test_bf16_compute_keeps_trainable_tensors_and_gradients_fp32():
    torch.manual_seed(0)
    frozen = torch.nn.Linear(16, 16).requires_grad_(False)
    adapter = torch.nn.Linear(16, 16, bias=False)
    x, target = torch.randn(8, 16), torch.randn(8, 16)
    with compute_precision(torch.bfloat16, "cpu"):
        hidden = frozen(x) + adapter(x)
        assert hidden.dtype == torch.bfloat16
    loss = ((hidden.float() - target) ** 2).mean()
    loss.backward()
    assert adapter.weight.dtype == torch.float32 and adapter.weight.grad.dtype == torch.float32
    assert frozen.weight.grad is None and frozen.weight.dtype == torch.float32

    with compute_precision(None, "cpu"):
        assert (frozen(x) + adapter(x)).dtype == torch.float32


def test_bf16_training_converges_like_fp32():
    """A small regression trained in bf16 compute reaches nearly the fp32 loss (same seed, same steps)."""
    def run(dtype):
        torch.manual_seed(0)
        teacher = torch.nn.Linear(32, 8)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        data = torch.randn(256, 32)
        with torch.no_grad():
            target = teacher(data)
        for _ in range(150):
            with compute_precision(dtype, "cpu"):
                out = model(data)
            loss = ((out.float() - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())

    fp32, bf16 = run(None), run(torch.bfloat16)
    assert fp32 < 0.05
    assert bf16 < 2 * fp32 + 0.01


@pytest.mark.skipif(not trims_cpu_memory("cpu"), reason="malloc_trim needs glibc")
def test_release_returns_fragmented_heap_pages_to_the_os():
    """Freed blocks below a live one stay resident until released (run in a fresh process)."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, %r)
        from _bootstrap import load_pack
        load_pack()
        from likeness.trainers.memory import release_free_memory

        def rss_mib():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

        big = torch.ones(4 << 20)       # 16 MiB, mmapped; freeing it raises glibc's mmap threshold
        del big
        blocks, keep = [], []
        for _ in range(200):            # 200 x 1 MiB, now served from the heap, each followed by a live
            blocks.append(torch.ones(1 << 18))   # 16 KiB block: freeing them leaves holes, not a free top
            keep.append(torch.ones(1 << 12))
        del blocks
        before = rss_mib()
        released = release_free_memory()
        after = rss_mib()
        print(before, after, released)
    """ % ROOT)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, released = out.stdout.split()
    assert released == "True"
    assert float(before) - float(after) > 100, out.stdout  # most of the 200 MiB goes back


def test_release_is_harmless_anywhere():
    assert release_free_memory() in (True, False)
    assert trims_cpu_memory("meta") is False
