import math

import float64_reference as ref
import pytest
import torch

import convrot.quantizer.weight as weight_module
from convrot.quantizer.weight import quantize_weight


def reference_weight_quantization(w, bits, group_size, rotation):
    v = ref.rotate(w, rotation, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = (v.abs().amax(dim=-1) / qmax).float()
    codes = torch.clamp(torch.round(v / scale.double()[:, None]), -qmax - 1, qmax)
    return codes, scale


@pytest.mark.parametrize("rotation", ["regular", "sylvester", "none"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(rotation, bits, dtype):
    w = torch.randn(48, 512, dtype=dtype)
    codes, scale = quantize_weight(w, bits, 64, rotation)
    ref_codes, ref_scale = reference_weight_quantization(w, bits, 64, rotation)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(scale, ref_scale)
    assert torch.equal(codes.double(), ref_codes)


def test_chunking_does_not_change_the_result(monkeypatch):
    w = torch.randn(37, 256)
    whole = quantize_weight(w, 4, 256, "regular")
    monkeypatch.setattr(weight_module, "CHUNK_ROWS", 5)
    chunked = quantize_weight(w, 4, 256, "regular")
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_zero_row_has_zero_scale_and_codes():
    w = torch.randn(4, 64)
    w[2] = 0
    codes, scale = quantize_weight(w, 4, 64, "regular")
    assert scale[2].item() == 0 and not codes[2].any()


def test_non_finite_weight_is_rejected():
    w = torch.randn(8, 64)
    w[3, 5] = math.nan
    w[6, 0] = math.inf
    with pytest.raises(ValueError, match=r"NaN or Inf in 2 output channel\(s\), first \[3, 6\]"):
        quantize_weight(w, 4, 64, "regular")


def test_bad_weights():
    with pytest.raises(ValueError, match="meta device"):
        quantize_weight(torch.empty(4, 64, device="meta"), 4, 64, "regular")
    with pytest.raises(ValueError, match="2-D floating-point"):
        quantize_weight(torch.randn(64), 4, 64, "regular")
    with pytest.raises(ValueError, match="2-D floating-point"):
        quantize_weight(torch.ones(4, 64, dtype=torch.int32), 4, 64, "regular")
