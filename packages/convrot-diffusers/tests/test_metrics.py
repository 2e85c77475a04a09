import math

import numpy as np
import pytest
import torch
from PIL import Image

from convrot_diffusers.metrics import image_tensor, psnr, sqnr, ssim


def random_image(rng, size=48):
    return rng.random((size, size, 3))


def test_psnr_matches_its_definition():
    rng = np.random.default_rng()
    a = random_image(rng)
    b = np.clip(a + rng.normal(0, 0.01, a.shape), 0, 1)
    mse = np.mean((a - b) ** 2)
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / mse), rel=1e-9)
    assert psnr(a, a) == math.inf


def test_uint8_and_pil_images_are_scaled_to_unit_range():
    rng = np.random.default_rng()
    pixels = (random_image(rng) * 255).astype(np.uint8)
    assert torch.equal(image_tensor(Image.fromarray(pixels)), image_tensor(pixels))
    assert image_tensor(pixels).max() <= 1.0


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    rng = np.random.default_rng()
    a = random_image(rng)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    small = np.clip(a + rng.normal(0, 0.02, a.shape), 0, 1)
    large = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    assert 1.0 > ssim(a, small) > ssim(a, large)


def test_sqnr():
    x = torch.randn(64, 32)
    noise = torch.randn(64, 32)
    expected = 10 * math.log10(float((x.double() ** 2).sum() / (noise.double() ** 2).sum()))
    assert sqnr(x, x + noise) == pytest.approx(expected, rel=1e-5)
    assert sqnr(x, x) == math.inf
