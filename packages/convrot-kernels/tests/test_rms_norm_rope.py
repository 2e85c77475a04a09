import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import convrot_kernels as ck

import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def inputs(g: torch.Generator, shape, dtype, weighted=True, rotated=True):
    """x with per-row offsets and spread (as q/k rows have), a weight and a token's angles."""
    b, s, h, d = shape
    spread, offset = torch.rand(b, s, h, 1, generator=g) * 8, torch.randn(b, s, h, 1, generator=g)
    x = torch.randn(shape, generator=g) * spread + offset
    weight = (torch.randn(d, generator=g) * 0.5 + 1).to(dtype) if weighted else None
    angles = torch.rand(s, d // 2, generator=g).double() * torch.logspace(0, -4, d // 2).double() * s
    cos = angles.cos().repeat_interleave(2, dim=1).float() if rotated else None
    sin = angles.sin().repeat_interleave(2, dim=1).float() if rotated else None
    return x.to(dtype), weight, cos, sin


@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 9), st.integers(1, 5), st.sampled_from([2, 6, 64, 96, 128, 256])),
    dtype=st.sampled_from(DTYPES),
    weighted=st.booleans(),
    rotated=st.booleans(),
    eps=st.sampled_from([1e-6, 1e-5, 0.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rms_norm_rope_error_is_at_most_twice_that_of_torch_in_the_same_precision(
    shape, dtype, weighted, rotated, eps, seed
):
    x, weight, cos, sin = inputs(torch.Generator().manual_seed(seed), shape, dtype, weighted, rotated)
    y = ck.rms_norm_rope(x, weight, cos, sin, eps=eps)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    expected = ref.rms_norm_rope(x, weight, cos, sin, eps)
    err = np.abs(y.double().numpy() - expected).max()
    torch_err = np.abs(ref.rms_norm_rope_torch(x, weight, cos, sin, eps).double().numpy() - expected).max()
    assert err <= 2 * torch_err + 1e-6 * (np.abs(expected).max() + 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_rope_rounds_as_torch_rms_norm_and_diffusers_rope_do(dtype):
    # Same operations, same roundings: only the mean square's summation order and the
    # reciprocal square root may differ from torch's, which flips a rare last bit of a
    # normalised value; the rotation carries it into both elements of its pair.
    x, weight, cos, sin = inputs(torch.Generator().manual_seed(1), (2, 64, 6, 128), dtype)
    y = ck.rms_norm_rope(x, weight, cos, sin)
    torch_y = ref.rms_norm_rope_torch(x, weight, cos, sin, 1e-6)
    assert (y != torch_y).float().mean() < 1e-3
    pair = torch_y.float().unflatten(-1, (-1, 2)).norm(dim=-1).repeat_interleave(2, dim=-1)
    assert ((y.float() - torch_y.float()).abs() <= 2 * torch.finfo(dtype).eps * pair).all()


def test_rms_norm_rope_reads_strided_rows_and_writes_into_a_slice():
    # q out of a fused qkv projection (row stride 3 * heads * dim), written into the image
    # part of a joint [text + image] buffer: the text part must stay as it was.
    b, s, h, d, text = 2, 7, 3, 64, 4
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(b, s, 3 * h * d, generator=g).to(torch.bfloat16)
    q = qkv.chunk(3, dim=-1)[0].unflatten(-1, (h, d))
    _, weight, cos, sin = inputs(g, (b, s, h, d), torch.bfloat16)
    joint = torch.full((b, text + s, h, d), 7.0, dtype=torch.bfloat16)
    out = ck.rms_norm_rope_into(q, joint[:, text:], weight, cos, sin)
    assert out.data_ptr() == joint[:, text:].data_ptr()
    assert torch.equal(joint[:, text:], ck.rms_norm_rope(q.contiguous(), weight, cos, sin))
    assert (joint[:, :text] == 7.0).all()


def test_rms_norm_rope_in_place():
    x, weight, cos, sin = inputs(torch.Generator().manual_seed(3), (1, 5, 4, 128), torch.float16)
    expected = ck.rms_norm_rope(x, weight, cos, sin)
    assert torch.equal(ck.rms_norm_rope_into(x, x, weight, cos, sin), expected)


def test_rms_norm_rope_of_a_zero_row_is_zero_and_empty_inputs_are_refused():
    x = torch.zeros(1, 2, 3, 64, dtype=torch.bfloat16)
    _, weight, cos, sin = inputs(torch.Generator().manual_seed(4), (1, 2, 3, 64), torch.bfloat16)
    assert (ck.rms_norm_rope(x, weight, cos, sin, eps=1e-6) == 0).all()
    with pytest.raises(ValueError, match=r"x has no rows \(M = 0\)"):
        ck.rms_norm_rope(torch.zeros(0, 2, 3, 64), None, cos, sin)


def test_rms_norm_rope_rejects_bad_arguments():
    x = torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16)
    w = torch.ones(8, dtype=torch.bfloat16)
    c = torch.ones(4, 8)
    with pytest.raises(ValueError, match="4-D"):
        ck.rms_norm_rope(x[0], w, c, c)
    with pytest.raises(TypeError, match="x must have dtype"):
        ck.rms_norm_rope(x.double(), None, c, c)
    with pytest.raises(ValueError, match="must be even"):
        ck.rms_norm_rope(torch.zeros(1, 4, 2, 7), None)
    with pytest.raises(ValueError, match="weight must be"):
        ck.rms_norm_rope(x, w.float(), c, c)
    with pytest.raises(ValueError, match="given together"):
        ck.rms_norm_rope(x, w, c, None)
    with pytest.raises(ValueError, match=r"cos must be float32 \[tokens, head_dim\]"):
        ck.rms_norm_rope(x, w, c[:3], c[:3])
    with pytest.raises(ValueError, match="sin must be float32"):
        ck.rms_norm_rope(x, w, c, c.double())
    with pytest.raises(ValueError, match="eps must be"):
        ck.rms_norm_rope(x, w, c, c, eps=-1.0)
    with pytest.raises(ValueError, match="out must have x's shape"):
        ck.rms_norm_rope_into(x, torch.zeros(1, 4, 2, 8), w, c, c)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        ck.rms_norm_rope_into(x, torch.zeros(1, 4, 8, 2, dtype=torch.bfloat16).transpose(2, 3), w, c, c)
    with pytest.raises(ValueError, match="cos must be contiguous"):
        ck.rms_norm_rope_into(x, torch.empty_like(x), w, torch.ones(8, 4).T, c)


def test_rms_norm_rope_is_a_torch_library_op():
    x, weight, cos, sin = inputs(torch.Generator().manual_seed(5), (1, 3, 2, 64), torch.bfloat16)
    torch.library.opcheck(torch.ops.convrot_kernels.rms_norm_rope.default, (x, weight, cos, sin, 1e-6))


@pytest.mark.parametrize("rotated", [True, False])
def test_a_prefix_gives_the_joint_sequence_of_both_streams(rotated):
    g = torch.Generator().manual_seed(6)
    text, image = 3, 5
    x, weight, cos, sin = inputs(g, (2, text + image, 4, 64), torch.bfloat16, rotated=rotated)
    prefix, own = x[:, :text], x[:, text:]
    prefix_weight = (torch.randn(64, generator=g) * 0.5 + 1).bfloat16()
    got = ck.rms_norm_rope(own, weight, cos, sin, eps=1e-5, prefix=prefix, prefix_weight=prefix_weight, prefix_eps=1e-6)

    def part(t, w, lo, hi, eps):
        return ck.rms_norm_rope(t, w, *((None, None) if cos is None else (cos[lo:hi], sin[lo:hi])), eps=eps)

    expected = torch.cat([part(prefix, prefix_weight, 0, text, 1e-6), part(own, weight, text, text + image, 1e-5)], 1)
    assert got.is_contiguous() and torch.equal(got, expected)
    torch.library.opcheck(
        torch.ops.convrot_kernels.rms_norm_rope.default, (own, weight, cos, sin, 1e-5, prefix, prefix_weight, 1e-6)
    )


def test_a_prefix_is_checked():
    x = torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16)
    c = torch.ones(6, 8)
    with pytest.raises(ValueError, match="prefix must be"):
        ck.rms_norm_rope(x, None, c, c, prefix=torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"cos must be float32 \[tokens, head_dim\] = \[6, 8\]"):
        ck.rms_norm_rope(x, None, c[:4], c[:4], prefix=x[:, :2])
    with pytest.raises(ValueError, match="prefix_weight must be"):
        ck.rms_norm_rope(x, None, c, c, prefix=x[:, :2], prefix_weight=torch.ones(8))
    with pytest.raises(ValueError, match="prefix_eps must be"):
        ck.rms_norm_rope(x, None, c, c, prefix=x[:, :2], prefix_eps=-1.0)
    with pytest.raises(ValueError, match="prefix_weight needs a prefix"):
        ck.rms_norm_rope(x, None, c[:4], c[:4], prefix_weight=torch.ones(8, dtype=torch.bfloat16))
