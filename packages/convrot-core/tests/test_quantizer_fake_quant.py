import math

import float64_reference as ref
import pytest
import torch

import convrot
from convrot_kernels import pack_int4


@pytest.mark.parametrize("rotation", convrot.ROTATIONS)
@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_matches_reference(rotation, bits):
    x = torch.randn(2, 5, 512) * 3
    out = convrot.fake_quant(x, bits=bits, group_size=64, rotation=rotation)
    assert out.shape == x.shape and out.dtype == x.dtype
    codes, scale = ref.quantize_rows(ref.rotate(x.reshape(-1, 512), rotation, 64), bits)
    expected = ref.rotate(codes * scale[:, None], rotation, 64).reshape(x.shape)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)


def test_fake_quant_error_shrinks_with_bits_and_nan_rows_stay_local():
    x = torch.randn(4, 256, dtype=torch.float64)
    x[1, 7] = math.nan
    out4 = convrot.fake_quant(x, bits=4)
    out8 = convrot.fake_quant(x, bits=8)
    assert out4[1].isnan().all() and not out4[[0, 2, 3]].isnan().any()
    clean = [0, 2, 3]
    assert ref.sqnr_db(x[clean], out8[clean]) > ref.sqnr_db(x[clean], out4[clean]) + 20


@pytest.mark.parametrize("rotation", convrot.ROTATIONS)
@pytest.mark.parametrize("bits", [4, 8])
def test_simulated_linear_matches_reference(rotation, bits):
    n, k = 24, 256
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), dtype=torch.int8)
    qweight = pack_int4(codes) if bits == 4 else codes
    weight_scale = torch.rand(n) / 100
    bias = torch.randn(n, dtype=torch.bfloat16)
    x = torch.randn(3, 4, k, dtype=torch.bfloat16)
    y = convrot.simulated_linear(x, qweight, weight_scale, bias, bits, 64, rotation)
    assert y.shape == (3, 4, n) and y.dtype == torch.bfloat16
    a_codes, a_scale = ref.quantize_rows(ref.rotate(x.reshape(-1, k), rotation, 64), bits)
    expected = (a_codes @ codes.double().T) * a_scale[:, None] * weight_scale.double() + bias.double()
    torch.testing.assert_close(y.reshape(-1, n), expected.to(torch.bfloat16), atol=0, rtol=0)
