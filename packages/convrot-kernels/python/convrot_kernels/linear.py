"""A quantized layer in one call: rotate and quantize the input rows, then the GEMM with the weight codes.

``linear`` is what a ConvLinear layer's forward runs. Both kernels are enqueued by one call of
the compiled module, and the codes and row scales of the input share one temporary allocation,
because an eager layer's cost at small M is its host time (docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from . import _C
from ._validation import (
    FLOAT_CODES,
    FLOAT_DTYPES,
    device_index,
    eager_or_traced,
    require_dtype,
    require_gelu_from,
    require_group_size,
    require_rows,
    require_tensor,
    stream,
)
from .gemm import check_scheme, check_weight_codes, fp32_bias

# The row scales follow the codes in the temporary buffer at this alignment (bytes).
_SCALE_ALIGNMENT = 256


def _linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_scale: torch.Tensor | None,
    weight_bits: int,
    act_bits: int,
    group_size: int,
    x2: torch.Tensor | None = None,
    gelu_from: int = -1,
) -> torch.Tensor:
    # x and x2 are contiguous: their rows are read in place, and the output gets its final shape.
    x_k = x.shape[-1]
    m = x.numel() // x_k
    k = x_k if x2 is None else x_k + x2.shape[-1]
    n = qweight.shape[0]
    code_bytes = m * (k // 2 if act_bits == 4 else k)
    scale_offset = -(-code_bytes // _SCALE_ALIGNMENT) * _SCALE_ALIGNMENT
    scratch = torch.empty(scale_offset + 4 * m, dtype=torch.uint8, device=x.device)
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    device = x.get_device()
    codes = scratch.data_ptr()
    _C.linear(
        x.data_ptr(),
        FLOAT_CODES[x.dtype],
        m,
        x_k,
        0 if x2 is None else x2.data_ptr(),
        k,
        gelu_from,
        group_size,
        weight_bits,
        act_bits,
        0 if group_scale is None else group_scale.data_ptr(),
        codes,
        codes + scale_offset,
        qweight.data_ptr(),
        weight_scale.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        n,
        device,
        stream(device),
    )
    return out


_linear_op = torch.library.custom_op("convrot_kernels::linear", _linear, mutates_args=())


@_linear_op.register_fake
def _(x, qweight, weight_scale, bias, group_scale, weight_bits, act_bits, group_size, x2=None, gelu_from=-1):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bits: int = 4,
    group_size: int = 256,
    x2: torch.Tensor | None = None,
    gelu_from: int | None = None,
    act_bits: int | None = None,
    group_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``gemm(*rht_quantize(x.reshape(-1, K), group_size, act_bits), qweight, weight_scale, bias, ...)``
    shaped [..., N], in x's dtype: a ConvLinear layer's forward, bit for bit.

    x [..., K] (float32, float16 or bfloat16); qweight, weight_scale and bias as :func:`gemm`'s
    qw, sw and bias (the codes of the weight rotated the same way); ``group_size=0``: no
    rotation. ``bits`` is the weights' width, ``act_bits`` the activations' (default: the same;
    ``bits=4, act_bits=8`` is W4A8) and ``group_scale`` the multipliers of group-scaled 4-bit
    weights, as :func:`gemm` takes them. With ``x2`` [..., K2] the input is ``cat([x, x2], -1)``
    and with ``gelu_from`` its columns from there on pass through GELU first, as
    :func:`rht_quantize` takes them.
    """
    weight_bits, act_bits = check_scheme(bits, None, act_bits)
    names = ("qweight", "weight_scale")
    n, k = check_weight_codes(qweight, weight_scale, bias, weight_bits, act_bits, group_scale, names)
    require_tensor("x", x)
    require_dtype("x", x, FLOAT_DTYPES)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension [..., K]")
    width = x.shape[-1]
    if x2 is not None:
        require_tensor("x2", x2)
        if x2.shape[:-1] != x.shape[:-1] or x2.dtype != x.dtype:
            raise ValueError(
                f"x2 must share x's leading dimensions {tuple(x.shape[:-1])} and dtype ({x.dtype}); "
                f"got {x2.dtype} {tuple(x2.shape)}"
            )
        if width % 16:
            raise ValueError(f"with x2, x's width ({width}) must be a multiple of 16")
        width += x2.shape[-1]
        x2 = x2.contiguous()
    if width != k:
        rows = "x" if x2 is None else "cat([x, x2], -1)"
        raise ValueError(f"{rows} must be [..., K] for K = {k}, the width of qweight's codes; got rows {width} wide")
    gelu = -1 if gelu_from is None else require_gelu_from(gelu_from, k)
    group_size = require_group_size(group_size, k, allow_none=True)
    require_rows("x", x.numel())
    device_index(x=x, x2=x2, qweight=qweight, weight_scale=weight_scale, bias=bias, group_scale=group_scale)
    run = eager_or_traced(_linear_op, _linear)
    group_scale = None if group_scale is None else group_scale.contiguous()
    weights = (qweight.contiguous(), weight_scale.contiguous(), fp32_bias(bias), group_scale)
    return run(x.contiguous(), *weights, weight_bits, act_bits, group_size, x2, gelu)
