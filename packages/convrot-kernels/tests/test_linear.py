"""convrot_kernels.linear: a quantized layer in one call, equal to its two kernels bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import convrot_kernels as ck

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def weight_codes(n: int, k: int, bits: int, group_size: int, g: torch.Generator):
    w = torch.randn(n, k, generator=g)
    return ck.rht_quantize(w, group_size, bits) if group_size else ck.quantize(w, bits)


@settings(deadline=None, max_examples=40)
@given(
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    n=st.integers(1, 40),
    groups=st.integers(1, 3),
    group_size=st.sampled_from([0, 16, 64]),
    bits=st.sampled_from([4, 8]),
    dtype=st.sampled_from(DTYPES),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_equals_the_gemm_of_the_quantized_rows(lead, n, groups, group_size, bits, dtype, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    k = groups * (group_size or 32)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    qw, sw = weight_codes(n, k, bits, group_size, g)
    bias = torch.randn(n, generator=g) if with_bias else None
    y = ck.linear(x, qw, sw, bias, bits=bits, group_size=group_size)
    qa, sa = ck.rht_quantize(x.reshape(-1, k), group_size, bits)
    expected = ck.gemm(qa, sa, qw, sw, bias, bits=bits, out_dtype=dtype)
    assert y.shape == (*lead, n) and y.dtype == dtype
    assert torch.equal(y.reshape(-1, n), expected)


@pytest.mark.parametrize("bits", [4, 8])
def test_an_input_in_parts_is_its_concatenation(bits):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(2, 5, 256, generator=g, dtype=torch.bfloat16)
    qw, sw = weight_codes(24, 256, bits, 64, g)
    y = ck.linear(x[..., :64], qw, sw, bits=bits, group_size=64, x2=x[..., 64:], gelu_from=128)
    rows = x.reshape(-1, 256)
    qa, sa = ck.rht_quantize(rows[:, :64].contiguous(), 64, bits, x2=rows[:, 64:].contiguous(), gelu_from=128)
    assert torch.equal(y.reshape(-1, 24), ck.gemm(qa, sa, qw, sw, bits=bits, out_dtype=torch.bfloat16))


def test_a_non_float32_bias_is_used_in_float32():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, generator=g)
    qw, sw = weight_codes(8, 64, 4, 64, g)
    bias = torch.randn(8, generator=g).bfloat16()
    assert torch.equal(ck.linear(x, qw, sw, bias, group_size=64), ck.linear(x, qw, sw, bias.float(), group_size=64))


@pytest.mark.parametrize("bits", [4, 8])
def test_linear_is_a_torch_library_op(bits):
    g = torch.Generator().manual_seed(5)
    qw, sw = weight_codes(16, 64, bits, 16, g)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    for args in (
        (x, qw, sw, torch.randn(16), None, bits, bits, 16),
        (x, qw, sw, None, None, bits, bits, 0),
        (x[..., :16], qw, sw, None, None, bits, bits, 16, x[..., 16:].contiguous(), 32),
    ):
        torch.library.opcheck(torch.ops.convrot_kernels.linear.default, args)
    compiled = torch.compile(lambda a: ck.linear(a, qw, sw, bits=bits, group_size=16), fullgraph=True)
    assert torch.equal(compiled(x), ck.linear(x, qw, sw, bits=bits, group_size=16))


@pytest.mark.parametrize("bits", [4, 8])
def test_rht_quantize_and_gemm_are_torch_library_ops(bits):
    x = torch.randn(6, 128, dtype=torch.float16)
    torch.library.opcheck(torch.ops.convrot_kernels.rht_quantize.default, (x, 64, bits))
    torch.library.opcheck(
        torch.ops.convrot_kernels.rht_quantize.default, (x[:, :64].contiguous(), 16, bits, x[:, 64:].contiguous(), 64)
    )
    qa, sa = ck.rht_quantize(x, 64, bits)
    qw, sw = ck.rht_quantize(torch.randn(10, 128), 64, bits)
    for bias in (torch.randn(10), None):
        args = (qa, sa, qw, sw, bias, None, bits, bits, torch.bfloat16)
        torch.library.opcheck(torch.ops.convrot_kernels.gemm.default, args)
