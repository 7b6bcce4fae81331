"""Face Fusion on Flux trained data-parallel: two gloo ranks on the CPU (torchrun's environment) train the adapter one
process trains with the same global batch (each rank its rows' y, guidance, sigmas, noise and reference noise)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from browser_support import free_port

pytestmark = [pytest.mark.host, pytest.mark.slow]

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SETTINGS = dict(steps=3, lr=1e-4, batch_size=4, grad_accumulation=1, seed=0, checkpoint_every=0, resolution=64,
                reference_size=128, caption_dropout=0.3, rank=4, precision="fp32")

RANK_SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = [{tests!r}, {root!r}]
    import host_support
    host_support.prepare_comfy({comfy!r})
    from _bootstrap import load_pack
    load_pack(run_init=False)
    import torch
    torch.set_num_threads(1)
    import test_fusion_flux_train_distributed as t
    from likeness.techniques.face_fusion import training as T
    from likeness.trainers import distributed

    world = distributed.init_from_environment()
    with torch.inference_mode():
        model = t.tiny_flux_model()
        adapter, result = T.train_on_data(model, t.synthetic_data(model), t.settings(), result_path={out!r})
    print("rank", world.rank, "world", world.size, "wrote", result.result_files)
    distributed.shutdown()
""")


def tiny_flux_model():
    """The seeded tiny FLUX.1 dev every process builds alike (fan-in init, so the adapter gets a signal)."""
    import comfy.supported_models

    import host_support

    with torch.inference_mode():
        model = host_support._patcher(comfy.supported_models.Flux, host_support.flux_dit_config(depth=2, depth_single=2),
                                      5)
        host_support.init_weights(model.model.diffusion_model, 5, fan_in_gain=1.0)
    return model


def synthetic_data(model):
    from likeness.techniques.face_fusion.training import FusionTrainingData

    generator = torch.Generator().manual_seed(2)
    clean = torch.randn(4, 16, 8, 8, generator=generator)
    return FusionTrainingData(clean, model.model.process_latent_out(clean), torch.randn(4, 16, 64, generator=generator),
                              torch.zeros(1, 16, 64), None, "synthetic-ddp", 0, torch.randn(4, 32, generator=generator),
                              torch.zeros(1, 32))


def settings():
    from likeness.techniques.face_fusion.flux_training import FluxFusionTrainSettings

    return FluxFusionTrainSettings(**SETTINGS)


def test_two_ranks_train_the_one_process_flux_adapter(comfy_ready, host_env, tmp_path):
    from likeness.techniques.face_fusion import FluxFusionAdapter, load_fusion_adapter
    from likeness.techniques.face_fusion import training as T

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the ranks: the same float summation order inside each op
    try:
        model = tiny_flux_model()
        with torch.inference_mode():
            single, _ = T.train_on_data(model, synthetic_data(model), settings())
    finally:
        torch.set_num_threads(threads)
    out = str(tmp_path / "adapter.safetensors")
    script = RANK_SCRIPT.format(tests=TESTS, root=ROOT, comfy=host_env.comfy_path, out=out)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1"))
             for rank in range(2)]
    outputs = []
    for proc in procs:
        try:
            outputs.append((proc.communicate(timeout=240)[0], proc.returncode))
        except subprocess.TimeoutExpired:
            proc.kill()
            outputs.append((proc.communicate()[0], proc.returncode))
    assert [code for _, code in outputs] == [0, 0], "\n".join(text[-3000:] for text, _ in outputs)
    assert "rank 0 world 2 wrote ['" in outputs[0][0] and "rank 1 world 2 wrote []" in outputs[1][0]
    trained = load_fusion_adapter(out)
    assert isinstance(trained, FluxFusionAdapter)
    moved = max(float(p.detach().abs().max()) for n, p in single.named_parameters() if n.endswith("up.weight"))
    assert moved > 1e-5   # the single-process run moved off the identity: the comparison below can fail
    for (name, a), (_, b) in zip(single.state_dict().items(), trained.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (name, float((a - b).abs().max()))
