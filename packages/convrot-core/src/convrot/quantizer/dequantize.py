"""The weight a ConvLinear's stored codes stand for, in the model's basis.

W = rotate_groups(codes · scale[:, None]): the stored codes are those of W
rotated group-wise along in_features (weights are quantized as W R), and R is
symmetric and orthonormal, so rotating again returns to the original basis.
For interoperability checks, LoRA merges and analysis; the layers themselves
never materialise it.
"""

from __future__ import annotations

import torch

from convrot_kernels import unpack_int4

from ..hadamard import rotate_groups


def dequantize_weight(
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bits: int,
    group_size: int,
    rotation: str = "regular",
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """[N, K] weight of ``dtype`` from packed int4 (uint8 [N, K/2]) or int8 [N, K] codes and fp32 scales [N].

    In float64 (the default) every product code·scale and every sum of the
    rotation is exact (a code has at most 8 bits, a scale 24, the rotation's
    entries are ±2^-k), so the result is the exact weight rounded once to
    ``dtype``. ``compute_dtype=torch.float32`` does the same math in fp32
    (products, then the dense group rotation), the order comfy-kitchen uses.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    expected = torch.uint8 if bits == 4 else torch.int8
    if qweight.dim() != 2 or qweight.dtype != expected:
        raise ValueError(
            f"{bits}-bit codes must be a 2-D {expected} tensor, got {qweight.dtype} {tuple(qweight.shape)}"
        )
    if weight_scale.shape != (qweight.shape[0],):
        raise ValueError(f"weight_scale must have shape ({qweight.shape[0]},), got {tuple(weight_scale.shape)}")
    codes = unpack_int4(qweight) if bits == 4 else qweight
    product = codes.to(compute_dtype) * weight_scale.to(compute_dtype).unsqueeze(-1)
    return rotate_groups(product, rotation, group_size).to(dtype)
