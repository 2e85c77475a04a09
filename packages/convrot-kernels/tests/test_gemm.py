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
    m=st.integers(0, 17),
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


def test_gemm_rejects_bad_arguments():
    qa = torch.zeros(4, 32, dtype=torch.uint8)
    qw = torch.zeros(6, 32, dtype=torch.uint8)
    sa, sw = torch.ones(4), torch.ones(6)
    with pytest.raises(TypeError, match="qa must have dtype uint8"):
        ck.gemm(qa.to(torch.int8), sa, qw, sw)
    with pytest.raises(TypeError, match="qw must have dtype int8"):
        ck.gemm(qa.to(torch.int8), sa, qw, sw, bits=8)
    with pytest.raises(ValueError, match="same number of columns"):
        ck.gemm(qa, sa, qw[:, :16], sw)
    with pytest.raises(ValueError, match=r"sa must be float32 \[M\]"):
        ck.gemm(qa, torch.ones(5), qw, sw)
    with pytest.raises(TypeError, match="sw must have dtype float32"):
        ck.gemm(qa, sa, qw, sw.half())
    with pytest.raises(ValueError, match=r"bias must be \[N\]"):
        ck.gemm(qa, sa, qw, sw, torch.ones(5))
    with pytest.raises(TypeError, match="out_dtype"):
        ck.gemm(qa, sa, qw, sw, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="qa must be 2-D"):
        ck.gemm(qa[None], sa, qw, sw)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        ck.gemm(qa, sa, qw, sw, bits=2)
    with pytest.raises(ValueError, match="same device"):
        ck.gemm(qa, sa, qw, sw.to("meta"))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gemm_into_writes_what_gemm_returns(bits, out_dtype):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    qa, _ = random_codes(9, 128, bits, g)
    qw, _ = random_codes(20, 128, bits, g)
    sa, sw, bias = torch.rand(9, generator=g), torch.rand(20, generator=g), torch.randn(20, generator=g)
    out = torch.full((9, 20), float("nan"), dtype=out_dtype)
    returned = ck.gemm_into(out, qa, sa, qw, sw, bias, bits=bits)
    assert returned is out
    assert torch.equal(out, ck.gemm(qa, sa, qw, sw, bias, bits=bits, out_dtype=out_dtype))


def test_gemm_into_rejects_what_it_cannot_write():
    qa = torch.zeros(4, 32, dtype=torch.uint8)
    qw = torch.zeros(6, 32, dtype=torch.uint8)
    sa, sw = torch.ones(4), torch.ones(6)
    out = torch.empty(4, 6, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"out must have shape \[4, 6\]"):
        ck.gemm_into(out[:3], qa, sa, qw, sw)
    with pytest.raises(TypeError, match="bias must have dtype float32"):
        ck.gemm_into(out, qa, sa, qw, sw, torch.ones(6, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="qa must have dtype uint8"):
        ck.gemm_into(out, qa.to(torch.int8), sa, qw, sw)
    with pytest.raises(ValueError, match="out must be contiguous"):
        ck.gemm_into(torch.empty(6, 4, dtype=torch.bfloat16).T, qa, sa, qw, sw)
    with pytest.raises(ValueError, match=r"sw must have shape \[6\]"):
        ck.gemm_into(out, qa, sa, qw, torch.ones(5))
    with pytest.raises(ValueError, match="sa is on meta"):
        ck.gemm_into(out, qa, sa.to("meta"), qw, sw)
    with pytest.raises(TypeError, match="out must be a bfloat16, float16 or float32 tensor"):
        ck.gemm_into(out.int(), qa, sa, qw, sw)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        ck.gemm_into(out, qa, sa, qw, sw, bits=2)
    with pytest.raises(ValueError, match="too large for exact int32"):
        ck.gemm_into(
            out, torch.zeros(4, 1 << 17, dtype=torch.int8), sa, torch.zeros(6, 1 << 17, dtype=torch.int8), sw, bits=8
        )
