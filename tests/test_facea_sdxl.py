"""FaceA-Net on SDXL, on the real host: the identity trainer and Face Inpaint on a tiny SDXL inpainting-shaped
UNet (9 input channels, ``y`` from pooled text and size conds) with a tiny two-tower SDXL text encoder.

The whole chain stays in SDXL: train an identity (loss falls, resumes bit-identically, the forward gets the
task prompts' pooled ``y``), inpaint a photo's face with it; LoRA strength 0 is the unpatched model; an
identity of the other family is refused naming both.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.host

WORKING = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sdxl_models(comfy_ready):
    import host_support
    from host_support import TINY_SDXL_POOLED_DIM, build_tiny_sdxl_clip
    from test_facea_host import well_conditioned

    model = well_conditioned(host_support.build_tiny_sdxl(in_channels=9, cached=False))
    return {"model": model, "clip": build_tiny_sdxl_clip(pooled_dim=TINY_SDXL_POOLED_DIM), "vae": host_support.build_tiny_vae()}


@pytest.fixture(scope="module")
def photos():
    from test_facea_host import reference_photos

    return reference_photos()


def _settings(**kw):
    from likeness.techniques.facea_net.training import TrainSettings

    base = dict(class_word="woman", steps=6, batch_size=4, seed=0, lr_lora=3e-3, lr_embed=2e-2,
                working_size=WORKING, final_preview=False, checkpoint_every=0)
    base.update(kw)
    return TrainSettings(**base)


def _task(models, photos, s):
    from likeness.techniques.facea_net.training import IdentityTask, prepare_references
    from test_facea_host import analyzer

    with torch.inference_mode():
        refs = prepare_references(photos, analyzer(), s)
        return IdentityTask(models["model"], models["clip"], models["vae"], refs, s, analyzer=analyzer())


@pytest.fixture(scope="module")
def trained(sdxl_models, photos):
    from likeness.techniques.facea_net.training import train_identity_task
    from test_facea_host import fixed_eval_loss

    task = _task(sdxl_models, photos, _settings(steps=40, final_preview=True))
    before = fixed_eval_loss(task)
    with torch.inference_mode():
        output = train_identity_task(task)
    return {"task": task, "output": output, "before": before, "after": fixed_eval_loss(task)}


def test_the_sdxl_model_is_an_inpainting_model_with_y(sdxl_models):
    base = sdxl_models["model"].model
    assert base.diffusion_model.in_channels == 9 and base.adm_channels == 2816 and base.concat_keys


def test_forward_gets_each_task_prompts_pooled_y(sdxl_models, photos):
    from likeness.host.adm import adm_vector
    from likeness.trainers.datasets import collate
    from likeness.trainers.loop import StepContext

    task = _task(sdxl_models, photos, _settings())
    seen = []
    handle = task.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("y")),
                                                 with_kwargs=True)
    try:
        with torch.inference_mode(False), torch.no_grad(), task.session():
            _, info = task.loss(collate(list(task.data)[:3] + list(task.data)[:1]), StepContext(
                0, 0, torch.Generator().manual_seed(0), {}))
    finally:
        handle.remove()
    pooled = torch.cat([task.templates[t].pooled for t in info["tasks"]])
    expected = adm_vector(task.base_model, pooled, WORKING, WORKING)
    (y,) = seen
    assert y.shape == (4, 2816) and torch.equal(y, expected)
    assert len(set(info["tasks"])) > 1 and not torch.equal(y[0], y[-1])   # global and local rows differ


def test_loss_falls_and_the_identity_records_sdxl(trained):
    output = trained["output"]
    assert trained["after"] <= 0.8 * trained["before"], (trained["before"], trained["after"])
    assert all(np.isfinite(output.losses))
    identity = output.identity
    assert identity.metadata["base"] == "sdxl" and identity.family == "sdxl"
    assert identity.embed_dim == 64 and output.previews and output.previews[0][1].shape == (WORKING, WORKING, 3)


def test_interrupted_and_resumed_training_equals_uninterrupted(sdxl_models, photos, tmp_path):
    from likeness.techniques.facea_net.training import train_identity
    from likeness.trainers.loop import TrainingCancelled
    from test_facea_host import analyzer

    s = _settings(steps=6, checkpoint_every=2)
    m, c, v = sdxl_models["model"], sdxl_models["clip"], sdxl_models["vae"]

    def run(path, **kw):
        with torch.inference_mode():
            return train_identity(m, c, v, photos, analyzer(), s, checkpoint_path=str(path), **kw)

    def stop_at_3(step, loss):
        if step == 3:
            raise TrainingCancelled()

    full = run(tmp_path / "a.st")
    with pytest.raises(TrainingCancelled):
        run(tmp_path / "b.st", step_callback=stop_at_3)
    resumed = run(tmp_path / "b.st", resume="require")
    assert resumed.result.start_step == 2 and resumed.losses == full.losses
    for key, value in full.lora_state.items():
        assert torch.equal(resumed.lora_state[key], value), key
    for task, value in full.identity.feats.items():
        assert torch.equal(resumed.identity.feats[task], value), task


def _inpaint(models, identity, **kw):
    from likeness.techniques.facea_net.pipeline import InpaintSettings, inpaint_faces
    from test_facea_host import analyzer, reference_photos

    settings = InpaintSettings(**{**dict(steps=2, working_size=WORKING, grow=2, feather=4, cfg=2.0,
                                         sampler_name="euler"), **kw})
    image = reference_photos()[:1]
    with torch.inference_mode():
        out, mask, _ = inpaint_faces(models["model"], models["clip"], models["vae"], image, analyzer(), [identity],
                                     settings)
    return image, out, mask


def test_face_inpaint_with_the_trained_identity(trained, sdxl_models):
    identity = trained["output"].identity
    image, out, mask = _inpaint(sdxl_models, identity)
    assert out.shape == image.shape and float(mask.max()) == 1.0
    assert (out - image).abs()[mask < 1.0 / 255].max() <= 1.0 / 255         # outside the face: untouched
    assert float((out - image).abs()[mask > 0.99].mean()) > 0.01             # the face: redrawn
    _, without_lora, _ = _inpaint(sdxl_models, identity, lora_strength=0.0)
    assert not torch.equal(out, without_lora)                                # the LoRA takes part


def test_lora_strength_zero_is_the_unpatched_model(trained, sdxl_models):
    """Strength 0 inpaints exactly as the bare model with the identity's prompt."""
    from likeness.techniques.facea_net import pipeline

    identity = trained["output"].identity
    calls = []
    original = pipeline.sample_inpaint
    pipeline.sample_inpaint = lambda model, *a, **k: calls.append(model) or original(model, *a, **k)
    try:
        _, zero, _ = _inpaint(sdxl_models, identity, lora_strength=0.0)
    finally:
        pipeline.sample_inpaint = original
    assert calls and all(model is sdxl_models["model"] for model in calls)
    bare = identity.detached()
    bare.lora, bare.lora_name = None, ""
    _, unpatched, _ = _inpaint(sdxl_models, bare)
    assert torch.equal(zero, unpatched)


def test_identity_of_the_other_family_is_refused_naming_both(trained, sdxl_models):
    import host_support
    from likeness.errors import IncompatibleEmbedsError
    from likeness.techniques.facea_net.identity import Identity
    from likeness.techniques.facea_net.lora import check_identity_fits

    sdxl_identity = trained["output"].identity
    sd15_identity = Identity(feats={"face": torch.zeros(4, 64)}, name="anna", metadata={"base": "sd15"})
    sd15_model = host_support.build_tiny_sd15(in_channels=9)
    for identity, model, trained_on, given in ((sd15_identity, sdxl_models["model"], "SD1.5", "SDXL"),
                                               (sdxl_identity, sd15_model, "SDXL", "SD1.5")):
        with pytest.raises(IncompatibleEmbedsError) as caught:
            check_identity_fits(identity, model)
        assert f"trained on {trained_on}" in str(caught.value) and f"the model is {given}" in str(caught.value)
    with pytest.raises(IncompatibleEmbedsError, match="trained on SD1.5"):
        _inpaint(sdxl_models, sd15_identity)
    legacy = Identity(feats={"face": torch.zeros(4, 2048)})            # an older file without "base": its width
    assert legacy.family == "sdxl"
    from likeness.techniques.facea_net.prompt import build_identity_conditioning

    with pytest.raises(IncompatibleEmbedsError, match="trained on SDXL .*2048 wide.* text encoder is .*64 wide"):
        build_identity_conditioning(host_support.build_tiny_clip(), legacy, "a photo")
