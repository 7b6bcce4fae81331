"""Datasets (folder + captions, IMAGE + text), the seeded sampler and the diffusion losses (plain tensors)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from likeness.errors import InvalidInputError
from likeness.trainers import datasets, losses


def _write_png(path, value: int, size=(40, 30)):
    from PIL import Image

    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def test_folder_with_same_stem_captions(tmp_path):
    _write_png(tmp_path / "b.png", 200)
    _write_png(tmp_path / "a.jpg", 100, size=(30, 50))
    (tmp_path / "a.txt").write_text("a photo of Ada\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored")
    items = datasets.load_image_folder(str(tmp_path), size=16)
    assert [i.name for i in items] == ["a.jpg", "b.png"]
    assert [i.caption for i in items] == ["a photo of Ada", datasets.DEFAULT_CAPTION]
    assert all(i.image.shape == (16, 16, 3) for i in items)
    assert abs(float(items[1].image.mean()) - 200 / 255) < 1e-3


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(InvalidInputError, match="no images"):
        datasets.load_image_folder(str(tmp_path), size=16)
    with pytest.raises(InvalidInputError, match="does not exist"):
        datasets.load_image_folder(str(tmp_path / "nope"), size=16)


def test_images_and_text_inputs():
    images = torch.rand(3, 20, 28, 3)
    assert [i.caption for i in datasets.from_images(images, "x\ny\nz", 8)] == ["x", "y", "z"]
    assert [i.caption for i in datasets.from_images(images, "one for all", 8)] == ["one for all"] * 3
    assert datasets.from_images(images, ["p", "q", "r"], 8)[2].caption == "r"
    with pytest.raises(InvalidInputError, match="captions for 3 images"):
        datasets.from_images(images, ["p"], 8)
    crop = datasets.resize_center_crop(images[0], 8)
    assert crop.shape == (8, 8, 3)


def test_sampler_is_seeded_and_resumable():
    a = datasets.EpochSampler(5, seed=3)
    first = [a.next_indices(3) for _ in range(6)]
    flat = sum(first, [])
    for epoch in range(3):
        assert sorted(flat[epoch * 5:(epoch + 1) * 5]) == list(range(5))  # every epoch is a permutation
    assert flat[:5] != flat[5:10]  # reshuffled per epoch
    b = datasets.EpochSampler(5, seed=3, position=9)
    assert [b.next_indices(3) for _ in range(3)] == first[3:]


def test_collate_nested():
    batch = datasets.collate([{"x": torch.zeros(2), "c": "a"}, {"x": torch.ones(2), "c": "b"}])
    assert batch["x"].shape == (2, 2) and batch["c"] == ["a", "b"]


class FakeEPS:
    """The formulas of ComfyUI's EPS model sampling (comfy/model_sampling.py), for plain tests."""

    sigma_min, sigma_max = 0.03, 14.6

    def percent_to_sigma(self, percent):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** (1.0 - percent)

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        return latent + noise * sigma.view(-1, 1, 1, 1)

    def calculate_denoised(self, sigma, out, x):
        return x - out * sigma.view(-1, 1, 1, 1)


class FakeV(FakeEPS):
    sigma_data = 1.0

    def calculate_denoised(self, sigma, out, x):
        s = sigma.view(-1, 1, 1, 1)
        d = self.sigma_data
        return x * d ** 2 / (s ** 2 + d ** 2) - out * s * d / (s ** 2 + d ** 2) ** 0.5


def test_native_space_is_epsilon_for_eps_models():
    ms = FakeEPS()
    g = torch.Generator().manual_seed(0)
    sigma = losses.sample_sigmas(ms, 4, g)
    assert sigma.shape == (4,) and bool((sigma >= ms.sigma_min).all()) and bool((sigma <= ms.sigma_max).all())
    clean, noise, model_out = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    x_t = losses.noised(ms, sigma, noise, clean)
    pred, target = losses.native_space(ms, sigma, x_t, ms.calculate_denoised(sigma, model_out, x_t), clean)
    assert torch.allclose(pred, model_out, atol=1e-4) and torch.allclose(target, noise, atol=1e-4)


def test_native_space_is_v_for_v_models():
    ms = FakeV()
    sigma = torch.tensor([0.5, 2.0])
    clean, noise, model_out = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    x_t = losses.noised(ms, sigma, noise, clean)
    pred, target = losses.native_space(ms, sigma, x_t, ms.calculate_denoised(sigma, model_out, x_t), clean)
    s = sigma.view(-1, 1, 1, 1)
    alpha, sig = 1 / (1 + s ** 2) ** 0.5, s / (1 + s ** 2) ** 0.5   # v = alpha·eps - sigma·x0 (normalised)
    assert torch.allclose(pred, model_out, atol=1e-4)
    assert torch.allclose(target, alpha * noise - sig * clean, atol=1e-4)


def test_weighted_and_masked_mse():
    pred, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert float(losses.weighted_mse(pred, target)) == pytest.approx(7.5)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert float(losses.weighted_mse(pred, target, mask)) == pytest.approx(1.0)
    weight = losses.region_weight(torch.ones(1, 16, 16), (1, 4, 2, 2), inside=3.0)
    assert weight.shape == (1, 1, 2, 2) and torch.allclose(weight, torch.full_like(weight, 3.0))
