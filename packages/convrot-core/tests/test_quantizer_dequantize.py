import float64_reference as ref
import pytest
import torch

from convrot.quantizer.dequantize import dequantize_weight
from convrot.quantizer.weight import quantize_weight
from convrot_kernels import pack_int4


@pytest.mark.parametrize("rotation", ["regular", "sylvester", "none"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [4, 64, 256])
def test_is_the_exact_weight_of_the_codes(rotation, bits, group_size):
    w = torch.randn(24, 512, dtype=torch.bfloat16)
    codes, scale = quantize_weight(w, bits, group_size, rotation)
    stored = pack_int4(codes) if bits == 4 else codes
    exact = ref.rotate(codes.double() * scale.double()[:, None], rotation, group_size)
    got = dequantize_weight(stored, scale, bits, group_size, rotation, dtype=torch.float64)
    assert torch.equal(got, exact)
    assert torch.equal(dequantize_weight(stored, scale, bits, group_size, rotation), exact.float())


def test_fp32_computation_is_within_rounding_of_the_exact_weight():
    w = torch.randn(24, 1024)
    codes, scale = quantize_weight(w, 4, 256, "regular")
    exact = dequantize_weight(pack_int4(codes), scale, 4, 256)
    fp32 = dequantize_weight(pack_int4(codes), scale, 4, 256, compute_dtype=torch.float32)
    torch.testing.assert_close(fp32, exact, rtol=0, atol=7 * scale.max().item() * 2**-16)


def test_the_weight_is_close_to_the_original():
    w = torch.randn(64, 256, dtype=torch.float64)
    codes, scale = quantize_weight(w, 8, 256, "regular")
    back = dequantize_weight(codes, scale, 8, 256, dtype=torch.float64)
    assert ((back - w).abs() <= scale[:, None].double() / 2 * 16).all()  # half a step per rotated element, at most
    assert (back - w).norm() / w.norm() < 0.02


def test_refuses_mismatched_buffers():
    with pytest.raises(ValueError, match="4-bit codes must be a 2-D torch.uint8 tensor, got torch.int8"):
        dequantize_weight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), 4, 4)
    with pytest.raises(ValueError, match=r"weight_scale must have shape \(4,\)"):
        dequantize_weight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3), 8, 4)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        dequantize_weight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), 2, 4)
