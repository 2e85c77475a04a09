"""The simulation path: ConvRot's quantized math in plain float ops.

Used for analysis (how much error does W4A4 add to this tensor or layer?)
and as the reference the kernels are checked against. The only kernel it
uses is the unpacking of stored int4 weights; the rotation, quantization and
matrix product are torch float ops.
"""

from __future__ import annotations

import torch

from convrot_kernels import unpack_int4

from ..hadamard import rotate_groups
from .symmetric import quantize_rows


def fake_quant(
    x: torch.Tensor,
    bits: int = 4,
    group_size: int = 256,
    rotation: str = "regular",
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Rotate, quantize per row (last dim), dequantize and rotate back; x's shape and dtype.

    The rotations are symmetric and orthonormal, so rotating back multiplies
    by the same matrix again. A row holding NaN or Inf comes back all NaN.
    """
    v = rotate_groups(x.to(compute_dtype), rotation, group_size)
    codes, scale = quantize_rows(v, bits)
    return rotate_groups(codes * scale.unsqueeze(-1), rotation, group_size).to(x.dtype)


def simulated_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    rotation: str,
    compute_dtype: torch.dtype = torch.float64,
    act_bits: int | None = None,
    group_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A ConvLinear forward from its stored weights, in ``compute_dtype`` float ops.

    y = (codes_x @ w^T) · scale_x · scale_w + bias, as docs/format.md's GEMM, with the
    activation rotated and quantized per token to ``act_bits`` (default ``bits``, the weights'
    width) and w the weight codes, times their group's multiplier for group-scaled weights
    (``group_scale`` uint8 [N, K/64]); returns x's dtype and leading shape.
    """
    weight_codes = unpack_int4(qweight) if bits == 4 else qweight
    k = weight_codes.shape[1]
    weights = weight_codes.to(compute_dtype)
    if group_scale is not None:
        weights = weights * group_scale.to(compute_dtype).repeat_interleave(k // group_scale.shape[1], dim=1)
    v = rotate_groups(x.reshape(-1, k).to(compute_dtype), rotation, group_size)
    codes, scale = quantize_rows(v, bits if act_bits is None else act_bits)
    y = (codes @ weights.T) * scale.unsqueeze(-1) * weight_scale.to(compute_dtype)
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight_codes.shape[0])
