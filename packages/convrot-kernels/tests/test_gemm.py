import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import convrot_kernels as ck

import reference as ref


def random_codes(rows, k, bits, g):
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax - 1, qmax + 1, (rows, k), dtype=torch.int8, generator=g)
    return (ck.pack_int4(codes) if bits == 4 else codes), codes.numpy()


@given(
    m=st.integers(1, 17),
    n=st.integers(1, 17),
    k=st.integers(1, 48).map(lambda h: 2 * h),
    bits=st.sampled_from([4, 8]),
    out_dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_gemm_matches_float64_reference(m, n, k, bits, out_dtype, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    qa, ca = random_codes(m, k, bits, g)
    qw, cw = random_codes(n, k, bits, g)
    sa = torch.rand(m, generator=g) * 0.1
    sw = torch.rand(n, generator=g) * 0.1
    bias = torch.randn(n, generator=g) if with_bias else None
    y = ck.gemm(qa, sa, qw, sw, bias, bits=bits, out_dtype=out_dtype)
    assert y.shape == (m, n) and y.dtype == out_dtype
    expected = ref.gemm(ca, sa.numpy(), cw, sw.numpy(), None if bias is None else bias.numpy())
    err = np.abs(y.double().numpy() - expected)
    # fp32 epilogue, then one rounding to out_dtype: twice that rounding bounds the error.
    floor = np.abs(ref.cast(expected, out_dtype) - expected)
    assert (err <= 2 * floor + 1e-6 * (np.abs(expected) + 1)).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_gemm_accumulates_exactly_in_int32(bits):
    # Unit scales and fp32 output expose the integer sum itself.
    g = torch.Generator().manual_seed(0)
    k = 4096
    qa, ca = random_codes(3, k, bits, g)
    qw, cw = random_codes(5, k, bits, g)
    y = ck.gemm(qa, torch.ones(3), qw, torch.ones(5), bits=bits, out_dtype=torch.float32)
    exact = ca.astype(np.int64) @ cw.astype(np.int64).T
    assert (np.abs(exact) < 2**24).all()
    assert (y.numpy() == exact).all()


def test_rotated_quantized_chain_approximates_linear():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 512, generator=g)
    w = torch.randn(24, 512, generator=g) / 512**0.5
    qa, sa = ck.rht_quantize(x, 256, 8)
    qw, sw = ck.rht_quantize(w, 256, 8)
    y = ck.gemm(qa, sa, qw, sw, bits=8, out_dtype=torch.float32)
    expected = x @ w.T
    assert (y - expected).norm() / expected.norm() < 0.02


def test_zero_activation_row_gives_bias_only():
    qw, sw = ck.quantize(torch.randn(6, 64), 4)
    qa, sa = ck.quantize(torch.zeros(2, 64), 4)
    bias = torch.randn(6)
    y = ck.gemm(qa, sa, qw, sw, bias, out_dtype=torch.float32)
    torch.testing.assert_close(y, bias.expand(2, 6), rtol=0, atol=0)
