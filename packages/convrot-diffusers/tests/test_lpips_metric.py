import importlib.abc
import sys
import types

import numpy as np
import pytest

from convrot_diffusers import lpips_metric
from convrot_diffusers.lpips_metric import lpips, lpips_unavailable

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


class FailingImport(importlib.abc.MetaPathFinder):
    """Importing ``name`` raises as a torchvision built for another torch does."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname == self.name:
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


def test_without_torchmetrics_or_torchvision_the_reason_names_the_package_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # None in sys.modules: the import fails
    reason = lpips_unavailable()
    assert reason.startswith("torchmetrics is not installed") and "convrot-diffusers[lpips]" in reason
    with pytest.raises(RuntimeError, match="LPIPS is unavailable: torchmetrics is not installed"):
        lpips(np.zeros((64, 64, 3)), np.zeros((64, 64, 3)))
    monkeypatch.setitem(sys.modules, "torchmetrics", types.ModuleType("torchmetrics"))
    monkeypatch.setitem(sys.modules, "torchvision", None)
    assert lpips_unavailable().startswith("torchvision is not installed")
    monkeypatch.delitem(sys.modules, "torchvision")
    monkeypatch.setattr(sys, "meta_path", [FailingImport("torchvision"), *sys.meta_path])
    assert "torchvision does not import (operator torchvision::nms does not exist)" in lpips_unavailable()


def test_the_backbone_weights_are_looked_for_in_the_hub_cache_never_downloaded(monkeypatch, tmp_path):
    for name in ("torchmetrics", "torchvision"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(lpips_metric, "backbone_url", lambda net: ALEXNET_URL)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    reason = lpips_unavailable()
    assert f"not in torch's hub cache ({cached})" in reason and ALEXNET_URL in reason
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert lpips_unavailable() is None
    with pytest.raises(ValueError, match="unknown LPIPS backbone 'resnet'"):
        lpips_unavailable("resnet")


@pytest.mark.skipif(lpips_unavailable() is not None, reason=f"LPIPS unavailable here: {lpips_unavailable()}")
def test_lpips_is_zero_for_identical_images_and_grows_with_noise():
    rng = np.random.default_rng()
    image = rng.random((64, 64, 3))
    noisy = [np.clip(image + rng.normal(0, sigma, image.shape), 0, 1) for sigma in (0.02, 0.2)]
    assert lpips(image, image) == pytest.approx(0, abs=1e-6)
    assert 0 < lpips(image, noisy[0]) < lpips(image, noisy[1])
