"""ConsistentID trainer on a tiny SDXL-shaped model (real host): SDXL conditioning (``cat(CLIP-L, CLIP-G)`` text,
``y`` = pooled output + size conds), the loss falls, and an interrupted run resumes bit-identically.

Same photos, analyzer and parser as ``test_consistentid_train.py`` (fewer images: SDXL's blocks cost more).
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

import host_support
from test_consistentid_train import LEARN, analyzer, face_photos, one_thread, tiny_consistentid  # noqa: F401

pytestmark = pytest.mark.host
logger = logging.getLogger(__name__)

POOLED = host_support.TINY_CONTEXT_DIM // 2


@pytest.fixture(scope="module")
def setup(comfy_ready, one_thread):  # noqa: F811
    import comfy.supported_models

    from likeness.face_analysis.parsing import landmark_parser
    from likeness.techniques.consistentid import training as T

    settings = T.ConsistentIDTrainSettings(**LEARN)
    config = host_support.sdxl_unet_config(adm_in_channels=host_support.TINY_SDXL_CLIP_ADM)
    with torch.inference_mode():
        model = host_support._patcher(comfy.supported_models.SDXL, config, 3)
        host_support.init_weights(model.model.diffusion_model, 3, fan_in_gain=1.0)
        vae, clip = host_support.build_tiny_vae(), host_support.build_tiny_sdxl_clip()
        clip_vision = host_support.build_tiny_clip_vision()
        _, start = tiny_consistentid(model, clip_vision)
        data = T.prepare_training_data(model, vae, clip, clip_vision, analyzer(), landmark_parser(),
                                       face_photos()[:4], settings)
    return dict(model=model, clip=clip, start=start, data=data, settings=settings)


@pytest.fixture(autouse=True)
def _unload_models():
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()


def _weights(setup):
    from likeness.techniques.consistentid.training import ConsistentIDWeights

    return ConsistentIDWeights.from_checkpoint(setup["start"])


def test_sdxl_examples_carry_the_sdxl_caption_and_y(setup):
    from likeness.techniques.consistentid.loader import consistentid_base
    from likeness.techniques.consistentid.training import sdxl_size_conds

    data, model = setup["data"], setup["model"]
    assert consistentid_base(setup["start"]).base == "SDXL"
    assert all("; Detail:" in text for text in data.texts)
    assert data.adm.shape == data.empty_adm.shape == (4, host_support.TINY_SDXL_CLIP_ADM)
    # the size part is the example's, the pooled part its caption's (the empty caption's for dropout)
    assert torch.equal(data.adm[:, POOLED:], data.empty_adm[:, POOLED:])
    assert not torch.allclose(data.adm[:, :POOLED], data.empty_adm[:, :POOLED])
    photo = face_photos()[1][1]
    expected = model.model.encode_adm(pooled_output=data.adm[1:2, :POOLED], device=torch.device("cpu"),
                                      **sdxl_size_conds(photo.shape[0], photo.shape[1], LEARN["resolution"]))
    torch.testing.assert_close(data.adm[1:2], expected)


def test_y_reaches_the_model(setup):
    """The loss with every row's ``y`` replaced by the empty caption's differs: y is fed to the UNet."""
    from likeness.techniques.consistentid import training as T

    data, settings = setup["data"], setup["settings"]
    swapped = dataclasses.replace(data, adm=data.empty_adm)
    with torch.inference_mode():
        real = T.evaluate_loss(setup["model"], _weights(setup), data, settings, rounds=1)
        other = T.evaluate_loss(setup["model"], _weights(setup), swapped, settings, rounds=1)
    assert real[0] != other[0]


def test_sdxl_loss_falls_on_a_short_run(setup):
    """The full official training (processors too) on SDXL conditioning."""
    from likeness.techniques.consistentid import training as T

    model, data = setup["model"], setup["data"]
    settings = dataclasses.replace(setup["settings"], train_processors=True, lr=1e-2)
    with torch.inference_mode():
        before = T.evaluate_loss(model, _weights(setup), data, settings, rounds=3)
        trained, result = T.train_on_data(model, data, settings, _weights(setup))
        after = T.evaluate_loss(model, trained, data, settings, rounds=3)
    first, last = float(np.mean(result.losses[:5])), float(np.mean(result.losses[-5:]))
    logger.info(f"SDXL held-out noise loss {before[0]:.4f} -> {after[0]:.4f}; curve {first:.4f} -> {last:.4f}")
    assert after[0] <= 0.9 * before[0]
    assert last < first


def test_sdxl_interrupted_and_resumed_equals_uninterrupted(setup, tmp_path):
    from likeness.techniques.consistentid import training as T
    from likeness.trainers import TrainingCancelled

    model, data = setup["model"], setup["data"]
    settings = T.ConsistentIDTrainSettings(**{**LEARN, "steps": 6, "checkpoint_every": 2, "grad_accumulation": 2,
                                              "train_processors": True, "lr": 3e-3, "condition_dropout": 0.3})

    def cancel_at_3(step, loss):
        if step == 3:
            raise TrainingCancelled("user pressed cancel")

    with torch.inference_mode():
        full, full_result = T.train_on_data(model, data, settings, _weights(setup),
                                            checkpoint_path=str(tmp_path / "a.safetensors"))
        with pytest.raises(TrainingCancelled):
            T.train_on_data(model, data, settings, _weights(setup), checkpoint_path=str(tmp_path / "b.safetensors"),
                            step_callback=cancel_at_3)
        resumed, resumed_result = T.train_on_data(model, data, settings, _weights(setup),
                                                  checkpoint_path=str(tmp_path / "b.safetensors"), resume="require")
    assert resumed_result.start_step == 2 and resumed_result.step == 6
    assert resumed_result.losses == full_result.losses
    full_params, resumed_params = full.trainable(True), resumed.trainable(True)
    assert all(torch.equal(full_params[k], resumed_params[k]) for k in full_params)
    start = _weights(setup).trainable(True)
    assert any(not torch.equal(start[k], full_params[k]) for k in start if k.startswith("FacialEncoder."))
