import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layer_norm_modulate import DTYPES, inputs

import convrot_kernels as ck


def composed(x, scale, shift, prefix, group, bits, eps=1e-6):
    normed = ck.layer_norm_modulate(x, scale, shift, eps=eps, prefix=prefix).flatten(0, 1)
    return ck.rht_quantize(normed, group, bits) if group else ck.quantize(normed, bits)


@settings(deadline=None)
@given(
    batch=st.integers(1, 2),
    tokens=st.integers(1, 4),
    prefix_tokens=st.integers(0, 3),
    k_group=st.sampled_from([(16, 4), (64, 16), (256, 64), (1024, 256), (3072, 256), (24, 0)]),
    bits=st.sampled_from([4, 8]),
    dtype=st.sampled_from(DTYPES),
    eps=st.sampled_from([1e-6, 1e-5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_codes_equal_rht_quantize_of_layer_norm_modulate(batch, tokens, prefix_tokens, k_group, bits, dtype, eps, seed):
    k, group = k_group
    x, scale, shift, prefix = inputs(torch.Generator().manual_seed(seed), batch, tokens, k, dtype, prefix_tokens)
    q, q_scale = ck.layer_norm_modulate_rht_quantize(
        x, scale, shift, eps=eps, prefix=prefix, group_size=group, bits=bits
    )
    rows = batch * (prefix_tokens + tokens)
    assert q.shape == (rows, k // 2 if bits == 4 else k) and q_scale.shape == (rows,)
    expected_q, expected_scale = composed(x, scale, shift, prefix, group, bits, eps)
    assert torch.equal(q_scale, expected_scale)
    assert torch.equal(q, expected_q)


def test_slices_of_a_joint_sequence_are_read_in_place():
    joint, scale, shift, _ = inputs(torch.Generator().manual_seed(5), 3, 13, 256, torch.bfloat16)
    prefix, x = joint[:, :4], joint[:, 4:]  # a Flux single block's outputs: rows contiguous, batches apart
    assert not x.is_contiguous() and not scale.is_contiguous()
    got = ck.layer_norm_modulate_rht_quantize(x, scale, shift, prefix=prefix)
    expected = composed(joint.contiguous(), scale.contiguous(), shift.contiguous(), None, 256, 4)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_constant_rows_quantize_the_shift_and_empty_inputs_are_refused():
    x = torch.full((1, 3, 64), 2.5, dtype=torch.bfloat16)
    shift = torch.randn(1, 64).bfloat16()
    q, q_scale = ck.layer_norm_modulate_rht_quantize(x, torch.randn(1, 64).bfloat16(), shift, group_size=64)
    expected = ck.rht_quantize(shift.expand(3, 64).contiguous(), 64)
    assert torch.equal(q, expected[0]) and torch.equal(q_scale, expected[1])
    with pytest.raises(ValueError, match=r"x has no rows \(M = 0\)"):
        empty, v = torch.zeros(2, 0, 16), torch.zeros(2, 16)
        ck.layer_norm_modulate_rht_quantize(empty, v, v, group_size=16)


def test_layer_norm_modulate_rht_quantize_rejects_bad_arguments():
    x = torch.zeros(2, 4, 64, dtype=torch.bfloat16)
    v = torch.zeros(2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="3-D"):
        ck.layer_norm_modulate_rht_quantize(x[0], v, v)
    with pytest.raises(ValueError, match=r"scale must be \[batch, K\]"):
        ck.layer_norm_modulate_rht_quantize(x, v[:1], v)
    with pytest.raises(ValueError, match="prefix must be"):
        ck.layer_norm_modulate_rht_quantize(x, v, v, prefix=torch.zeros(2, 3, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="eps must be"):
        ck.layer_norm_modulate_rht_quantize(x, v, v, eps=-1.0)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        ck.layer_norm_modulate_rht_quantize(x, v, v, bits=2)
    with pytest.raises(ValueError, match="multiple of group_size"):
        ck.layer_norm_modulate_rht_quantize(x, v, v, group_size=256)
    with pytest.raises(ValueError, match="must be even"):
        odd = torch.zeros(1, 2, 7)
        ck.layer_norm_modulate_rht_quantize(odd, torch.zeros(1, 7), torch.zeros(1, 7), group_size=0)


def test_layer_norm_modulate_rht_quantize_is_a_torch_library_op():
    x, scale, shift, prefix = inputs(torch.Generator().manual_seed(4), 2, 3, 64, torch.bfloat16, prefix_tokens=2)
    torch.library.opcheck(
        torch.ops.convrot_kernels.layer_norm_modulate_rht_quantize.default, (x, scale, shift, 1e-6, prefix, 16, 4)
    )


@settings(deadline=None)
@given(
    batch=st.integers(1, 2),
    tokens=st.integers(1, 4),
    k_group=st.sampled_from([(16, 4), (256, 64), (3072, 256), (24, 0)]),
    bits=st.sampled_from([4, 8]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_residual_form_equals_the_sum_then_the_fused_norm(batch, tokens, k_group, bits, dtype, seed):
    k, group = k_group
    g = torch.Generator().manual_seed(seed)
    x, scale, shift, _ = inputs(g, batch, tokens, k, dtype)
    branch = (torch.randn(batch, tokens, k, generator=g) * 3).to(dtype)
    gate = (torch.randn(batch, 6 * k, generator=g)).to(dtype)[:, 2 * k : 3 * k]  # a chunk, as diffusers passes it
    total, q, q_scale = ck.residual_layer_norm_modulate_rht_quantize(
        x, branch, gate, scale, shift, group_size=group, bits=bits
    )
    expected_total = x + gate.unsqueeze(1) * branch  # diffusers' eager ops, each rounded to the dtype
    assert total.is_contiguous() and torch.equal(total, expected_total)
    expected_q, expected_scale = composed(expected_total, scale, shift, None, group, bits)
    assert torch.equal(q_scale, expected_scale)
    assert torch.equal(q, expected_q)


def test_residual_layer_norm_modulate_rht_quantize_rejects_bad_arguments():
    x = torch.zeros(2, 4, 64, dtype=torch.bfloat16)
    v = torch.zeros(2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"branch must be \[2, 4, 64\]"):
        ck.residual_layer_norm_modulate_rht_quantize(x, x[:, :3], v, v, v, group_size=64)
    with pytest.raises(ValueError, match="gate must be"):
        ck.residual_layer_norm_modulate_rht_quantize(x, x, v.float(), v, v, group_size=64)
    with pytest.raises(TypeError, match="branch must be a torch.Tensor"):
        ck.residual_layer_norm_modulate_rht_quantize(x, None, v, v, v, group_size=64)
    with pytest.raises(ValueError, match="shift must be"):
        ck.residual_layer_norm_modulate_rht_quantize(x, x, v, v, v[:1], group_size=64)


def test_residual_layer_norm_modulate_rht_quantize_is_a_torch_library_op():
    x, scale, shift, _ = inputs(torch.Generator().manual_seed(6), 2, 3, 64, torch.bfloat16)
    branch, gate = torch.randn(2, 3, 64).bfloat16(), torch.randn(2, 64).bfloat16()
    torch.library.opcheck(
        torch.ops.convrot_kernels.residual_layer_norm_modulate_rht_quantize.default,
        (x, branch, gate, scale, shift, 1e-6, 16, 4),
    )
