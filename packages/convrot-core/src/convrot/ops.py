"""The ConvLinear forward as a torch.library custom op (namespace ``convrot``).

One opaque op with a fake (meta) implementation lets torch.compile trace a
model of ConvLinear layers with fullgraph=True, and keeps the kernel calls
free of Python-side synchronisation so that CUDA-graph capture works.
"""

from __future__ import annotations

import torch

import convrot_kernels

from .hadamard import rotate_groups


@torch.library.custom_op("convrot::quantized_linear", mutates_args=())
def quantized_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    rotation: str,
) -> torch.Tensor:
    """y = dequant(quant(rotate(x)) @ qweight^T) + bias for x [..., K]; returns [..., N] in x's dtype."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if rows.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))
    if rotation == "regular":
        qa, sa = convrot_kernels.rht_quantize(rows, group_size, bits)
    elif rotation == "sylvester":
        # Ablation only: the fused kernels implement the regular rotation alone.
        qa, sa = convrot_kernels.quantize(rotate_groups(rows.float(), rotation, group_size), bits)
    else:
        qa, sa = convrot_kernels.quantize(rows, bits)
    y = convrot_kernels.gemm(qa, sa, qweight, weight_scale, bias, bits=bits, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


@quantized_linear.register_fake
def _quantized_linear_fake(x, qweight, weight_scale, bias, bits, group_size, rotation):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
