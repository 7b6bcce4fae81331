"""Face Fusion trainer on the real host: tiny SD1.5 + real face photos, everything under inference mode.

The tiny UNet here is built INSIDE ``torch.inference_mode()`` (as a ComfyUI loader node makes it), so
every weight is an inference tensor and the trainer has to escape inference mode correctly. It is
initialised with fan-in scaled weights: with host_support's default N(0, 0.02) the 24-layer random UNet
passes almost no signal, its output is ~0 whatever the adapter does and no parameter subset can learn.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.host
logger = logging.getLogger(__name__)

LEARN = dict(steps=40, lr=3e-2, batch_size=2, seed=0, checkpoint_every=0, resolution=64, reference_size=128,
             face_weight=2.0)


@pytest.fixture(scope="module")
def one_thread():
    """The 2 shared cores are oversubscribed by parallel jobs; 2 torch threads then run ~10x slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def face_photos():
    """(name, image [H, W, 3], caption): skimage's astronaut and the six faces of insightface's t1.jpg."""
    from face_fixtures import astronaut, insightface_t1
    from likeness.face_analysis.analyze import analyze

    sources = [("astronaut", torch.from_numpy(astronaut()).float() / 255, "a photo of a woman astronaut")]
    group = torch.from_numpy(insightface_t1()).float() / 255
    found = analyze(dlib_analyzer(), group[None], selection="largest", on_no_face="pass_through", embed=False)
    height, width = group.shape[:2]
    for i, face in enumerate(found.detections[0]):
        x1, y1, x2, y2 = (float(v) for v in face.bbox)
        cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * 0.8
        top, left = int(max(0, cy - half)), int(max(0, cx - half))
        crop = group[top:int(min(height, cy + half)), left:int(min(width, cx + half))]
        sources.append((f"t1_face{i}", crop, "a photo of a person"))
    return sources


def dlib_analyzer():
    pytest.importorskip("dlib")
    from likeness.face_analysis.analyzers.dlib_backend import load_dlib

    return load_dlib("HOG", "5")


@pytest.fixture(scope="module")
def fusion_setup(comfy_ready, one_thread):
    import comfy.supported_models

    import host_support
    from likeness.techniques.face_fusion import training as T

    analyzer = dlib_analyzer()
    sources = face_photos()
    settings = T.FusionTrainSettings(**LEARN)
    with torch.inference_mode():
        model = host_support._patcher(comfy.supported_models.SD15, host_support.sd15_unet_config(), 3)
        host_support.init_weights(model.model.diffusion_model, 3, fan_in_gain=1.0)
        vae, clip = host_support.build_tiny_vae(), host_support.build_tiny_clip()
        examples = T.prepare_examples(sources, settings, analyzer)
        data = T.encode_examples(model, vae, clip, examples, settings)
    assert next(model.model.diffusion_model.parameters()).is_inference()
    return dict(model=model, vae=vae, clip=clip, examples=examples, data=data, settings=settings,
                sources=sources, analyzer=analyzer)


def _settings(**kw):
    from likeness.techniques.face_fusion.training import FusionTrainSettings

    return FusionTrainSettings(**{**LEARN, **kw})


def test_references_are_aligned_face_crops(fusion_setup):
    examples = fusion_setup["examples"]
    assert len(examples) == 7 and all(examples.aligned), examples.names
    assert examples.references.shape == (7, 128, 128, 3) and examples.targets.shape == (7, 64, 64, 3)
    masks = examples.face_masks
    assert float(masks.amax(dim=(1, 2)).min()) == 1.0 and float(masks.mean()) < 0.7  # a face region, not everything
    assert fusion_setup["data"].weights is not None


def test_loss_falls_by_30_percent(fusion_setup):
    from likeness.techniques.face_fusion import training as T
    from likeness.techniques.face_fusion.adapter import FusionAdapter

    model, data, settings = fusion_setup["model"], fusion_setup["data"], fusion_setup["settings"]
    frozen_before = [p.detach().clone() for p in list(model.model.diffusion_model.parameters())[:20]]
    with torch.inference_mode():
        initial = FusionAdapter.from_model(model)
        before = T.evaluate_loss(model, initial, data, settings, rounds=3)
        adapter, result = T.train_on_data(model, data, settings)
        after = T.evaluate_loss(model, adapter, data, settings, rounds=3)
    first, last = float(np.mean(result.losses[:5])), float(np.mean(result.losses[-5:]))
    logger.info(f"held-out loss {before:.4f} -> {after:.4f} ({1 - after / before:.1%}); curve {first:.3f} -> {last:.3f}")
    assert after <= 0.7 * before
    assert last < first
    assert after < 1.0  # below the "predict zero" floor: the adapter learned to denoise, not just to shrink output
    for a, b in zip(frozen_before, list(model.model.diffusion_model.parameters())[:20], strict=True):
        assert torch.equal(a, b)  # the UNet stays frozen
    assert result.loss_curve.shape[0] == 1 and result.loss_curve.shape[-1] == 3
    assert all(not p.is_inference() and not p.requires_grad for p in adapter.parameters())


def test_interrupted_and_resumed_equals_uninterrupted(fusion_setup, tmp_path):
    from likeness.techniques.face_fusion import training as T
    from trainer_support import straight_and_resumed

    settings = _settings(steps=8, checkpoint_every=3, grad_accumulation=2, caption_dropout=0.3)
    full, full_result, resumed, resumed_result, checkpointed = straight_and_resumed(
        T.train_on_data, fusion_setup["model"], fusion_setup["data"], settings, str(tmp_path), cancel_step=5)
    assert checkpointed == 3
    assert resumed_result.start_step == 3 and resumed_result.step == 8
    assert resumed_result.losses == full_result.losses
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)   # bit-exact: the same data order, noise and optimizer state after the resume


def test_resume_policy_with_changed_settings(fusion_setup, tmp_path, caplog):
    """require: ResumeMismatchError naming the fields; auto: a new run and one warning; fresh: a new run."""
    from likeness.errors import ResumeMismatchError
    from likeness.techniques.face_fusion import training as T

    model, data = fusion_setup["model"], fusion_setup["data"]
    path = str(tmp_path / "p.safetensors")
    changed = _settings(steps=2, lr=1e-3, reference_noise="clean")
    with torch.inference_mode():
        T.train_on_data(model, data, _settings(steps=2), checkpoint_path=path)
        with pytest.raises(ResumeMismatchError) as caught:
            T.train_on_data(model, data, changed, checkpoint_path=path, resume="require")
        assert caught.value.fields == ["lr", "reference_noise"]
        assert "lr: checkpoint 0.03 vs now 0.001" in str(caught.value)
        caplog.clear()
        with caplog.at_level("INFO", logger="likeness"):
            _, auto = T.train_on_data(model, data, changed, checkpoint_path=path, resume="auto")
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "likeness"]
        assert auto.start_step == 0 and len(warnings) == 1 and "reference_noise: checkpoint 'same_sigma'" in warnings[0]
        _, fresh = T.train_on_data(model, data, _settings(steps=3), checkpoint_path=path, resume="fresh")
    assert fresh.start_step == 0 and fresh.step == 3


def test_host_cancel_keeps_last_checkpoint(fusion_setup, tmp_path):
    """Cancel the ComfyUI way: the interrupt flag (checked between micro-steps) and the progress hook."""
    import comfy.model_management as mm
    import comfy.utils

    from likeness.techniques.face_fusion import training as T
    from likeness.trainers import checkpoint as ckpt

    model, data = fusion_setup["model"], fusion_setup["data"]
    settings = _settings(steps=6, checkpoint_every=2)
    path = str(tmp_path / "c.safetensors")

    def press_cancel(step, loss):
        if step == 3:
            mm.interrupt_current_processing(True)

    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            T.train_on_data(model, data, settings, checkpoint_path=path, step_callback=press_cancel)
    finally:
        mm.interrupt_current_processing(False)
    assert ckpt.load_training_state(path).step == 2

    def hook(value, total, preview, node_id=None):  # what main.py installs: raises when cancel was pressed
        if value == 5:
            raise mm.InterruptProcessingException()

    previous_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            T.train_on_data(model, data, settings, checkpoint_path=path, resume="require")
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)
    assert ckpt.load_training_state(path).step == 4
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors"]


def _sample(model, seed=5):
    import comfy.sample

    import host_support

    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 3, 4.0, "euler", "normal", host_support.conditioning(seed=1),
                               host_support.conditioning(seed=2), latent, seed=seed)


def test_trained_adapter_round_trips_and_changes_output(fusion_setup, tmp_path):
    from likeness.techniques.face_fusion import training as T
    from likeness.techniques.face_fusion.adapter import FusionAdapter, load_fusion_adapter
    from likeness.techniques.face_fusion.apply import FusionIdentityLatents, apply_face_fusion

    model, data = fusion_setup["model"], fusion_setup["data"]
    with torch.inference_mode():
        adapter, _ = T.train_on_data(model, data, _settings(steps=6))
        path = T.save_trained_adapter(adapter, str(tmp_path / "me.safetensors"))
        loaded = load_fusion_adapter(path)
        assert loaded.metadata["trained_steps"] == "6" and loaded.metadata["format"] == "likeness.face_fusion"
        for (name, a), (_, b) in zip(adapter.named_parameters(), loaded.named_parameters(), strict=True):
            assert torch.equal(a, b), name
        reference = [FusionIdentityLatents(data.references[:1])]
        plain = _sample(model)
        untrained = _sample(apply_face_fusion(model, FusionAdapter.from_model(model), reference))
        trained = _sample(apply_face_fusion(model, loaded, reference))
    assert float((trained - plain).abs().max()) > 1e-3
    assert float((trained - untrained).abs().max()) > 1e-3


def test_centre_crop_fallback_without_analyzer(fusion_setup, caplog):
    from likeness.techniques.face_fusion import training as T

    with caplog.at_level("WARNING", logger="likeness"):
        examples = T.prepare_examples(fusion_setup["sources"][:2], _settings(), analyzer=None)
    assert not any(examples.aligned) and float(examples.face_masks.max()) == 0.0
    assert "without a face analyzer" in caplog.text


def test_train_node_workflow(execute_prompt, host_test_nodes, host_env, fusion_setup):
    """The shipped training workflow, with the tiny model, a folder of real face photos and 3 steps."""
    from PIL import Image

    import host_support
    from likeness.techniques.face_fusion.adapter import load_fusion_adapter

    folder = os.path.join(host_env.input, "likeness_faces")
    os.makedirs(folder, exist_ok=True)
    for name, image, caption in fusion_setup["sources"][:3]:
        Image.fromarray((image.numpy() * 255).round().astype(np.uint8)).save(os.path.join(folder, name + ".png"))
        with open(os.path.join(folder, name + ".txt"), "w") as handle:
            handle.write(caption)
    Image.fromarray((fusion_setup["sources"][0][1].numpy() * 255).astype(np.uint8)).save(
        os.path.join(host_env.input, "likeness_train_reference.png"))
    prompt = host_support.example_prompt("Face Fusion - train an adapter")
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node.update(class_type="LikenessTestTinySD15Loader", inputs={"seed": 0})
        elif kind == "LikenessDlibFaceLoader":
            inputs["landmarks"] = "5"
        elif kind == "LikenessTrainFaceFusion":
            inputs.update(steps=3, resolution=64, grad_accumulation=1, checkpoint_every=2, name="workflow_face")
        elif kind == "LoadImage":
            inputs["image"] = "likeness_train_reference.png"
        elif kind == "LikenessApplyFaceFusion":
            inputs["reference_size"] = 64
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs.update(steps=2, sampler_name="euler", scheduler="normal")
    outputs = execute_prompt(prompt)
    assert outputs["4"]["images"]  # loss curve preview
    assert outputs["14"]["images"]
    adapter = load_fusion_adapter(os.path.join(host_env.models, "likeness", "fusion", "workflow_face.safetensors"))
    assert adapter.metadata["trained_steps"] == "3" and adapter.metadata["images"] == "3"
    assert os.path.isfile(os.path.join(host_env.models, "likeness", "training", "fusion", "workflow_face.safetensors"))
