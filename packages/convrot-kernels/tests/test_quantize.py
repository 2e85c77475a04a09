import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import convrot_kernels as ck

import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def codes_of(q: torch.Tensor, bits: int) -> np.ndarray:
    return ref.unpack_int4(q.numpy()) if bits == 4 else q.numpy().astype(np.int64)


def assert_codes_match(q, scale, expected_values, bits):
    codes, expected_scale = ref.quantize_rows(expected_values, bits)
    np.testing.assert_allclose(scale.numpy(), expected_scale, rtol=1e-5, atol=0)
    got = codes_of(q, bits)
    # Codes may differ only where v/scale sits within float rounding of a .5 boundary.
    near_tie = ref.tie_distance(expected_values, expected_scale) < 1e-3
    mismatch = (got != codes) & ~near_tie
    assert not mismatch.any(), f"{mismatch.sum()} codes differ away from rounding ties"
    assert (np.abs(got - codes) <= 1).all()


@given(
    rows=st.integers(1, 9),
    groups=st.integers(1, 3),
    group_size=st.sampled_from([4, 16, 64, 256]),
    bits=st.sampled_from([4, 8]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_rht_quantize_matches_float64_reference(rows, groups, group_size, bits, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, groups * group_size, generator=g) * 4).to(dtype)
    q, scale = ck.rht_quantize(x, group_size, bits)
    k = groups * group_size
    assert q.shape == (rows, k // 2 if bits == 4 else k)
    assert q.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert scale.shape == (rows,) and scale.dtype == torch.float32
    assert_codes_match(q, scale, ref.rht(x, group_size), bits)


@given(
    rows=st.integers(1, 9),
    k=st.integers(1, 40).map(lambda h: 2 * h),
    bits=st.sampled_from([4, 8]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_matches_float64_reference(rows, k, bits, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=g) * 10).to(dtype)
    q, scale = ck.quantize(x, bits)
    # Without rotation the scale is exactly fp32(amax) / qmax.
    amax = x.float().abs().amax(dim=1)
    torch.testing.assert_close(scale, amax / (2 ** (bits - 1) - 1), rtol=0, atol=0)
    assert_codes_match(q, scale, x.double().numpy(), bits)


def test_quantize_rounds_half_to_even():
    # amax 7 gives scale 1, so the codes are the rounded values themselves.
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 7.0, 3.49]])
    q, scale = ck.quantize(x, 4)
    assert scale.item() == 1.0
    assert ck.unpack_int4(q).tolist() == [[0, 2, 2, 0, -2, -2, 7, 3]]


def test_quantize_uses_minus_qmax_minus_one_only_by_clamping():
    x = torch.tensor([[-7.0, 7.0, -3.0, 1.0]])
    q, _ = ck.quantize(x, 4)
    assert ck.unpack_int4(q).tolist() == [[-7, 7, -3, 1]]


@pytest.mark.parametrize("bits", [4, 8])
def test_zero_and_non_finite_rows_stay_in_their_row(bits):
    x = torch.randn(4, 64)
    x[1] = 0
    x[2, 5] = math.nan
    x[3, 7] = math.inf
    q, scale = ck.rht_quantize(x, 64, bits)
    codes = codes_of(q, bits)
    assert scale[1].item() == 0 and not codes[1].any()
    assert math.isnan(scale[2].item()) and not codes[2].any()
    assert math.isnan(scale[3].item()) and not codes[3].any()
    good_q, good_scale = ck.rht_quantize(x[:1], 64, bits)
    assert scale[0].item() == good_scale.item() and (codes[0] == codes_of(good_q, bits)[0]).all()


@given(
    rows=st.integers(1, 5),
    x_chunks=st.integers(0, 6),
    x2_width=st.integers(0, 100),
    group_size=st.sampled_from([0, 4, 16, 64]),
    gelu_chunk=st.integers(0, 12),
    bits=st.sampled_from([4, 8]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_inputs_match_the_materialised_row(rows, x_chunks, x2_width, group_size, gelu_chunk, bits, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k1 = 16 * x_chunks
    k = k1 + x2_width
    if group_size:
        k = max(group_size, -(-k // group_size) * group_size)
    elif k % 2:
        k += 1
    gelu_from = 16 * gelu_chunk if 16 * gelu_chunk <= k else None
    x = ref.gelu_steady((torch.randn(rows, k, generator=g) * 3).to(dtype))
    x1, x2 = x[:, :k1].contiguous(), (x[:, k1:].contiguous() if k1 < k else None)
    q, scale = ck.rht_quantize(x1, group_size, bits, x2=x2, gelu_from=gelu_from)
    row = ref.fused_rows(x1, x2, gelu_from)
    assert_codes_match(q, scale, ref.rht(row, group_size) if group_size else row.numpy(), bits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_gelu_is_the_tanh_approximation_rounded_to_the_dtype(dtype):
    # 8-bit codes of unrotated values: a GELU off by one unit of the dtype (or the erf GELU) shows.
    x = ref.gelu_steady((torch.linspace(-6, 6, 4096) * 1.01).to(dtype).reshape(8, 512))
    q, scale = ck.rht_quantize(x, 0, 8, gelu_from=0)
    assert_codes_match(q, scale, ref.fused_rows(x, None, 0).numpy(), 8)


def test_fused_inputs_are_checked():
    x, x2 = torch.zeros(2, 256), torch.zeros(2, 512)
    with pytest.raises(ValueError, match="x2 must be 2-D"):
        ck.rht_quantize(x, x2=x2.half())
    with pytest.raises(ValueError, match="x2 must be 2-D"):
        ck.rht_quantize(x, x2=torch.zeros(3, 512))
    with pytest.raises(ValueError, match="multiple of 16"):
        ck.rht_quantize(torch.zeros(2, 8), 16, x2=torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"gelu_from must be a multiple of 16 in \[0, 768\]"):
        ck.rht_quantize(x, x2=x2, gelu_from=8)
    with pytest.raises(ValueError, match="gelu_from"):
        ck.rht_quantize(x, x2=x2, gelu_from=784)
    with pytest.raises(ValueError, match="gelu_from"):
        ck.rht_quantize(x, gelu_from=True)
    with pytest.raises(ValueError, match="multiple of group_size"):
        ck.rht_quantize(x, x2=torch.zeros(2, 16))


def test_strided_fused_inputs_are_read_as_their_values():
    x, x2 = torch.randn(2, 256), torch.randn(2, 1024)[:, ::2]
    q, scale = ck.rht_quantize(x, x2=x2)
    expected = ck.rht_quantize(torch.cat([x, x2], 1))
    assert torch.equal(q, expected[0]) and torch.equal(scale, expected[1])


def test_empty_input_is_refused():
    with pytest.raises(ValueError, match=r"x has no rows \(M = 0\)"):
        ck.rht_quantize(torch.zeros(0, 256, dtype=torch.bfloat16))


def test_wide_rows():
    x = torch.randn(3, 15360, dtype=torch.bfloat16)
    q, scale = ck.rht_quantize(x, 256, 4)
    assert_codes_match(q, scale, ref.rht(x, 256), 4)


def test_rht_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="x must be 2-D"):
        ck.rht_quantize(torch.zeros(2, 3, 256))
    with pytest.raises(TypeError, match="x must have dtype"):
        ck.rht_quantize(torch.zeros(2, 256, dtype=torch.int32))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        ck.rht_quantize(torch.zeros(2, 256), bits=3)
    with pytest.raises(ValueError, match="multiple of group_size"):
        ck.rht_quantize(torch.zeros(2, 320), 256)
    with pytest.raises(ValueError, match="must be even"):
        ck.quantize(torch.zeros(2, 5), 4)
    with pytest.raises(ValueError, match="group_size must be a power of 4"):
        ck.rht_quantize(torch.zeros(2, 256), 128)
