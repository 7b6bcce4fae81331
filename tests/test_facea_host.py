"""FaceA-Net on the real host: the trainer on a tiny SD1.5-inpainting-shaped model with real face photos,
the LoRA through the stock LoraLoader, the inpaint chain, and every example workflow of the technique."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.host

TESTS = os.path.dirname(os.path.abspath(__file__))
WORKING = 64          # working crop side in the tests (latent 8x8): fast, still a real face crop
FAST = dict(working_size=WORKING, final_preview=False, checkpoint_every=0)


# ------------------------------------------------------------------------------------------ data and models

def reference_photos() -> torch.Tensor:
    """Real photos, 256x256: the astronaut and two faces of insightface's t1 group photo."""
    import torch.nn.functional as F

    from face_fixtures import astronaut, insightface_t1

    t1 = insightface_t1()
    crops = [astronaut(), t1[150:550, 330:730], t1[100:500, 800:1200]]
    tensors = [torch.from_numpy(np.ascontiguousarray(c)).float().div(255).permute(2, 0, 1)[None] for c in crops]
    return torch.cat([F.interpolate(t, size=(256, 256), mode="bilinear", antialias=True, align_corners=False)
                      for t in tensors]).permute(0, 2, 3, 1).contiguous()


def well_conditioned(patcher, seed: int = 0):
    """Re-initialise a tiny UNet with N(0, 1/fan_in) weights (norms 1, biases 0).

    host_support's N(0, 0.02) init makes every layer shrink its input ~5-10x, so almost no gradient
    reaches the attention layers of a 32-channel UNet; a fan-in init behaves like a trained network in
    that respect, which is what a LoRA fine-tune starts from.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in sorted(patcher.model.diffusion_model.named_parameters()):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
    return patcher


def inpaint_model(seed: int = 0, in_channels: int = 9):
    import host_support

    return well_conditioned(host_support.build_tiny_sd15(seed=seed, in_channels=in_channels, cached=False), seed)


def analyzer():
    from likeness.face_analysis.analyzers.dlib_backend import load_dlib

    return load_dlib()


def settings(**kw):
    from likeness.techniques.facea_net.training import TrainSettings

    base = dict(class_word="woman", steps=6, batch_size=4, seed=0, lr_lora=3e-3, lr_embed=2e-2, **FAST)
    base.update(kw)
    return TrainSettings(**base)


def run_training(model, clip, vae, images, s, **kw):
    from likeness.techniques.facea_net.training import train_identity

    with torch.inference_mode():  # as inside ComfyUI: every input is an inference tensor
        return train_identity(model, clip, vae, images, analyzer(), s, **kw)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models spend more time in thread hand-offs than in maths; one thread is faster on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def host_models(comfy_ready):
    import host_support

    return {"model": inpaint_model(), "clip": host_support.build_tiny_clip(), "vae": host_support.build_tiny_vae()}


@pytest.fixture(scope="module")
def photos():
    return reference_photos()


def fixed_eval_loss(trainer, seed: int = 123, repeats: int = 4) -> float:
    """The trainer's own masked loss on a fixed set of noise, timesteps and tasks (no update)."""
    from likeness.techniques.facea_net.lora import autograd_safe_weights
    from likeness.trainers.datasets import collate
    from likeness.trainers.loop import StepContext

    batch = collate(list(trainer.data) * 3)
    total = 0.0
    with torch.inference_mode(False), torch.no_grad(), trainer.lora.attached(trainer.unet), \
            autograd_safe_weights(trainer.unet):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(repeats):
            total += float(trainer.loss(batch, StepContext(0, 0, generator, {}))[0])
    return total / repeats


@pytest.fixture(scope="module")
def trained(host_models, photos):
    """One 60-step run on the 9-channel model (shared by the loss, LoRA and identity tests), in bf16 mixed
    precision (what "auto" picks on CPUs with bf16 units and on GPUs)."""
    from likeness.techniques.facea_net.training import IdentityTask, prepare_references, train_identity_task

    s = settings(steps=60, precision="bf16")
    with torch.inference_mode():
        refs = prepare_references(photos, analyzer(), s)
        trainer = IdentityTask(host_models["model"], host_models["clip"], host_models["vae"], refs, s,
                               analyzer=analyzer())
    initial_feats = {t: f.clone() for t, f in trainer.feats.items()}
    grad_flags = [p.requires_grad for p in trainer.unet.parameters()]
    initial_lora = trainer.lora.native_state_dict()
    before = fixed_eval_loss(trainer)
    with torch.inference_mode():
        output = train_identity_task(trainer)
    after = fixed_eval_loss(trainer)
    return {"output": output, "trainer": trainer, "before": before, "after": after,
            "initial_feats": initial_feats, "initial_lora": initial_lora, "grad_flags": grad_flags}


# ------------------------------------------------------------------------------------------ trainer

def test_masked_loss_falls_and_parameters_change(trained):
    losses = trained["output"].losses
    assert len(losses) == 60 and all(np.isfinite(losses))
    assert trained["after"] <= 0.7 * trained["before"], (trained["before"], trained["after"])
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last <= 0.7 * first, (first, last)
    identity = trained["output"].identity
    for task, initial in trained["initial_feats"].items():
        assert not torch.allclose(identity.feats[task], initial), task
    lora_after = trained["output"].lora_state
    ups = [k for k in lora_after if k.endswith("lora_up.weight")]
    assert all(float(trained["initial_lora"][k].abs().max()) == 0 for k in ups)
    assert sum(float(lora_after[k].abs().max()) > 0 for k in ups) == len(ups)
    downs = [k for k in lora_after if k.endswith("lora_down.weight")]
    assert any(not torch.equal(lora_after[k], trained["initial_lora"][k]) for k in downs)
    curve = trained["output"].result.loss_curve
    assert curve.ndim == 4 and curve.shape[-1] == 3


def test_previews_sample_like_the_stock_inpainting_nodes(trained):
    """A preview is what InpaintModelConditioning + KSampler (euler, normal) + VAEDecode give for the identity's face
    prompt with the LoRA on: ComfyUI's own sampler, not a separate one."""
    import nodes

    task = trained["trainer"]
    ref, s = task.refs[0], task.settings
    with torch.inference_mode(), task.session(), torch.no_grad():  # as the loop validates
        image, _score = task.preview(60)
        positive, negative = [[task.conditioning(["face"]), {}]], [[task.negative, {}]]
        mask = ref.masks["face"][None]
        positive, negative, latent = nodes.InpaintModelConditioning().encode(positive, negative, ref.crop[None],
                                                                            task.vae, mask, noise_mask=True)
        (sampled,) = nodes.common_ksampler(task.patcher, s.seed, s.preview_steps, s.preview_cfg, "euler", "normal",
                                           positive, negative, latent)
        expected = task.vae.decode(sampled["samples"])[0, ..., :3].clamp(0, 1)
    assert image.shape == ref.crop.shape and float(image.std()) > 0.01
    assert torch.allclose(image, expected, atol=1e-4), float((image - expected).abs().max())


def test_training_leaves_the_shared_model_untouched(trained, host_models):
    unet = host_models["model"].model.diffusion_model
    assert all("forward" not in m.__dict__ for m in unet.modules())
    assert [p.requires_grad for p in unet.parameters()] == trained["grad_flags"]
    assert all(p.grad is None for p in unet.parameters())  # the base model was frozen while training


def test_task_prompts_use_the_real_tokenizer_positions(host_models):
    from likeness.techniques.facea_net.prompt import encode_task_template

    clip = host_models["clip"]
    face = encode_task_template(clip, "woman", "face", 4)  # <bos> a woman face <eos> [feat] x 4
    assert face.positions == [5, 6, 7, 8] and face.cond.shape == (1, 77, 64)
    eye = encode_task_template(clip, "man", "left_eye", 3)  # <bos> a man left eye <eos> [feat] x 3
    assert eye.positions == [6, 7, 8]


def test_interrupted_and_resumed_training_equals_uninterrupted(host_models, photos, tmp_path):
    from likeness.trainers.loop import TrainingCancelled

    m, c, v = host_models["model"], host_models["clip"], host_models["vae"]
    full = run_training(m, c, v, photos, settings(steps=6, checkpoint_every=2), checkpoint_path=str(tmp_path / "a.st"))

    def stop_at_3(step, loss):
        if step == 3:
            raise TrainingCancelled()

    path = str(tmp_path / "b.st")
    with pytest.raises(TrainingCancelled):
        run_training(m, c, v, photos, settings(steps=6, checkpoint_every=2), checkpoint_path=path, step_callback=stop_at_3)
    resumed = run_training(m, c, v, photos, settings(steps=6, checkpoint_every=2), checkpoint_path=path,
                           resume="require")
    assert resumed.result.start_step == 2
    assert np.allclose(resumed.losses, full.losses, atol=1e-6, rtol=0)
    for key, value in full.lora_state.items():
        assert torch.allclose(resumed.lora_state[key], value, atol=1e-6, rtol=0), key
    for task, value in full.identity.feats.items():
        assert torch.allclose(resumed.identity.feats[task], value, atol=1e-6, rtol=0), task


def test_resume_policy_with_changed_settings(host_models, photos, tmp_path, caplog):
    """require: ResumeMismatchError naming the fields; auto: a new run and one warning; fresh: a new run."""
    from likeness.errors import ResumeMismatchError

    m, c, v = host_models["model"], host_models["clip"], host_models["vae"]
    path = str(tmp_path / "p.st")
    run_training(m, c, v, photos, settings(steps=2), checkpoint_path=path)
    changed = settings(steps=2, lr_lora=1e-3, seed=1)
    with pytest.raises(ResumeMismatchError) as caught:
        run_training(m, c, v, photos, changed, checkpoint_path=path, resume="require")
    assert caught.value.fields == ["lr_lora", "seed"] and "seed: checkpoint 0 vs now 1" in str(caught.value)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="likeness"):
        auto = run_training(m, c, v, photos, changed, checkpoint_path=path, resume="auto")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "likeness"]
    assert auto.result.start_step == 0 and len(warnings) == 1 and "lr_lora: checkpoint 0.003" in warnings[0]
    fresh = run_training(m, c, v, photos, settings(steps=3), checkpoint_path=path, resume="fresh")
    assert fresh.result.start_step == 0 and fresh.result.step == 3


KILL_SCRIPT = r"""
import os, signal, sys
sys.path[:0] = [{tests!r}, {root!r}]
import host_support
host_support.prepare_comfy({comfy!r})
from _bootstrap import load_pack
load_pack()
import test_facea_host as t
import likeness.safetensors_io as ckpt  # the atomic writer behind every checkpoint
calls = []
original = ckpt._write_safetensors
def dying_write(tensors, path, metadata):
    calls.append(path)
    if len(calls) == 2:  # the second checkpoint: half a file, then SIGKILL (no cleanup, no finally)
        with open(path, "wb") as f:
            f.write(b"\x00" * 4096)
            f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return original(tensors, path, metadata)
ckpt._write_safetensors = dying_write
import host_support as hs
model, clip, vae = t.inpaint_model(), hs.build_tiny_clip(), hs.build_tiny_vae()
t.run_training(model, clip, vae, t.reference_photos(), t.settings(steps=6, checkpoint_every=2), checkpoint_path={path!r})
print("not killed")
"""


def test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(host_models, photos, tmp_path, host_env):
    from likeness.trainers.checkpoint import load_training_state

    path = str(tmp_path / "kill.st")
    script = KILL_SCRIPT.format(tests=TESTS, root=ROOT, comfy=host_env.comfy_path, path=path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == -9, result.stdout + result.stderr[-3000:]
    state = load_training_state(path)  # the step-2 checkpoint, complete and readable
    assert state.step == 2 and len(state.losses) == 2
    resumed = run_training(host_models["model"], host_models["clip"], host_models["vae"], photos,
                           settings(steps=4, checkpoint_every=2), checkpoint_path=path, resume="require")
    assert resumed.result.start_step == 2 and resumed.result.step == 4


def test_gradient_checkpointing_gives_the_same_training(host_models, photos, monkeypatch):
    import torch.utils.checkpoint

    m, c, v = host_models["model"], host_models["clip"], host_models["vae"]
    plain = run_training(m, c, v, photos[:2], settings(steps=2))
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    checkpointed = run_training(m, c, v, photos[:2], settings(steps=2, gradient_checkpointing=True))
    assert len(calls) >= 2 * 25  # every ResBlock / transformer / resampler of the UNet, every step
    assert np.allclose(plain.losses, checkpointed.losses, atol=1e-5)
    for key, value in plain.lora_state.items():
        assert torch.allclose(checkpointed.lora_state[key], value, atol=1e-5), key
    unet = m.model.diffusion_model
    assert all("forward" not in b.__dict__ for b in unet.modules())


def test_mixed_precision_computes_in_bf16_and_keeps_the_identity_fp32(trained, host_models, photos):
    output = trained["output"]
    assert output.identity.metadata["precision"] == "bf16"
    assert all(t.dtype == torch.float32 for t in output.lora_state.values())
    assert all(f.dtype == torch.float32 for f in output.identity.feats.values())
    unet = host_models["model"].model.diffusion_model
    assert all(p.dtype == torch.float32 for p in unet.parameters())  # the shared model is not cast

    seen = []
    probe = next(m for n, m in unet.named_modules() if n.endswith("attn1.to_q"))
    handle = probe.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    try:
        m, c, v = host_models["model"], host_models["clip"], host_models["vae"]
        run_training(m, c, v, photos[:2], settings(steps=1, precision="fp32"))
        run_training(m, c, v, photos[:2], settings(steps=1, precision="bf16"))
    finally:
        handle.remove()
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16


def test_cpu_training_hands_freed_memory_back_after_every_layer(host_models, photos, monkeypatch):
    import likeness.trainers.memory as memory

    calls = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: calls.append(1) or True)
    m, c, v = host_models["model"], host_models["clip"], host_models["vae"]
    run_training(m, c, v, photos[:2], settings(steps=2, gradient_checkpointing=True))
    assert len(calls) >= 2 * 2 * 20  # every checkpointed layer, forward and backward, every step


def test_four_channel_model_trains_with_a_noise_mask(photos, comfy_ready):
    import host_support

    model = inpaint_model(in_channels=4)
    out = run_training(model, host_support.build_tiny_clip(), host_support.build_tiny_vae(), photos[:1],
                       settings(steps=3))
    assert out.identity.metadata["in_channels"] == 4
    assert any(float(v.abs().max()) > 0 for k, v in out.lora_state.items() if k.endswith("lora_up.weight"))


# ------------------------------------------------------------------------------------------ LoRA + identity files

def test_lora_file_loads_through_the_stock_lora_loader(trained, host_env, comfy_ready):
    import nodes
    from safetensors.torch import save_file

    from likeness.techniques.facea_net.lora import native_keys_are_attention_only

    state = trained["output"].lora_state
    assert native_keys_are_attention_only(state)
    assert len(state) == 16 * 2 * 4 * 3  # 16 transformer blocks x attn1/attn2 x q/k/v/out x up/down/alpha
    folder = os.path.join(host_env.models, "loras", "likeness")
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "facea_test.safetensors"))
    fresh = inpaint_model()  # same base weights, a new ModelPatcher
    loaded = nodes.LoraLoaderModelOnly().load_lora_model_only(fresh, "likeness/facea_test.safetensors", 1.0)[0]
    patched_keys = [k for k in loaded.patches if loaded.patches[k]]
    assert len(patched_keys) == 128 and all(".attn" in k for k in patched_keys)

    import comfy.model_management

    g = torch.Generator().manual_seed(5)
    x, sigma = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([3.0])
    c_concat = torch.randn(1, 5, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 64, generator=g)
    outputs = {}
    for name, patcher in (("fresh", fresh), ("lora", loaded)):
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        with torch.no_grad():
            outputs[name] = patcher.model.apply_model(x, sigma, c_concat=c_concat, c_crossattn=ctx)
    comfy.model_management.unload_all_models()
    assert (outputs["fresh"] - outputs["lora"]).abs().max() > 1e-3
    # the stock loader reproduces the function the trainer learned (activation-side adapters)
    trainer = trained["trainer"]
    comfy.model_management.load_models_gpu([fresh], force_full_load=True)
    with torch.no_grad(), trainer.lora.attached(fresh.model.diffusion_model):
        ours = fresh.model.apply_model(x, sigma, c_concat=c_concat, c_crossattn=ctx)
    comfy.model_management.unload_all_models()
    assert torch.allclose(ours, outputs["lora"], atol=1e-4)


def test_identity_file_round_trips_after_training(trained, tmp_path, host_models):
    from likeness.techniques.facea_net.identity import load_identity, save_identity
    from likeness.techniques.facea_net.prompt import build_identity_conditioning

    identity = trained["output"].identity
    identity.lora_name = "likeness/facea_test.safetensors"
    back = load_identity(save_identity(identity, str(tmp_path / "anna.safetensors")))
    assert back.class_word == "woman" and back.lora_name == identity.lora_name
    assert back.metadata["rank"] == 48 and back.metadata["in_channels"] == 9
    for task in identity.feats:
        assert torch.equal(back.feats[task], identity.feats[task])
    clip = host_models["clip"]
    a = build_identity_conditioning(clip, identity, "a smiling face")[0][0]
    b = build_identity_conditioning(clip, back, "a smiling face")[0][0]
    assert a.shape == (1, 77 * 6, 64) and torch.equal(a, b)


# ------------------------------------------------------------------------------------------ inpaint chain

def synthetic_identity(name: str, model, seed: int, rank: int = 4):
    """An identity with random [feat] vectors and a random LoRA for the tiny model (no training needed)."""
    from likeness.techniques.facea_net.identity import TASKS, Identity
    from likeness.techniques.facea_net.lora import IdentityLoRA

    g = torch.Generator().manual_seed(seed)
    adapters = IdentityLoRA.for_model(model.model.diffusion_model, rank=rank, seed=seed)
    with torch.no_grad():
        for _, a in adapters.items():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.2)
    feats = {t: torch.randn(4, 64, generator=g) for t in TASKS}
    return Identity(feats=feats, class_word="person", name=name, lora=adapters.native_state_dict(),
                    metadata={"rank": rank})


def scene_t1(scale: float = 1.0) -> torch.Tensor:
    import torch.nn.functional as F

    from face_fixtures import insightface_t1

    image = torch.from_numpy(insightface_t1()).float().div(255).permute(2, 0, 1)[None]
    size = (int(image.shape[2] * scale), int(image.shape[3] * scale))
    return F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False).permute(0, 2, 3, 1)


def inpaint_settings(**kw):
    from likeness.techniques.facea_net.pipeline import InpaintSettings

    base = dict(steps=2, working_size=WORKING, grow=2, feather=4, cfg=2.0, sampler_name="euler")
    base.update(kw)
    return InpaintSettings(**base)


def test_two_faces_get_their_own_identities_and_the_rest_is_unchanged(comfy_ready, host_models, monkeypatch):
    import host_support
    from likeness.techniques.facea_net import pipeline

    model = host_support.build_tiny_sd15(in_channels=9)
    anna, ben = synthetic_identity("anna", model, 1), synthetic_identity("ben", model, 2)
    used = []
    original = pipeline.build_identity_conditioning
    monkeypatch.setattr(pipeline, "build_identity_conditioning",
                        lambda clip, identity, text, **kw: used.append(identity.name) or original(clip, identity, text, **kw))
    image = scene_t1()
    with torch.inference_mode():
        out, mask, notes = pipeline.inpaint_faces(model, host_models["clip"], host_models["vae"], image, analyzer(),
                                                  [anna, ben], inpaint_settings(selection="all"))
    assert used == ["anna", "ben"]
    (note,) = notes   # the faces beyond the two identities are reported, not silently skipped
    assert note.startswith("image 0: face(s) [2, 3") and "got no identity and were left unchanged" in note
    assert out.shape == image.shape and mask.shape == image.shape[:3]
    outside = mask < 1.0 / 255
    assert (out - image).abs()[outside].max() <= 1.0 / 255
    from likeness.face_analysis.analyze import analyze

    faces = analyze(analyzer(), image, selection="all", embed=False).faces.faces[0]  # left to right
    assert len(faces) >= 4

    def changed(face):
        x1, y1, x2, y2 = (int(v) for v in face.bbox)
        return float((out - image)[0, y1:y2, x1:x2].abs().mean())

    assert changed(faces[0]) > 0.02 and changed(faces[1]) > 0.02
    assert all(changed(f) == 0.0 for f in faces[2:])  # beyond the number of identities: untouched


def test_one_identity_redraws_every_selected_face(comfy_ready, host_models, monkeypatch):
    import host_support
    from likeness.techniques.facea_net import pipeline

    model = host_support.build_tiny_sd15(in_channels=9)
    anna = synthetic_identity("anna", model, 1)
    calls = []
    original = pipeline.sample_inpaint
    monkeypatch.setattr(pipeline, "sample_inpaint", lambda *a, **k: calls.append(1) or original(*a, **k))
    image = scene_t1()
    with torch.inference_mode():
        out, mask, _ = pipeline.inpaint_faces(model, host_models["clip"], host_models["vae"], image, analyzer(),
                                              [anna], inpaint_settings(selection="all"))
    assert len(calls) == 6  # t1 has six faces
    assert (out - image).abs()[mask < 1.0 / 255].max() <= 1.0 / 255


def test_an_image_without_a_face_passes_through_or_errors(comfy_ready, host_models, caplog):
    import host_support
    from likeness.errors import NoFaceError
    from likeness.techniques.facea_net import pipeline

    model = host_support.build_tiny_sd15(in_channels=9)
    anna = synthetic_identity("anna", model, 1)
    ramp = torch.linspace(0, 1, 192)
    image = torch.stack([ramp[None, :].expand(128, -1)] * 3, dim=-1)[None].contiguous()
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="likeness"):
        out, mask, notes = pipeline.inpaint_faces(model, host_models["clip"], host_models["vae"], image, analyzer(),
                                                  [anna], inpaint_settings())
    assert torch.equal(out, image) and float(mask.max()) == 0.0
    assert notes and "no face" in notes[0] and "no face" in caplog.text
    with pytest.raises(NoFaceError, match="pass_through"), torch.inference_mode():
        pipeline.inpaint_faces(model, host_models["clip"], host_models["vae"], image, analyzer(), [anna],
                               inpaint_settings(on_no_face="error"))


# ------------------------------------------------------------------------------------------ example workflows

WORKFLOWS = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "example_workflows"))
                   if f.startswith("FaceA-Net - ") and f.endswith(".json"))


def tiny_models(name: str, channels: int):
    """Tiny stand-ins of a checkpoint: SDXL (tiny SDXL UNet and two-tower text encoder) for an SDXL file name,
    else SD1.5; ``channels`` 9 is the inpainting UNet."""
    import host_support

    if "sdxl" in name or "sd_xl" in name:
        from host_support import TINY_SDXL_POOLED_DIM, build_tiny_sdxl_clip

        return (host_support.build_tiny_sdxl(in_channels=channels), build_tiny_sdxl_clip(pooled_dim=TINY_SDXL_POOLED_DIM),
                host_support.build_tiny_vae())
    return (host_support.build_tiny_sd15(in_channels=channels), host_support.build_tiny_clip(),
            host_support.build_tiny_vae())


class TinyUNetLoader:
    """Stands in for UNETLoader (the SDXL examples' inpainting UNet): the tiny 9-channel SDXL UNet."""

    DESCRIPTION = "Test only"
    CATEGORY = "Likeness/Tests"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": ("STRING", {"default": "", "tooltip": "diffusion model name"}),
                             "weight_dtype": ("STRING", {"default": "default", "tooltip": "ignored"})}}

    def load(self, unet_name, weight_dtype):
        return tiny_models(unet_name, 9 if "inpaint" in unet_name else 4)[:1]


class TinyCheckpointLoader:
    """Stands in for CheckpointLoaderSimple: inpainting checkpoints give a 9-channel tiny UNet, SDXL ones SDXL."""

    DESCRIPTION = "Test only"
    CATEGORY = "Likeness/Tests"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": "", "tooltip": "checkpoint name"})}}

    def load(self, ckpt_name):
        return tiny_models(ckpt_name, 9 if "inpaint" in ckpt_name else 4)


@pytest.fixture(scope="module")
def workflow_env(pack_loaded, host_env):
    """Input photos and two identities (anna, ben) with LoRAs in the host's model folders."""
    from PIL import Image

    import host_support
    from likeness.techniques.facea_net.identity import save_identity
    from likeness.trainers.checkpoint import atomic_save

    photos = (reference_photos().numpy() * 255).round().astype(np.uint8)
    for i, name in enumerate(["anna_1.png", "anna_2.png", "anna_3.png", "ben_1.png", "ben_2.png"]):
        Image.fromarray(photos[i % 3]).save(os.path.join(host_env.input, name))
    Image.fromarray((scene_t1()[0].numpy() * 255).round().astype(np.uint8)).save(
        os.path.join(host_env.input, "scene.png"))
    model = host_support.build_tiny_sd15(in_channels=9)
    for seed, name in ((1, "anna"), (2, "ben")):
        identity = synthetic_identity(name, model, seed)
        identity.lora_name = f"likeness/{name}.safetensors"
        atomic_save(identity.lora, os.path.join(host_env.models, "loras", "likeness", f"{name}.safetensors"))
        save_identity(identity, os.path.join(host_env.models, "likeness", "identities", f"{name}.safetensors"))
    sdxl_identity = synthetic_identity("anna_sdxl", host_support.build_tiny_sdxl(in_channels=9), 3)
    sdxl_identity.lora_name = "likeness/anna_sdxl.safetensors"   # what the SDXL train example writes
    atomic_save(sdxl_identity.lora, os.path.join(host_env.models, "loras", "likeness", "anna_sdxl.safetensors"))
    save_identity(sdxl_identity, os.path.join(host_env.models, "likeness", "identities", "anna_sdxl.safetensors"))
    return host_env


TEST_LOADERS = {"CheckpointLoaderSimple": "LikenessTestFaceACheckpoint", "UNETLoader": "LikenessTestFaceAUNet"}


def tiny_overrides(prompt: dict) -> dict:
    """Shrink a workflow for the tiny models: test loaders (SD1.5 or SDXL), few steps, small sizes, the t1 scene."""
    prompt = json.loads(json.dumps(prompt))
    for node in list(prompt.values()):
        inputs, kind = node["inputs"], node["class_type"]
        node["class_type"] = TEST_LOADERS.get(kind, kind)
        if kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 2
        elif kind == "ImageScale":
            inputs.update(width=256, height=256)
        elif kind in ("LikenessFaceATrainIdentity", "LikenessFaceAAttributeTransfer"):
            inputs.update(steps=3, working_size=WORKING, lr_lora=3e-3)
            if "preview_every" in inputs:
                inputs.update(checkpoint_every=0, resume="fresh")
        elif kind in ("LikenessFaceAInpaint", "LikenessFaceACrop"):
            inputs.update(working_size=WORKING, grow=2, feather=4)
            if "steps" in inputs:
                inputs.update(steps=2)
        if kind == "LikenessFaceAInpaint" and isinstance(inputs.get("image"), list):
            source = prompt[inputs["image"][0]]["class_type"]
            if source == "VAEDecode":  # a tiny random model draws no face: inpaint the t1 photo instead
                prompt["scene_photo"] = {"class_type": "LoadImage", "inputs": {"image": "scene.png"}}
                inputs["image"] = ["scene_photo", 0]
    return prompt


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_workflow_runs_on_tiny_models(name, workflow_env, execute_prompt, monkeypatch):
    import nodes

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "LikenessTestFaceACheckpoint", TinyCheckpointLoader)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "LikenessTestFaceAUNet", TinyUNetLoader)
    from host_support import example_prompt

    outputs = execute_prompt(tiny_overrides(example_prompt(name)))
    saved = [img for out in outputs.values() for img in out.get("images", [])]
    assert saved, outputs
    if name == "FaceA-Net - train an identity":
        assert os.path.isfile(os.path.join(workflow_env.models, "likeness", "identities", "anna.safetensors"))
        assert os.path.isfile(os.path.join(workflow_env.models, "loras", "likeness", "anna.safetensors"))
    if name == "FaceA-Net - train an identity (SDXL)":
        from likeness.techniques.facea_net.identity import load_identity

        path = os.path.join(workflow_env.models, "likeness", "identities", "anna_sdxl.safetensors")
        assert load_identity(path).family == "sdxl"   # trained now (the stand-in written above records no base)
        assert os.path.isfile(os.path.join(workflow_env.models, "loras", "likeness", "anna_sdxl.safetensors"))
    if name == "FaceA-Net - attribute transfer (nose)":
        assert os.path.isfile(os.path.join(workflow_env.models, "likeness", "identities",
                                           "anna_with_bens_nose.safetensors"))
