"""Quantized GEMM with the dequantization (and bias) in its epilogue."""

from __future__ import annotations

import torch

from . import _C
from ._validation import (
    FLOAT_CODES,
    FLOAT_DTYPES,
    OUT_DTYPES,
    on_device,
    require_bits,
    require_dtype,
    require_ndim,
    require_operand,
    require_same_device,
    require_tensor,
    stream_of,
)

# Largest K for which the int32 accumulator cannot overflow (docs/format.md).
MAX_K = {4: (1 << 25) - 1, 8: (1 << 17) - 1}


@torch.library.custom_op("convrot_kernels::gemm", mutates_args=())
def _gemm(
    qa: torch.Tensor,
    sa: torch.Tensor,
    qw: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    out = torch.empty((qa.shape[0], qw.shape[0]), dtype=out_dtype, device=qa.device)
    _C.gemm(qa, sa, qw, sw, bias, out, bits, stream_of(qa))
    return out


@_gemm.register_fake
def _(qa, sa, qw, sw, bias, bits, out_dtype):
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
    """y[m, n] = (sum_k qa[m, k] qw[n, k]) * sa[m] * sw[n] + bias[n].

    qa [M, K/2] and qw [N, K/2] are uint8 packed 4-bit codes (bits=4) or qa
    [M, K] and qw [N, K] int8 codes (bits=8); sa float32 [M], sw float32 [N];
    bias [N] of any float dtype (used in float32). Accumulation is exact int32,
    the epilogue fp32, the result out_dtype [M, N].

    ``weight_bits`` and ``act_bits`` (default: ``bits``) give the two operands' widths apart:
    ``weight_bits=4, act_bits=8`` is W4A8 (qw packed 4-bit, qa int8 [M, K]). ``group_scale``
    (uint8 [N, K/64], values 1..16) makes 4-bit weights group-scaled: each code is multiplied
    by its group's multiplier before the int8 product (docs/format.md).
    """
    if weight_bits is not None or act_bits is not None or group_scale is not None:
        return _scheme_gemm(qa, sa, qw, sw, bias, bits, out_dtype, weight_bits, act_bits, group_scale)
    bits = require_bits(bits)
    code_dtype = torch.uint8 if bits == 4 else torch.int8
    for name, t in (("qa", qa), ("qw", qw)):
        require_tensor(name, t)
        require_dtype(name, t, (code_dtype,))
    require_ndim("qa", qa, 2, "[M, K/2]" if bits == 4 else "[M, K]")
    require_ndim("qw", qw, 2, "[N, K/2]" if bits == 4 else "[N, K]")
    if qa.shape[1] != qw.shape[1]:
        raise ValueError(f"qa and qw must have the same number of columns; got {tuple(qa.shape)} and {tuple(qw.shape)}")
    k = qa.shape[1] * (2 if bits == 4 else 1)
    if k > MAX_K[bits]:
        raise ValueError(f"K = {k} is too large for exact int32 accumulation of {bits}-bit codes (max {MAX_K[bits]})")
    m, n = qa.shape[0], qw.shape[0]
    for name, t, size, dim in (("sa", sa, m, "M"), ("sw", sw, n, "N")):
        require_tensor(name, t)
        require_dtype(name, t, (torch.float32,))
        if t.shape != (size,):
            raise ValueError(f"{name} must be float32 [{dim}] = [{size}]; got shape {tuple(t.shape)}")
    if bias is not None:
        require_tensor("bias", bias)
        require_dtype("bias", bias, FLOAT_DTYPES)
        if bias.shape != (n,):
            raise ValueError(f"bias must be [N] = [{n}]; got shape {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of bfloat16, float16, float32; got {out_dtype}")
    require_same_device(qa=qa, sa=sa, qw=qw, sw=sw, bias=bias)
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    return _gemm(qa.contiguous(), sa.contiguous(), qw.contiguous(), sw.contiguous(), bias, bits, out_dtype)


def gemm_into(
    out: torch.Tensor,
    qa: torch.Tensor,
    sa: torch.Tensor,
    qw: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bits: int = 4,
) -> torch.Tensor:
    """Destination-passing :func:`gemm`: writes y into ``out`` (contiguous [M, N] bfloat16,
    float16 or float32) and returns it.

    For hot paths such as a layer's forward: every operand must already be contiguous, of its
    exact dtype (``bias`` float32) and on one device; those checks are all it does (each
    failure a ValueError or TypeError naming the argument), and it allocates nothing. It runs
    eagerly on the current stream and is not a torch.library op: call it from eager code or
    from inside a custom op of your own.
    """
    bits = require_bits(bits)
    code = torch.uint8 if bits == 4 else torch.int8
    if not isinstance(qa, torch.Tensor) or qa.ndim != 2:
        raise ValueError("qa must be a 2-D tensor [M, K/2] (bits=4) or [M, K] (bits=8)")
    if not isinstance(qw, torch.Tensor) or qw.ndim != 2:
        raise ValueError("qw must be a 2-D tensor [N, K/2] (bits=4) or [N, K] (bits=8)")
    (m, width), n, device = qa.shape, qw.shape[0], qa.device
    k = width * (2 if bits == 4 else 1)
    if k > MAX_K[bits]:
        raise ValueError(f"K = {k} is too large for exact int32 accumulation of {bits}-bit codes (max {MAX_K[bits]})")
    if not isinstance(out, torch.Tensor) or out.dtype not in FLOAT_CODES:
        raise TypeError("out must be a bfloat16, float16 or float32 tensor")
    pointers = (
        require_operand("qa", qa, code, (m, width), device),
        require_operand("sa", sa, torch.float32, (m,), device),
        require_operand("qw", qw, code, (n, width), device),
        require_operand("sw", sw, torch.float32, (n,), device),
        0 if bias is None else require_operand("bias", bias, torch.float32, (n,), device),
        require_operand("out", out, out.dtype, (m, n), device),
    )
    _C.gemm_ptr(*pointers, FLOAT_CODES[out.dtype], m, n, k, bits, *on_device(out))
    return out


# ---- schemes with separate weight and activation widths (W4A8) and group-scaled 4-bit weights ----

WEIGHT_GROUP = 64  # codes per multiplier of group-scaled weights (docs/format.md)
# Largest K for exact int32 accumulation: max |qa| · max |decoded weight| · K < 2^31 (docs/format.md).
_SCHEME_MAX_K = {(4, 4, False): (1 << 25) - 1, (4, 8, False): (1 << 21) - 1, (4, 4, True): (1 << 21) - 1}


def _scheme_max_k(weight_bits: int, act_bits: int, grouped: bool) -> int:
    return _SCHEME_MAX_K.get((weight_bits, act_bits, grouped), (1 << 17) - 1)


@torch.library.custom_op("convrot_kernels::scheme_gemm", mutates_args=())
def _scheme_gemm_op(
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
    out = torch.empty((qa.shape[0], qw.shape[0]), dtype=out_dtype, device=qa.device)
    _C.gemm(qa, sa, qw, sw, bias, out, weight_bits, stream_of(qa), act_bits, group_scale)
    return out


@_scheme_gemm_op.register_fake
def _(qa, sa, qw, sw, bias, group_scale, weight_bits, act_bits, out_dtype):
    return qa.new_empty((qa.shape[0], qw.shape[0]), dtype=out_dtype)


def _scheme_gemm(qa, sa, qw, sw, bias, bits, out_dtype, weight_bits, act_bits, group_scale) -> torch.Tensor:
    """gemm with the operands' widths given apart, and group scales: checks, then the op."""
    weight_bits = require_bits(bits if weight_bits is None else weight_bits)
    act_bits = require_bits(bits if act_bits is None else act_bits)
    if weight_bits == 8 and act_bits == 4:
        raise ValueError("weight_bits=8 with act_bits=4 is not a scheme (docs/format.md): use act_bits=8")
    for name, t, width in (("qa", qa, act_bits), ("qw", qw, weight_bits)):
        require_tensor(name, t)
        require_dtype(name, t, (torch.uint8 if width == 4 else torch.int8,))
        require_ndim(name, t, 2, "[rows, K/2] (4-bit codes)" if width == 4 else "[rows, K] (8-bit codes)")
    k = qa.shape[1] * (2 if act_bits == 4 else 1)
    if qw.shape[1] * (2 if weight_bits == 4 else 1) != k:
        raise ValueError(
            f"qa ({act_bits}-bit codes, {tuple(qa.shape)}) and qw ({weight_bits}-bit codes, {tuple(qw.shape)}) "
            "must hold the same K"
        )
    if group_scale is not None:
        require_tensor("group_scale", group_scale)
        if weight_bits != 4:
            raise ValueError("group_scale goes with 4-bit weights (weight_bits=4)")
        if k % WEIGHT_GROUP:
            raise ValueError(f"group-scaled weights need K a multiple of {WEIGHT_GROUP}; got K = {k}")
        require_dtype("group_scale", group_scale, (torch.uint8,))
        if group_scale.shape != (qw.shape[0], k // WEIGHT_GROUP):
            raise ValueError(
                f"group_scale must be uint8 [N, K/64] = [{qw.shape[0]}, {k // WEIGHT_GROUP}]; "
                f"got shape {tuple(group_scale.shape)}"
            )
    max_k = _scheme_max_k(weight_bits, act_bits, group_scale is not None)
    if k > max_k:
        raise ValueError(f"K = {k} is too large for exact int32 accumulation of this scheme (max {max_k})")
    m, n = qa.shape[0], qw.shape[0]
    for name, t, size, dim in (("sa", sa, m, "M"), ("sw", sw, n, "N")):
        require_tensor(name, t)
        require_dtype(name, t, (torch.float32,))
        if t.shape != (size,):
            raise ValueError(f"{name} must be float32 [{dim}] = [{size}]; got shape {tuple(t.shape)}")
    if bias is not None:
        require_tensor("bias", bias)
        require_dtype("bias", bias, FLOAT_DTYPES)
        if bias.shape != (n,):
            raise ValueError(f"bias must be [N] = [{n}]; got shape {tuple(bias.shape)}")
        bias = bias.to(torch.float32).contiguous()
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of bfloat16, float16, float32; got {out_dtype}")
    require_same_device(qa=qa, sa=sa, qw=qw, sw=sw, bias=bias, group_scale=group_scale)
    if group_scale is not None:
        group_scale = group_scale.contiguous()
    return _scheme_gemm_op(
        qa.contiguous(), sa.contiguous(), qw.contiguous(), sw.contiguous(), bias, group_scale, weight_bits, act_bits,
        out_dtype,
    )
