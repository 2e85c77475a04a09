"""Image, video and tensor error metrics: PSNR, SSIM (per image, and per frame over a video), SQNR."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from pytorch_msssim import ssim as _ssim


def image_tensor(image) -> torch.Tensor:
    """A PIL image or an HxWxC array in [0, 1] (or uint8) as a float64 tensor [1, C, H, W] in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    tensor = torch.from_numpy(array.astype(np.float64))
    if array.dtype == np.uint8:
        tensor = tensor / 255.0
    return tensor.permute(2, 0, 1).unsqueeze(0)


def psnr(reference, test) -> float:
    """Peak signal-to-noise ratio in dB between two images in [0, 1]; inf when identical."""
    a, b = image_tensor(reference), image_tensor(test)
    mse = torch.mean((a - b) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(reference, test) -> float:
    """Structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) between two images in [0, 1]."""
    a, b = image_tensor(reference), image_tensor(test)
    return float(_ssim(a, b, data_range=1.0, size_average=True))


def frame_scores(reference_frames, test_frames) -> dict:
    """PSNR and SSIM of each frame of a video against the same frame of the reference, and their mean and
    minimum over the frames: ``psnr_db``/``ssim`` (means), ``psnr_db_min``/``ssim_min``, and the
    per-frame lists ``psnr_db_per_frame``/``ssim_per_frame``. The mean PSNR is the mean of the frames' dB
    (inf when a frame is identical), as video codecs report it."""
    reference_frames, test_frames = list(reference_frames), list(test_frames)
    if not reference_frames or len(reference_frames) != len(test_frames):
        raise ValueError(f"frame counts differ or are zero: {len(reference_frames)} and {len(test_frames)}")
    psnrs = [psnr(a, b) for a, b in zip(reference_frames, test_frames, strict=True)]
    ssims = [ssim(a, b) for a, b in zip(reference_frames, test_frames, strict=True)]
    return {
        "psnr_db": sum(psnrs) / len(psnrs),
        "psnr_db_min": min(psnrs),
        "ssim": sum(ssims) / len(ssims),
        "ssim_min": min(ssims),
        "psnr_db_per_frame": psnrs,
        "ssim_per_frame": ssims,
    }


def sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - test)^2), in float64."""
    reference = reference.detach().double()
    noise = torch.sum((reference - test.detach().double()) ** 2).item()
    signal = torch.sum(reference**2).item()
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf
