import math

import numpy as np
import pytest
import torch
from PIL import Image

from convrot_diffusers.metrics import frame_scores, image_tensor, psnr, sqnr, ssim


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


def test_frame_scores_are_each_frames_scores_and_their_mean_and_minimum():
    rng = np.random.default_rng()
    reference = [random_image(rng) for _ in range(5)]
    # Noise growing frame by frame, in a shuffled order: the minimum is the noisiest frame wherever it is.
    sigmas = rng.permutation([0.01, 0.02, 0.04, 0.08, 0.16])
    test = [np.clip(f + rng.normal(0, sigma, f.shape), 0, 1) for f, sigma in zip(reference, sigmas, strict=True)]
    scores = frame_scores(reference, test)
    psnrs = [psnr(a, b) for a, b in zip(reference, test, strict=True)]
    ssims = [ssim(a, b) for a, b in zip(reference, test, strict=True)]
    assert scores["psnr_db_per_frame"] == psnrs and scores["ssim_per_frame"] == ssims
    assert scores["psnr_db"] == pytest.approx(sum(psnrs) / 5) and scores["ssim"] == pytest.approx(sum(ssims) / 5)
    noisiest = int(np.argmax(sigmas))
    assert scores["psnr_db_min"] == psnrs[noisiest] == min(psnrs)
    assert scores["ssim_min"] == ssims[noisiest] == min(ssims)
    assert scores["psnr_db_min"] < scores["psnr_db"] and scores["ssim_min"] < scores["ssim"]


def test_frame_scores_need_matching_frame_counts():
    rng = np.random.default_rng()
    frames = [random_image(rng) for _ in range(3)]
    assert frame_scores(frames, frames)["psnr_db"] == math.inf
    with pytest.raises(ValueError, match="frame counts"):
        frame_scores(frames, frames[:2])
    with pytest.raises(ValueError, match="frame counts"):
        frame_scores([], [])
