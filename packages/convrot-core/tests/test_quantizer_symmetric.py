import math

import float64_reference as ref
import pytest
import torch

from convrot.quantizer.symmetric import qmax, quantize_rows, quantize_with_scale, row_scale


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantize_rows_matches_reference(bits, dtype):
    v = torch.randn(64, 512, dtype=dtype) * torch.rand(64, 1, dtype=dtype) * 10
    codes, scale = quantize_rows(v, bits)
    ref_codes, ref_scale = ref.quantize_rows(v, bits)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-6 if dtype == torch.float32 else 0, atol=0)
    if dtype == torch.float64:
        assert torch.equal(codes, ref_codes)
    assert codes.abs().amax().item() == qmax(bits)


def test_ties_round_half_to_even():
    # amax 7 makes scale exactly 1, so v / scale lands exactly on the ties.
    v = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 7.0]], dtype=torch.float64)
    codes, scale = quantize_rows(v, 4)
    assert scale.item() == 1.0
    assert codes.tolist() == [[0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 4.0, 7.0]]


def test_clamp_reaches_minus_qmax_minus_1_only_with_a_smaller_scale():
    v = torch.tensor([[-9.0, 9.0, 0.4]], dtype=torch.float64)
    assert quantize_with_scale(v, torch.tensor([1.0], dtype=torch.float64), 4).tolist() == [[-8.0, 7.0, 0.0]]


def test_special_rows():
    v = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [1.0, math.nan, 2.0, 3.0], [1.0, math.inf, 2.0, 3.0], [1.0, -2.5, 3.0, -4.0]]
    )
    codes, scale = quantize_rows(v, 4)
    assert scale[0].item() == 0 and codes[0].tolist() == [0, 0, 0, 0]
    assert math.isnan(scale[1].item()) and codes[1].tolist() == [0, 0, 0, 0]
    assert math.isnan(scale[2].item()) and codes[2].tolist() == [0, 0, 0, 0]
    assert scale[3].item() == pytest.approx(4 / 7, rel=1e-6) and codes[3].tolist() == [2, -4, 5, -7]


def test_row_scale_any_leading_shape():
    v = torch.randn(2, 3, 16)
    torch.testing.assert_close(row_scale(v, 8), v.abs().amax(-1) / 127)


@pytest.mark.parametrize("bits", [2, 3, 16, "4"])
def test_bits_must_be_4_or_8(bits):
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        qmax(bits)
