"""LPIPS (Zhang et al. 2018), the perceptual distance quantization papers report beside PSNR/SSIM,
through torchmetrics' LearnedPerceptualImagePatchSimilarity.

torchmetrics ships LPIPS's small linear heads, but the backbone (AlexNet by default, as the
LPIPS authors recommend) is torchvision's ImageNet model, which torchvision downloads from
download.pytorch.org into torch's hub cache on first use. LPIPS is computed only when that file
is already in the cache (no download is attempted: a run must not stall or fail on a machine
without network access); otherwise ``lpips_unavailable`` says why, and what to do, in one line.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlparse

LPIPS_NET = "alex"
# LPIPS backbone -> the torchvision weights enum whose ImageNet checkpoint it loads.
_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
INSTALL = "pip install 'convrot-diffusers[lpips]'"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def backbone_url(net: str = LPIPS_NET) -> str:
    """Where torchvision downloads the backbone's ImageNet weights from."""
    import torchvision

    return getattr(torchvision.models, _WEIGHTS[net]).DEFAULT.url


def backbone_cache_path(net: str = LPIPS_NET) -> Path:
    """Where torch.hub.load_state_dict_from_url (which torchvision uses) looks for that file first."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(backbone_url(net)).path)


def lpips_unavailable(net: str = LPIPS_NET) -> str | None:
    """Why LPIPS with the ``net`` backbone cannot be computed here without a download, or None when it can."""
    if net not in _WEIGHTS:
        raise ValueError(f"unknown LPIPS backbone {net!r}; choose one of {', '.join(_WEIGHTS)}")
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        return f"torchmetrics is not installed (LPIPS needs torchmetrics and torchvision: {INSTALL})"
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return f"torchvision is not installed ({INSTALL}, or the torchvision build that matches your torch)"
    except Exception as error:  # noqa: BLE001 - a torchvision built for another torch fails on import
        return f"torchvision does not import ({_first_line(error)}): install the build that matches your torch"
    path = backbone_cache_path(net)
    if not path.is_file():
        return (
            f"the {net} backbone's ImageNet weights are not in torch's hub cache ({path}); torchvision fetches "
            f"them from {backbone_url(net)} on first use: run once with network access, or copy that file there"
        )
    return None


@functools.lru_cache(maxsize=3)
def _metric(net: str):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="mean", normalize=True).eval()


def lpips(reference, test, net: str = LPIPS_NET) -> float:
    """LPIPS distance between two images (PIL, or HxWxC arrays in [0, 1] or uint8): 0 for identical
    images, larger is more different. RuntimeError (lpips_unavailable's reason) when it cannot be computed."""
    import torch

    from .metrics import image_tensor

    if (reason := lpips_unavailable(net)) is not None:
        raise RuntimeError(f"LPIPS is unavailable: {reason}")
    a, b = (image_tensor(image).float() for image in (reference, test))
    metric = _metric(net)
    metric.reset()
    with torch.no_grad():
        metric.update(a, b)
        return float(metric.compute())
