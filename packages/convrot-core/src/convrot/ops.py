"""The ConvLinear forward, and the same as a torch.library custom op (namespace ``convrot``).

``linear_forward`` is what an eager forward runs: two destination-passing kernel
calls, with no argument checks beyond the compiled module's (the layer's
buffers are well formed by construction) and no nested dispatch, because host
time per call decides eager speed. The custom op wraps the same function with a
fake (meta) implementation, so that torch.compile traces a model of ConvLinear
layers with fullgraph=True; neither synchronises, so CUDA-graph capture works.
"""

from __future__ import annotations

import torch

import convrot_kernels

from .fused_input import materialize
from .hadamard import rotate_groups


def linear_forward(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    rotation: str,
    x2: torch.Tensor | None = None,
    gelu_from: int = -1,
) -> torch.Tensor:
    """y = dequant(quant(rotate(x)) @ qweight^T) + bias for x [..., K]; returns [..., N] in x's dtype.

    Given in parts, the input is ``cat([x, x2], -1)`` with GELU from column ``gelu_from``
    on (-1: none), built by the quantization kernel as it loads the rows (fused_input.py).
    """
    n = qweight.shape[0]
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    rows2 = None if x2 is None else x2.reshape(-1, x2.shape[-1]).contiguous()
    gelu = None if gelu_from < 0 else gelu_from
    m = rows.shape[0]
    k = rows.shape[1] + (0 if rows2 is None else rows2.shape[1])
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m > 0:
        group = group_size if rotation == "regular" else 0
        if rotation == "sylvester":
            # Ablation only: the fused kernels implement the regular rotation alone.
            rows = rotate_groups(materialize(rows, rows2, gelu).float(), rotation, group_size)
            rows2 = gelu = None
        q = torch.empty((m, k // 2 if bits == 4 else k), dtype=qweight.dtype, device=x.device)
        scale = torch.empty(m, dtype=torch.float32, device=x.device)
        convrot_kernels.rht_quantize_into(rows, q, scale, group, bits, x2=rows2, gelu_from=gelu)
        if bias is not None and bias.dtype != torch.float32:  # layers keep an fp32 bias; one set by hand may not
            bias = bias.float()
        convrot_kernels.gemm_into(out, q, scale, qweight, weight_scale, bias, bits=bits)
    return out.reshape(*x.shape[:-1], n)


# The same function as an opaque op for torch.compile (its signature gives the op's schema).
quantized_linear = torch.library.custom_op("convrot::quantized_linear", linear_forward, mutates_args=())


@quantized_linear.register_fake
def _quantized_linear_fake(x, qweight, weight_scale, bias, bits, group_size, rotation, x2=None, gelu_from=-1):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
