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

# Largest K for which the int32 accumulator cannot overflow (docs/format.md).
MAX_K = {4: (1 << 25) - 1, 8: (1 << 17) - 1}
CODE_DTYPES = {4: torch.uint8, 8: torch.int8}


def check_weight_codes(qw, sw, bias, bits: int, names: tuple[str, str] = ("qw", "sw")) -> tuple[int, int]:
    """Checks a layer's weight operands (named `names` in errors): qw [N, K/2] uint8 (bits=4) or
    [N, K] int8 (bits=8), sw float32 [N], bias None or any float dtype [N]. Returns (N, K)."""
    codes, scales = names
    require_tensor(codes, qw)
    require_dtype(codes, qw, (CODE_DTYPES[bits],))
    require_ndim(codes, qw, 2, "[N, K/2]" if bits == 4 else "[N, K]")
    n, width = qw.shape
    k = width * 2 if bits == 4 else width
    if k > MAX_K[bits]:
        raise ValueError(f"K = {k} is too large for exact int32 accumulation of {bits}-bit codes (max {MAX_K[bits]})")
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


def gemm_rows(qa, sa, qw, sw, bias, bits: int, out_dtype: torch.dtype, k: int, device: int) -> torch.Tensor:
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
        bits,
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
    bits: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    k = qa.shape[1] * (2 if bits == 4 else 1)
    return gemm_rows(qa, sa, qw, sw, bias, bits, out_dtype, k, qa.get_device())


_gemm_op = torch.library.custom_op("convrot_kernels::gemm", _gemm, mutates_args=())


@_gemm_op.register_fake
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
) -> torch.Tensor:
    """y[m, n] = (sum_k qa[m, k] qw[n, k]) * sa[m] * sw[n] + bias[n].

    qa [M, K/2] and qw [N, K/2] are uint8 packed 4-bit codes (bits=4) or qa
    [M, K] and qw [N, K] int8 codes (bits=8); sa float32 [M], sw float32 [N];
    bias [N] of any float dtype (used in float32). Accumulation is exact int32,
    the epilogue fp32, the result out_dtype [M, N].
    """
    bits = require_bits(bits)
    n, k = check_weight_codes(qw, sw, bias, bits)
    require_tensor("qa", qa)
    require_dtype("qa", qa, (CODE_DTYPES[bits],))
    require_ndim("qa", qa, 2, "[M, K/2]" if bits == 4 else "[M, K]")
    if qa.shape[1] != qw.shape[1]:
        raise ValueError(f"qa and qw must have the same number of columns; got {tuple(qa.shape)} and {tuple(qw.shape)}")
    m = qa.shape[0]
    require_rows("qa", m)
    require_tensor("sa", sa)
    require_dtype("sa", sa, (torch.float32,))
    require_shape("sa", sa, (m,), "float32 [M]")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of float32, float16, bfloat16; got {out_dtype}")
    device_index(qa=qa, sa=sa, qw=qw, sw=sw, bias=bias)
    run = eager_or_traced(_gemm_op, _gemm)
    return run(qa.contiguous(), sa.contiguous(), qw.contiguous(), sw.contiguous(), fp32_bias(bias), bits, out_dtype)
