"""Quantized GEMM with the dequantization (and bias) in its epilogue."""

from __future__ import annotations

import torch

from . import _C
from ._validation import (
    FLOAT_CODES,
    FLOAT_DTYPES,
    device_index,
    eager_or_traced,
    require_bits,
    require_dtype,
    require_ndim,
    require_rows,
    require_shape,
    require_tensor,
    stream,
)

CODE_DTYPES = {4: torch.uint8, 8: torch.int8}
WEIGHT_GROUP = 64  # codes per multiplier of group-scaled weights (docs/format.md)
# Largest K for which the int32 accumulator cannot overflow, by (weight bits, activation bits,
# group-scaled): max |qa| * max |decoded weight| * K < 2^31 (docs/format.md).
MAX_K = {
    (4, 4, False): (1 << 25) - 1,
    (4, 8, False): (1 << 21) - 1,
    (4, 4, True): (1 << 21) - 1,
    (4, 8, True): (1 << 17) - 1,
    (8, 8, False): (1 << 17) - 1,
}


def check_scheme(bits: object, weight_bits: object, act_bits: object) -> tuple[int, int]:
    """(weight bits, activation bits): each ``bits`` unless given apart; W8A4 is no scheme."""
    bits = require_bits(bits)
    weight_bits = bits if weight_bits is None else require_bits(weight_bits)
    act_bits = bits if act_bits is None else require_bits(act_bits)
    if weight_bits == 8 and act_bits == 4:
        raise ValueError("8-bit weights take 8-bit activations (docs/format.md): use act_bits=8")
    return weight_bits, act_bits


def check_weight_codes(
    qw, sw, bias, weight_bits: int, act_bits: int, group_scale=None, names: tuple[str, str] = ("qw", "sw")
) -> tuple[int, int]:
    """Checks a layer's weight operands (named `names` in errors): qw [N, K/2] uint8 (4-bit) or
    [N, K] int8 (8-bit), sw float32 [N], bias None or any float dtype [N], group_scale None or the
    multipliers of group-scaled 4-bit weights, uint8 [N, K/64]. Returns (N, K)."""
    codes, scales = names
    require_tensor(codes, qw)
    require_dtype(codes, qw, (CODE_DTYPES[weight_bits],))
    require_ndim(codes, qw, 2, "[N, K/2]" if weight_bits == 4 else "[N, K]")
    n, width = qw.shape
    k = width * 2 if weight_bits == 4 else width
    if group_scale is not None:
        require_tensor("group_scale", group_scale)
        if weight_bits != 4:
            raise ValueError("group_scale goes with 4-bit weights (weight_bits=4)")
        if k % WEIGHT_GROUP:
            raise ValueError(f"group-scaled weights need K a multiple of {WEIGHT_GROUP}; got K = {k}")
        require_dtype("group_scale", group_scale, (torch.uint8,))
        require_shape("group_scale", group_scale, (n, k // WEIGHT_GROUP), "uint8 [N, K/64]")
    max_k = MAX_K[(weight_bits, act_bits, group_scale is not None)]
    if k > max_k:
        raise ValueError(f"K = {k} is too large for exact int32 accumulation of this scheme (max {max_k})")
    require_tensor(scales, sw)
    require_dtype(scales, sw, (torch.float32,))
    require_shape(scales, sw, (n,), "float32 [N]")
    if bias is not None:
        require_tensor("bias", bias)
        require_dtype("bias", bias, FLOAT_DTYPES)
        require_shape("bias", bias, (n,), "[N]")
    return n, k


def fp32_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The epilogue's bias operand: contiguous float32 (layers keep theirs so; a cast costs a kernel)."""
    if bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()):
        return bias
    return bias.to(torch.float32).contiguous()


def gemm_rows(
    qa, sa, qw, sw, bias, group_scale, weight_bits: int, act_bits: int, out_dtype: torch.dtype, k: int, device: int
) -> torch.Tensor:
    """The kernel on checked, contiguous operands (bias float32 or None)."""
    m, n = qa.shape[0], qw.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=qa.device)
    _C.gemm(
        qa.data_ptr(),
        sa.data_ptr(),
        qw.data_ptr(),
        sw.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        FLOAT_CODES[out_dtype],
        m,
        n,
        k,
        weight_bits,
        act_bits,
        0 if group_scale is None else group_scale.data_ptr(),
        device,
        stream(device),
    )
    return out


def _gemm(
    qa: torch.Tensor,
    sa: torch.Tensor,
    qw: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None,
    group_scale: torch.Tensor | None,
    weight_bits: int,
    act_bits: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    k = qa.shape[1] * (2 if act_bits == 4 else 1)
    return gemm_rows(qa, sa, qw, sw, bias, group_scale, weight_bits, act_bits, out_dtype, k, qa.get_device())


_gemm_op = torch.library.custom_op("convrot_kernels::gemm", _gemm, mutates_args=())


@_gemm_op.register_fake
def _(qa, sa, qw, sw, bias, group_scale, weight_bits, act_bits, out_dtype):
    return qa.new_empty((qa.shape[0], qw.shape[0]), dtype=out_dtype)


def gemm(
    qa: torch.Tensor,
    sa: torch.Tensor,
    qw: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bits: int = 4,
    out_dtype: torch.dtype = torch.bfloat16,
    weight_bits: int | None = None,
    act_bits: int | None = None,
    group_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[m, n] = (sum_k qa[m, k] w[n, k]) * sa[m] * sw[n] + bias[n], w the weight codes qw (times
    their group's multiplier for group-scaled weights).

    qa [M, K/2] and qw [N, K/2] are uint8 packed 4-bit codes (bits=4) or qa
    [M, K] and qw [N, K] int8 codes (bits=8); sa float32 [M], sw float32 [N];
    bias [N] of any float dtype (used in float32). Accumulation is exact int32,
    the epilogue fp32, the result out_dtype [M, N].

    ``weight_bits`` and ``act_bits`` (default: ``bits``) give the two operands' widths apart:
    ``weight_bits=4, act_bits=8`` is W4A8 (qw packed 4-bit, qa int8 [M, K]). ``group_scale``
    (uint8 [N, K/64], values 1..16) makes 4-bit weights group-scaled: each code is multiplied
    by its group's multiplier before the int8 product (docs/format.md).
    """
    weight_bits, act_bits = check_scheme(bits, weight_bits, act_bits)
    n, k = check_weight_codes(qw, sw, bias, weight_bits, act_bits, group_scale)
    require_tensor("qa", qa)
    require_dtype("qa", qa, (CODE_DTYPES[act_bits],))
    require_ndim("qa", qa, 2, "[M, K/2]" if act_bits == 4 else "[M, K]")
    if qa.shape[1] * (2 if act_bits == 4 else 1) != k:
        raise ValueError(
            f"qa ({act_bits}-bit codes, {tuple(qa.shape)}) and qw ({weight_bits}-bit codes, {tuple(qw.shape)}) "
            "must hold the same number of columns K"
        )
    m = qa.shape[0]
    require_rows("qa", m)
    require_tensor("sa", sa)
    require_dtype("sa", sa, (torch.float32,))
    require_shape("sa", sa, (m,), "float32 [M]")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of float32, float16, bfloat16; got {out_dtype}")
    device_index(qa=qa, sa=sa, qw=qw, sw=sw, bias=bias, group_scale=group_scale)
    run = eager_or_traced(_gemm_op, _gemm)
    operands = (qa.contiguous(), sa.contiguous(), qw.contiguous(), sw.contiguous(), fp32_bias(bias))
    group_scale = None if group_scale is None else group_scale.contiguous()
    return run(*operands, group_scale, weight_bits, act_bits, out_dtype)
