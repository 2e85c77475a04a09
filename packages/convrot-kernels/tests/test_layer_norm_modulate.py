import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import convrot_kernels as ck

import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def inputs(g: torch.Generator, batch: int, tokens: int, k: int, dtype, prefix_tokens: int = 0):
    """Rows with per-token offsets and spread (as DiT residual streams have), and an AdaLN embedding's chunks."""

    def rows(n):
        return (
            torch.randn(batch, n, k, generator=g) * torch.rand(batch, n, 1, generator=g) * 8
            + torch.randn(batch, n, 1, generator=g) * 4
        )

    emb = (torch.randn(batch, 3 * k, generator=g) * 0.5).to(dtype)
    shift, scale, _ = emb.chunk(3, dim=1)  # strided views, as diffusers passes them
    prefix = rows(prefix_tokens).to(dtype) if prefix_tokens else None
    return rows(tokens).to(dtype), scale, shift, prefix


@given(
    batch=st.integers(1, 2),
    tokens=st.integers(1, 5),
    prefix_tokens=st.integers(0, 3),
    k=st.sampled_from([1, 7, 8, 24, 100, 256, 1000, 3072]),
    dtype=st.sampled_from(DTYPES),
    eps=st.sampled_from([1e-6, 1e-5]),  # eps 0 leaves a constant row 0 / 0 everywhere
    seed=st.integers(0, 2**31 - 1),
)
def test_layer_norm_modulate_error_is_at_most_twice_that_of_torch_in_the_same_precision(
    batch, tokens, prefix_tokens, k, dtype, eps, seed
):
    x, scale, shift, prefix = inputs(torch.Generator().manual_seed(seed), batch, tokens, k, dtype, prefix_tokens)
    y = ck.layer_norm_modulate(x, scale, shift, eps=eps, prefix=prefix)
    assert y.shape == (batch, prefix_tokens + tokens, k) and y.dtype == dtype and y.is_contiguous()
    joint = x if prefix is None else torch.cat([prefix, x], dim=1)
    expected = ref.layer_norm_modulate(joint, scale, shift, eps)
    # Per row: torch sums the mean more precisely than format.md's fixed order, whose rounding the
    # normalisation divides by the row's spread (mean_rounding_bound); elsewhere the rest dominates.
    torch_err = np.abs(ref.layer_norm_modulate_torch(joint, scale, shift, eps).double().numpy() - expected).max(-1)
    err = np.abs(y.double().numpy() - expected).max(-1)
    bound = 2 * torch_err + 1e-6 * (np.abs(expected).max() + 1) + mean_rounding_bound(joint, scale, eps)
    assert (err <= bound).all()


def mean_rounding_bound(joint: torch.Tensor, scale: torch.Tensor, eps: float) -> np.ndarray:
    """What the fp32 mean's rounding can move each row's outputs by: format.md's order rounds a sum
    of a row's K values at most 7 times in a chunk, once per chunk sum in a lane, 5 times in the
    butterfly, then once dividing by K (each a relative 2^-24 of a partial sum at most sum |r|),
    and (r - mean) / std moves by that error / std, times 1 + scale. [B, rows]."""
    v = joint.double().numpy()
    k = v.shape[-1]
    chunks = -(-k // 8)
    roundings = 7 + -(-chunks // 32) + 5 + 1
    mean_error = roundings * 2.0**-24 * np.abs(v).mean(-1)
    std = np.sqrt(v.var(-1) + eps)
    factor = np.abs(1 + scale.double().numpy()).max(-1, keepdims=True)
    return mean_error / std * factor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_modulate_rounds_as_torch_eager_does(dtype):
    # The norm, 1 + scale, the product and the sum each rounded to the dtype, as diffusers'
    # eager AdaLN computes them: only the mean and variance's summation order differs from
    # torch's, which flips a rare last bit. One rounding left out would change many elements.
    x, scale, shift, _ = inputs(torch.Generator().manual_seed(1), 2, 64, 3072, dtype)
    y = ck.layer_norm_modulate(x, scale, shift)
    torch_y = ref.layer_norm_modulate_torch(x, scale, shift, 1e-6)
    assert (y != torch_y).float().mean() < 1e-3
    ulp = torch.finfo(dtype).eps * torch_y.float().abs().clamp_min(1.0)
    assert ((y.float() - torch_y.float()).abs() <= 4 * ulp).all()


def test_a_prefix_gives_the_rows_of_the_joint_sequence():
    x, scale, shift, prefix = inputs(torch.Generator().manual_seed(2), 2, 9, 264, torch.bfloat16, prefix_tokens=4)
    joint = torch.cat([prefix, x], dim=1)
    expected = ck.layer_norm_modulate(joint, scale, shift)
    assert torch.equal(ck.layer_norm_modulate(x, scale, shift, prefix=prefix), expected)


def test_slices_of_a_joint_sequence_and_other_layouts_give_the_same_rows():
    joint, scale, shift, _ = inputs(torch.Generator().manual_seed(5), 3, 13, 264, torch.bfloat16)
    expected = ck.layer_norm_modulate(joint.contiguous(), scale, shift)
    prefix, x = joint[:, :4], joint[:, 4:]  # a Flux single block's outputs: rows contiguous, batches apart
    assert not x.is_contiguous() and not prefix.is_contiguous()
    assert torch.equal(ck.layer_norm_modulate(x, scale, shift, prefix=prefix), expected)
    transposed = joint.transpose(1, 2).contiguous().transpose(1, 2)  # rows not contiguous: copied first
    assert torch.equal(ck.layer_norm_modulate(transposed, scale, shift), expected)


def test_strided_modulation_vectors_are_read_in_place():
    x, scale, shift, _ = inputs(torch.Generator().manual_seed(3), 3, 4, 80, torch.float16)
    assert not scale.is_contiguous()
    expected = ck.layer_norm_modulate(x, scale.contiguous(), shift.contiguous())
    assert torch.equal(ck.layer_norm_modulate(x, scale, shift), expected)


def test_constant_rows_become_the_shift_and_empty_inputs_are_refused():
    x = torch.full((1, 3, 64), 2.5, dtype=torch.bfloat16)
    shift = torch.randn(1, 64).bfloat16()
    assert torch.equal(ck.layer_norm_modulate(x, torch.randn(1, 64).bfloat16(), shift), shift[:, None].expand(1, 3, 64))
    with pytest.raises(ValueError, match=r"x has no rows \(M = 0\)"):
        ck.layer_norm_modulate(torch.zeros(2, 0, 16), torch.zeros(2, 16), torch.zeros(2, 16))


def test_layer_norm_modulate_rejects_bad_arguments():
    x = torch.zeros(2, 4, 16, dtype=torch.bfloat16)
    v = torch.zeros(2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="3-D"):
        ck.layer_norm_modulate(x[0], v, v)
    with pytest.raises(TypeError, match="x must have dtype"):
        ck.layer_norm_modulate(x.double(), v, v)
    with pytest.raises(ValueError, match=r"scale must be \[batch, K\]"):
        ck.layer_norm_modulate(x, v[:1], v)
    with pytest.raises(ValueError, match="shift must be"):
        ck.layer_norm_modulate(x, v, v.float())
    with pytest.raises(ValueError, match="prefix must be"):
        ck.layer_norm_modulate(x, v, v, prefix=torch.zeros(2, 3, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="eps must be"):
        ck.layer_norm_modulate(x, v, v, eps=-1.0)
    with pytest.raises(ValueError, match="at most 262144"):
        ck.layer_norm_modulate(torch.zeros(1, 1, 262145), torch.zeros(1, 262145), torch.zeros(1, 262145))
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        ck.layer_norm_modulate(x, None, v)


def test_layer_norm_modulate_is_a_torch_library_op():
    x, scale, shift, prefix = inputs(torch.Generator().manual_seed(4), 2, 3, 64, torch.bfloat16, prefix_tokens=2)
    torch.library.opcheck(torch.ops.convrot_kernels.layer_norm_modulate.default, (x, scale, shift, 1e-6, prefix))
