"""gemm with weight and activation widths apart (W4A8) and group-scaled 4-bit weights,
against docs/format.md's GEMM computed here in float64."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import convrot_kernels as ck

import reference as ref

# (weight_bits, act_bits, group-scaled): every scheme docs/format.md lists.
SCHEMES = [(4, 4, False), (8, 8, False), (4, 8, False), (4, 4, True), (4, 8, True)]


def random_codes(rows, k, bits, g, lowest=None):
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax - 1, qmax + 1, (rows, k), dtype=torch.int8, generator=g)
    return (ck.pack_int4(codes) if bits == 4 else codes), codes.numpy()


def random_operands(m, n, k, scheme, g):
    """(qa, codes of qa, qw, group_scale or None, decoded weights) of a scheme."""
    weight_bits, act_bits, grouped = scheme
    qa, ca = random_codes(m, k, act_bits, g)
    qw, cw = random_codes(n, k, weight_bits, g)
    group_scale = None
    if grouped:
        group_scale = torch.randint(1, 17, (n, k // 64), dtype=torch.uint8, generator=g)
        cw = cw.astype(np.int64) * np.repeat(group_scale.numpy().astype(np.int64), 64, axis=1)
    return qa, ca, qw, group_scale, cw


@given(
    m=st.integers(1, 17),
    n=st.integers(1, 17),
    groups=st.integers(1, 4),
    scheme=st.sampled_from(SCHEMES),
    out_dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_scheme_matches_float64_reference(m, n, groups, scheme, out_dtype, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    k = 64 * groups
    qa, ca, qw, group_scale, cw = random_operands(m, n, k, scheme, g)
    sa = torch.rand(m, generator=g) * 0.1
    sw = torch.rand(n, generator=g) * 0.1
    bias = torch.randn(n, generator=g) if with_bias else None
    weight_bits, act_bits, _ = scheme
    y = ck.gemm(
        qa, sa, qw, sw, bias, weight_bits=weight_bits, act_bits=act_bits, group_scale=group_scale, out_dtype=out_dtype
    )
    assert y.shape == (m, n) and y.dtype == out_dtype
    expected = ref.gemm(ca, sa.numpy(), cw, sw.numpy(), None if bias is None else bias.numpy())
    err = np.abs(y.double().numpy() - expected)
    floor = np.abs(ref.cast(expected, out_dtype) - expected)
    assert (err <= 2 * floor + 1e-6 * (np.abs(expected) + 1)).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_extreme_codes_accumulate_exactly(scheme):
    # Every code at its lowest and every multiplier 16: the largest sums the scheme allows.
    weight_bits, act_bits, grouped = scheme
    m, n, k = 3, 5, 15360
    codes_a = torch.full((m, k), -(2 ** (act_bits - 1)), dtype=torch.int8)
    codes_w = torch.full((n, k), -(2 ** (weight_bits - 1)), dtype=torch.int8)
    qa = ck.pack_int4(codes_a) if act_bits == 4 else codes_a
    qw = ck.pack_int4(codes_w) if weight_bits == 4 else codes_w
    group_scale = torch.full((n, k // 64), 16, dtype=torch.uint8) if grouped else None
    y = ck.gemm(
        qa,
        torch.ones(m),
        qw,
        torch.ones(n),
        weight_bits=weight_bits,
        act_bits=act_bits,
        group_scale=group_scale,
        out_dtype=torch.float32,
    )
    weight = -(2 ** (weight_bits - 1)) * (16 if grouped else 1)
    assert (y == float(-(2 ** (act_bits - 1)) * weight * k)).all()


def test_plain_schemes_through_the_new_keywords_are_todays_gemm():
    g = torch.Generator().manual_seed(3)
    for bits in (4, 8):
        qa, _ = random_codes(7, 320, bits, g)
        qw, _ = random_codes(9, 320, bits, g)
        sa, sw = torch.rand(7, generator=g), torch.rand(9, generator=g)
        assert torch.equal(ck.gemm(qa, sa, qw, sw, bits=bits), ck.gemm(qa, sa, qw, sw, weight_bits=bits, act_bits=bits))


def test_scheme_arguments_are_checked():
    g = torch.Generator().manual_seed(0)
    qa8, _ = random_codes(4, 128, 8, g)
    qa4, _ = random_codes(4, 128, 4, g)
    qw4, _ = random_codes(6, 128, 4, g)
    qw8, _ = random_codes(6, 128, 8, g)
    sa, sw = torch.ones(4), torch.ones(6)
    ones = torch.ones(6, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="8-bit weights take 8-bit activations"):
        ck.gemm(qa4, sa, qw8, sw, weight_bits=8, act_bits=4)
    with pytest.raises(TypeError, match="qa must have dtype int8"):
        ck.gemm(qa4, sa, qw4, sw, weight_bits=4, act_bits=8)
    with pytest.raises(ValueError, match="same number of columns K"):
        ck.gemm(qa8[:, :64], sa, qw4, sw, weight_bits=4, act_bits=8)
    with pytest.raises(ValueError, match="4-bit weights"):
        ck.gemm(qa8, sa, qw8, sw, bits=8, group_scale=ones)
    with pytest.raises(ValueError, match=r"\[6, 2\]"):
        ck.gemm(qa8, sa, qw4, sw, weight_bits=4, act_bits=8, group_scale=ones[:, :1])
    with pytest.raises(TypeError, match="group_scale must have dtype uint8"):
        ck.gemm(qa8, sa, qw4, sw, weight_bits=4, act_bits=8, group_scale=ones.to(torch.int8))
    qa_odd, _ = random_codes(4, 96, 8, g)
    qw_odd, _ = random_codes(6, 96, 4, g)
    with pytest.raises(ValueError, match="multiple of 64"):
        ck.gemm(qa_odd, sa, qw_odd, sw, weight_bits=4, act_bits=8, group_scale=ones)
