"""Face Fusion on SDXL, on the real host: a tiny SDXL-shaped UNet (no attention at full resolution, deep
transformers below, ``y`` from the pooled text and size conds) with a tiny two-tower SDXL text encoder.

The chain: prepare and encode training data (pooled captions kept for ``y``), train the adapter (loss falls,
an interrupted run resumes bit-identically), apply it and sample; every reference pass gets the right ``y``
and the reference key downsampling reaches SDXL's top attention level; weight 0 is the unpatched model; an
adapter of the other family is refused naming both.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host

RESOLUTION = 64   # training images: latent 8x8, SDXL's attention at 4x4 and 2x2
LEARN = dict(steps=30, lr=3e-2, batch_size=2, seed=0, checkpoint_every=0, resolution=RESOLUTION, reference_size=128)


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sources():
    """Four photos (the astronaut, shifted crops and a mirror) with two captions: different pooled outputs."""
    from face_fixtures import astronaut

    image = torch.from_numpy(astronaut()).float() / 255
    crops = [image, image[40:, 40:], image[:-60, 30:], image.flip(1)]
    captions = ["a photo of a woman astronaut", "a portrait of a smiling person"]
    return [(f"photo{i}", crop, captions[i % 2]) for i, crop in enumerate(crops)]


@pytest.fixture(scope="module")
def sdxl_setup(comfy_ready, one_thread):
    import comfy.supported_models

    import host_support
    from host_support import TINY_SDXL_POOLED_DIM, build_tiny_sdxl_clip
    from likeness.techniques.face_fusion import training as T

    settings = T.FusionTrainSettings(**LEARN)
    with torch.inference_mode():
        model = host_support._patcher(comfy.supported_models.SDXL, host_support.sdxl_unet_config(), 3)
        host_support.init_weights(model.model.diffusion_model, 3, fan_in_gain=1.0)
        vae, clip = host_support.build_tiny_vae(), build_tiny_sdxl_clip(pooled_dim=TINY_SDXL_POOLED_DIM)
        examples = T.prepare_examples(sources(), settings)
        data = T.encode_examples(model, vae, clip, examples, settings)
    return dict(model=model, clip=clip, vae=vae, data=data, settings=settings)


def _settings(**kw):
    from likeness.techniques.face_fusion.training import FusionTrainSettings

    return FusionTrainSettings(**{**LEARN, **kw})


def _record_unet_calls(model):
    """(x rows, y) of every call of ``model``'s UNet forward (the main pass and the reference passes)."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].shape[0], kwargs.get("y")))

    return calls, model.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_encoded_data_keeps_pooled_captions(sdxl_setup):
    data = sdxl_setup["data"]
    assert data.contexts.shape == (4, 77, 64)
    assert data.pooled.shape == (4, 1280) and data.empty_pooled.shape == (1, 1280)
    assert not torch.equal(data.pooled[0], data.pooled[1]) and torch.equal(data.pooled[0], data.pooled[2])


def test_training_and_reference_passes_get_each_rows_y(sdxl_setup):
    """The training forward's y is encode_adm(pooled caption, training size) per row, and reference i's pass
    copies row i's y (as a reference at sampling copies its positive's)."""
    from likeness.host.adm import adm_vector
    from likeness.techniques.face_fusion import training as T
    from likeness.trainers.loop import StepContext

    model, data = sdxl_setup["model"], sdxl_setup["data"]
    task = T.FusionTask(model, data, _settings())
    batch = data.get_batch([0, 1])
    expected = adm_vector(model.model, batch["pooled"], RESOLUTION, RESOLUTION)
    calls, handle = _record_unet_calls(model)
    try:
        with task.session(), torch.no_grad():
            task.loss(batch, StepContext(0, 0, torch.Generator().manual_seed(0), {}))
    finally:
        handle.remove()
    assert [rows for rows, _ in calls] == [2, 2]                  # the reference pass (2 references), the forward
    reference_y, forward_y = calls[0][1], calls[1][1]
    assert forward_y.shape == (2, 2816) and torch.equal(forward_y, expected)
    assert torch.equal(reference_y, expected)                      # row i's y, not row 0's for both
    assert not torch.equal(expected[0], expected[1])


def test_loss_falls_and_the_unet_stays_frozen(sdxl_setup):
    from likeness.techniques.face_fusion import training as T
    from likeness.techniques.face_fusion.adapter import FusionAdapter

    model, data, settings = sdxl_setup["model"], sdxl_setup["data"], sdxl_setup["settings"]
    frozen = [p.detach().clone() for p in list(model.model.diffusion_model.parameters())[:20]]
    with torch.inference_mode():
        initial = FusionAdapter.from_model(model)
        before = T.evaluate_loss(model, initial, data, settings, rounds=3)
        adapter, result = T.train_on_data(model, data, settings)
        after = T.evaluate_loss(model, adapter, data, settings, rounds=3)
    assert after <= 0.85 * before, (before, after)
    assert adapter.metadata["base"] == "sdxl"
    for a, b in zip(frozen, list(model.model.diffusion_model.parameters())[:20], strict=True):
        assert torch.equal(a, b)
    sdxl_setup["trained"] = adapter


def test_interrupted_and_resumed_equals_uninterrupted(sdxl_setup, tmp_path):
    from likeness.techniques.face_fusion import training as T
    from likeness.trainers import TrainingCancelled

    model, data = sdxl_setup["model"], sdxl_setup["data"]
    settings = _settings(steps=6, checkpoint_every=2, caption_dropout=0.5)

    def cancel_at_3(step, loss):
        if step == 3:
            raise TrainingCancelled("user pressed cancel")

    with torch.inference_mode():
        full, full_result = T.train_on_data(model, data, settings, checkpoint_path=str(tmp_path / "a.safetensors"))
        with pytest.raises(TrainingCancelled):
            T.train_on_data(model, data, settings, checkpoint_path=str(tmp_path / "b.safetensors"),
                            step_callback=cancel_at_3)
        resumed, resumed_result = T.train_on_data(model, data, settings,
                                                  checkpoint_path=str(tmp_path / "b.safetensors"), resume="require")
    assert resumed_result.start_step == 2 and resumed_result.losses == full_result.losses
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def _sample(model, clip, seed=5):
    import comfy.sample

    latent = torch.zeros(1, 4, 16, 16)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a woman"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, 2, 4.0, "euler", "normal", positive, negative, latent, seed=seed)


def test_trained_adapter_applies_and_weight_zero_is_unpatched(sdxl_setup):
    """The whole chain on SDXL conditioning from the SDXL text encoder: the trained adapter changes the
    output, weight 0 gives the unpatched model's output exactly."""
    from likeness.techniques.face_fusion import training as T
    from likeness.techniques.face_fusion.apply import FusionIdentityLatents, apply_face_fusion

    model, data, clip = sdxl_setup["model"], sdxl_setup["data"], sdxl_setup["clip"]
    adapter = sdxl_setup.get("trained")
    if adapter is None:
        with torch.inference_mode():
            adapter, _ = T.train_on_data(model, data, _settings(steps=4))
    reference = [FusionIdentityLatents(data.references[:1])]
    plain = _sample(model, sdxl_setup["clip"])
    for mode in ("per_step", "cached_clean"):
        fused = _sample(apply_face_fusion(model, adapter, reference, capture_mode=mode), clip)
        assert torch.isfinite(fused).all() and float((fused - plain).abs().max()) > 1e-3
        off = _sample(apply_face_fusion(model, adapter, reference, capture_mode=mode, weight=0.0), clip)
        assert torch.equal(off, plain)


def test_reference_downsampling_pools_sdxl_top_attention_level(sdxl_setup):
    """SDXL has no attention at the latent's full resolution: the reference pass pools the self-attention keys
    of the first level that has attention (latent / 2), and nothing in the sampling batch."""
    from likeness.techniques.face_fusion.adapter import FusionAdapter
    from likeness.techniques.face_fusion.apply import FusionIdentityLatents, apply_face_fusion

    model, clip = sdxl_setup["model"], sdxl_setup["clip"]
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, kwargs, out: seen.append(
        (args[0].shape[0], args[0].shape[1], (kwargs.get("context") if kwargs.get("context") is not None
                                              else args[0]).shape[1])), with_kwargs=True)
        for name, m in model.model.diffusion_model.named_modules() if name.endswith("attn1")]
    try:
        refs = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        fused = apply_face_fusion(model, FusionAdapter.from_model(model), [FusionIdentityLatents(refs)])
        _sample(fused, clip)
    finally:
        for h in handles:
            h.remove()
    top = 8 * 8
    reference_top = [k for b, q, k in seen if b == 1 and q == top]
    assert reference_top and all(k == top // 4 for k in reference_top)
    assert all(q == k for b, q, k in seen if b == 2)


def test_adapter_of_the_other_family_is_refused_naming_both(sdxl_setup):
    import host_support
    from likeness.errors import CheckpointLayoutError
    from likeness.techniques.face_fusion.adapter import FusionAdapter
    from likeness.techniques.face_fusion.apply import FusionIdentityLatents, apply_face_fusion

    sd15, sdxl = host_support.build_tiny_sd15(), sdxl_setup["model"]
    reference = [FusionIdentityLatents(torch.zeros(1, 4, 8, 8))]
    for adapter_model, model, made_for, given in ((sd15, sdxl, "SD1.5", "SDXL"), (sdxl, sd15, "SDXL", "SD1.5")):
        adapter = FusionAdapter.from_model(adapter_model)
        with pytest.raises(CheckpointLayoutError) as caught:
            apply_face_fusion(model, adapter, reference)
        message = str(caught.value)
        assert f"made for {made_for}" in message and f"the model is {given}" in message
