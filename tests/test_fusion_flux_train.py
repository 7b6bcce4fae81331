"""Face Fusion trainer on a Flux DiT (a tiny FLUX.1 dev from ComfyUI's own ``Flux`` class, built under inference mode
as a loader node makes it): the rectified-flow objective, loss falls, bit-identical resume against a straight run,
bf16 and checkpointing options, a refused UNet adapter, and the node / command-line settings for a Flux model."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host

LEARN = dict(steps=30, lr=2e-2, batch_size=2, seed=0, checkpoint_every=0, resolution=64, reference_size=128,
             rank=8, guidance=3.5)


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def flux_setup(comfy_ready, one_thread):
    """A private tiny FLUX.1 dev (inference tensors) and synthetic data whose reference is the target itself, so an
    adapter that carries the reference's values into the generation can lower the loss."""
    import comfy.supported_models

    import host_support
    from likeness.techniques.face_fusion.training import FusionTrainingData

    with torch.inference_mode():
        model = host_support._patcher(comfy.supported_models.Flux, host_support.flux_dit_config(depth=2, depth_single=4),
                                      11)
        # fan-in scaled weights: with N(0, 0.02) the random DiT's output is ~0 whatever its inputs, nothing can learn
        host_support.init_weights(model.model.diffusion_model, 11, fan_in_gain=1.0)
        generator = torch.Generator().manual_seed(0)
        count = 4
        clean = torch.randn(count, 16, 8, 8, generator=generator)
        references = model.model.process_latent_out(clean)   # VAE space; the capture maps it back to ``clean``
        data = FusionTrainingData(clean, references, torch.randn(count, 16, 64, generator=generator),
                                  torch.zeros(1, 16, 64), None, "synthetic-4", 0,
                                  torch.randn(count, 32, generator=generator), torch.zeros(1, 32))
    assert next(model.model.diffusion_model.parameters()).is_inference()
    return dict(model=model, data=data)


def _settings(**kw):
    from likeness.techniques.face_fusion.flux_training import FluxFusionTrainSettings

    return FluxFusionTrainSettings(**{**LEARN, **kw})


def test_objective_is_rectified_flow_with_velocity_target(flux_setup):
    """ComfyUI's Flux sampling: x_t = (1 - t) x0 + t noise and the model's native output (the velocity) has the
    target noise - x0: what the trainer's loss compares."""
    from likeness.trainers import losses

    sampling = flux_setup["model"].get_model_object("model_sampling")
    generator = torch.Generator().manual_seed(1)
    clean, noise = torch.randn(2, 16, 8, 8, generator=generator), torch.randn(2, 16, 8, 8, generator=generator)
    sigma = torch.tensor([0.3, 0.8])
    x_t = losses.noised(sampling, sigma, noise, clean)
    assert torch.allclose(x_t, (1 - sigma.view(-1, 1, 1, 1)) * clean + sigma.view(-1, 1, 1, 1) * noise, atol=1e-6)
    velocity = torch.randn(2, 16, 8, 8, generator=generator)
    denoised = sampling.calculate_denoised(sigma, velocity, x_t)
    prediction, target = losses.native_space(sampling, sigma, x_t, denoised, clean)
    assert torch.allclose(prediction, velocity, atol=1e-4) and torch.allclose(target, noise - clean, atol=1e-4)


def test_loss_falls(flux_setup):
    from likeness.techniques.face_fusion import FluxFusionAdapter
    from likeness.techniques.face_fusion import training as T

    model, data = flux_setup["model"], flux_setup["data"]
    settings = _settings()
    frozen = [p.detach().clone() for p in list(model.model.diffusion_model.parameters())[:12]]
    with torch.inference_mode():
        initial = FluxFusionAdapter.from_model(model, rank=settings.rank, seed=settings.seed)
        before = T.evaluate_loss(model, initial, data, settings, rounds=3)
        adapter, result = T.train_on_data(model, data, settings)
        after = T.evaluate_loss(model, adapter, data, settings, rounds=3)
    assert isinstance(adapter, FluxFusionAdapter) and adapter.metadata["guidance"] == "3.5"
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert after < 0.85 * before, (before, after)   # ~22 % lower on this data
    assert last < first
    for a, b in zip(frozen, list(model.model.diffusion_model.parameters())[:12], strict=True):
        assert torch.equal(a, b)   # the DiT stays frozen
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in adapter.parameters())


def test_interrupted_and_resumed_is_bit_identical_to_a_straight_run(flux_setup, tmp_path):
    from likeness.techniques.face_fusion import training as T
    from trainer_support import straight_and_resumed

    settings = _settings(steps=5, checkpoint_every=2, grad_accumulation=2, caption_dropout=0.3)
    straight, straight_result, resumed, resumed_result, checkpointed = straight_and_resumed(
        T.train_on_data, flux_setup["model"], flux_setup["data"], settings, str(tmp_path), cancel_step=3)
    assert checkpointed == 2
    assert resumed_result.start_step == 2 and resumed_result.step == 5
    assert resumed_result.losses == straight_result.losses
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bf16_and_keeping_activations_train(flux_setup):
    """precision=bf16 (autocast, fp32 trainables) and gradient_checkpointing=False both run and move the adapter;
    the checkpointing choice reaches the engine's option."""
    from likeness.attention_patches import DIT_CHECKPOINT_KEY
    from likeness.techniques.face_fusion import training as T

    model, data = flux_setup["model"], flux_setup["data"]
    with torch.inference_mode():
        bf16, result = T.train_on_data(model, data, _settings(steps=2, precision="bf16"))
        kept, _ = T.train_on_data(model, data, _settings(steps=2, gradient_checkpointing=False))
        task = T.task_for(model, data, _settings(gradient_checkpointing=False))
        with task.session():
            assert task.options[DIT_CHECKPOINT_KEY] is False
    assert bf16.metadata["precision"] == "bf16" and all(torch.isfinite(torch.tensor(result.losses)))
    for adapter in (bf16, kept):
        assert all(p.dtype == torch.float32 for p in adapter.parameters())
        assert float(adapter.double_blocks[0].to_v_f.up.weight.abs().max()) > 0   # moved off the identity


def test_a_unet_adapter_and_unet_settings_are_refused(flux_setup, tiny_sd15):
    from likeness.errors import CheckpointLayoutError, InvalidInputError
    from likeness.techniques.face_fusion import FusionAdapter
    from likeness.techniques.face_fusion import training as T

    model, data = flux_setup["model"], flux_setup["data"]
    with torch.inference_mode(), pytest.raises(CheckpointLayoutError, match="the MODEL is a Flux-family DiT"):
        T.train_on_data(model, data, _settings(steps=1), adapter=FusionAdapter.from_model(tiny_sd15))
    with pytest.raises(InvalidInputError, match="FluxFusionTrainSettings"):
        T.task_for(model, data, T.FusionTrainSettings(**{k: v for k, v in LEARN.items() if k not in ("rank", "guidance")}))


def test_settings_for_a_flux_model_from_node_values(flux_setup, tiny_sd15):
    from likeness.techniques.face_fusion import training as T
    from likeness.techniques.face_fusion.flux_training import FluxFusionTrainSettings

    values = dict(steps=3, lr=1e-3, reference_downsample=2, guidance=2.0, precision="fp32", rank=4,
                  gradient_checkpointing=False)
    flux = T.make_settings(flux_setup["model"], **values)
    assert isinstance(flux, FluxFusionTrainSettings)
    assert (flux.guidance, flux.rank, flux.reference_downsample, flux.gradient_checkpointing) == (2.0, 4, 1, False)
    unet = T.make_settings(tiny_sd15, **values)
    assert type(unet) is T.FusionTrainSettings and unet.reference_downsample == 2


def test_train_node_on_a_flux_model_saves_a_flux_adapter(flux_setup, host_env):
    """The Train Face Fusion node with a Flux MODEL, FLUX's two text encoders and 16-channel VAE (tiny): it trains a
    Flux adapter with the node's Flux inputs and writes it where the loader finds it."""
    import os

    from host_support import build_tiny_flux_clip, build_tiny_flux_vae
    from likeness.nodes.face_fusion_train import TrainFaceFusion
    from likeness.techniques.face_fusion import FluxFusionAdapter, load_fusion_adapter

    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        out = TrainFaceFusion().train(flux_setup["model"], build_tiny_flux_vae(), build_tiny_flux_clip(), "flux_face",
                                      steps=2, learning_rate=1e-3, batch_size=2, grad_accumulation=1, seed=0,
                                      checkpoint_every=0, resume="fresh", resolution=64, reference_size=256,
                                      images=images, captions="a photo of a person", guidance=2.5, rank=4,
                                      precision="fp32", gradient_checkpointing=True)
    result = out["result"] if isinstance(out, dict) else out
    adapter, curve = result
    assert isinstance(adapter, FluxFusionAdapter) and adapter.rank == 4 and curve.shape[-1] == 3
    saved = load_fusion_adapter(os.path.join(host_env.models, "likeness", "fusion", "flux_face.safetensors"))
    assert isinstance(saved, FluxFusionAdapter) and saved.metadata["layout"] == "dit"
    assert saved.metadata["guidance"] == "2.5" and saved.metadata["trained_steps"] == "2"


def test_cli_trains_a_flux_adapter_from_separate_model_files(flux_setup, host_env, tmp_path, monkeypatch,
                                                             isolated_runner_state, capsys):
    """``train fusion --diffusion-model --text-encoder x2 --vae`` with the Flux options. ComfyUI detects a Flux file's
    width as FLUX.1's (3072), so the tiny model cannot come from a file: the host loaders are replaced by ones that
    record the paths and return the tiny FLUX parts."""
    import os

    from PIL import Image

    from host_support import build_tiny_flux_clip, build_tiny_flux_vae
    from likeness.cli import main as cli_main
    from likeness.host import training as host_training
    from likeness.techniques.face_fusion import FluxFusionAdapter, load_fusion_adapter

    asked = {}
    monkeypatch.setattr(host_training, "load_diffusion_model_file",
                        lambda path: asked.setdefault("model", path) and flux_setup["model"])
    monkeypatch.setattr(host_training, "load_text_encoder_files",
                        lambda paths, kind: asked.setdefault("clip", (tuple(paths), kind)) and build_tiny_flux_clip())
    monkeypatch.setattr(host_training, "load_vae_file", lambda path: asked.setdefault("vae", path) and
                        build_tiny_flux_vae())
    files = {name: tmp_path / f"{name}.safetensors" for name in ("flux1", "clip_l", "t5xxl", "ae")}
    for path in files.values():
        path.write_bytes(b"")
    data = tmp_path / "photos"
    data.mkdir()
    for i in range(2):
        pixels = (torch.rand(48, 48, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()
        Image.fromarray(pixels).save(data / f"p{i}.png")
        (data / f"p{i}.txt").write_text("a photo of a person")
    code = cli_main.main(["train", "fusion", "--data", str(data), "--diffusion-model", str(files["flux1"]),
                          "--text-encoder", str(files["clip_l"]), "--text-encoder", str(files["t5xxl"]),
                          "--vae", str(files["ae"]), "--name", "cli_flux", "--comfyui", host_env.comfy_path,
                          "--steps", "2", "--resolution", "64", "--reference-size", "256", "--batch-size", "2",
                          "--guidance", "4.0", "--rank", "2", "--precision", "fp32", "--no-gradient-checkpointing",
                          "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert asked == {"model": str(files["flux1"]), "clip": ((str(files["clip_l"]), str(files["t5xxl"])), "flux"),
                     "vae": str(files["ae"])}
    adapter = load_fusion_adapter(os.path.join(host_env.models, "likeness", "fusion", "cli_flux.safetensors"))
    assert isinstance(adapter, FluxFusionAdapter) and adapter.rank == 2
    assert (adapter.metadata["guidance"], adapter.metadata["gradient_checkpointing"]) == ("4.0", "false")


def test_cli_usage_for_separate_model_files(tmp_path, capsys):
    from likeness.cli import main as cli_main
    from likeness.cli import train as cli_train

    model = tmp_path / "flux1.safetensors"
    model.write_bytes(b"")
    base = ["train", "fusion", "--data", str(tmp_path)]
    assert cli_main.main(base) == cli_train.EXIT_USAGE
    assert "give --checkpoint FILE" in capsys.readouterr().err
    assert cli_main.main([*base, "--diffusion-model", str(model)]) == cli_train.EXIT_USAGE
    assert "needs --text-encoder" in capsys.readouterr().err
    assert cli_main.main([*base, "--diffusion-model", str(model), "--text-encoder", str(tmp_path / "t5.sft"),
                          "--vae", str(model)]) == cli_train.EXIT_USAGE
    assert "t5.sft: no such file" in capsys.readouterr().err


def test_model_file_loaders_for_separate_files_refuse_missing_files_and_unknown_types(comfy_ready, tmp_path):
    from likeness.errors import ModelFileError
    from likeness.host.training import load_diffusion_model_file, load_text_encoder_files

    with pytest.raises(ModelFileError, match="diffusion model file .* does not exist"):
        load_diffusion_model_file(str(tmp_path / "flux1-dev.safetensors"))
    with pytest.raises(ModelFileError, match="text encoder file .* does not exist"):
        load_text_encoder_files([str(tmp_path / "clip_l.safetensors")])
    with pytest.raises(ModelFileError, match="unknown text encoder type 'fluxx'"):
        load_text_encoder_files([str(tmp_path / "clip_l.safetensors")], "fluxx")


def test_schnell_trains_without_a_guidance_input(comfy_ready, flux_setup):
    """FLUX.1 schnell has no guidance embedding: the task passes ``y`` only (a ``guidance`` it ignores is not made)."""
    from host_support import build_tiny_flux
    from likeness.techniques.face_fusion import training as T

    schnell = build_tiny_flux(depth=2, depth_single=4, guidance_embed=False)
    task = T.task_for(schnell, flux_setup["data"], _settings())
    with torch.inference_mode(), task.session():
        extra = task._extra_conds(flux_setup["data"].pooled[:2], 2)
    assert set(extra) == {"y"}
    with torch.inference_mode():
        adapter, result = T.train_on_data(schnell, flux_setup["data"], _settings(steps=2))
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    dev_task = T.task_for(flux_setup["model"], flux_setup["data"], _settings(guidance=2.0))
    with torch.inference_mode(), dev_task.session():
        dev_extra = dev_task._extra_conds(flux_setup["data"].pooled[:2], 2)
    assert set(dev_extra) == {"y", "guidance"} and dev_extra["guidance"].tolist() == [2.0, 2.0]
