"""Per-row symmetric quantization, with or without the regular Hadamard rotation in front."""

from __future__ import annotations

import torch

from . import _C
from ._validation import (
    FLOAT_CODES,
    FLOAT_DTYPES,
    on_device,
    require_bits,
    require_dtype,
    require_group_size,
    require_ndim,
    require_operand,
    require_same_device,
    require_tensor,
    stream_of,
)


def _codes_like(x: torch.Tensor, bits: int) -> torch.Tensor:
    m, k = x.shape
    if bits == 4:
        return torch.empty((m, k // 2), dtype=torch.uint8, device=x.device)
    return torch.empty((m, k), dtype=torch.int8, device=x.device)


# group_size 0 means no rotation.
@torch.library.custom_op("convrot_kernels::rht_quantize", mutates_args=())
def _rht_quantize(x: torch.Tensor, group_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = _codes_like(x, bits)
    scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _C.rht_quantize(x, q, scale, group_size, bits, stream_of(x))
    return q, scale


@_rht_quantize.register_fake
def _(x: torch.Tensor, group_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _codes_like(x, bits), x.new_empty(x.shape[0], dtype=torch.float32)


def _checked(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    require_tensor("x", x)
    require_dtype("x", x, FLOAT_DTYPES)
    require_ndim("x", x, 2, "[M, K]")
    bits = require_bits(bits)
    if bits == 4 and x.shape[1] % 2:
        raise ValueError(f"K ({x.shape[1]}) must be even to pack 4-bit codes two per byte")
    require_same_device(x=x)
    return x.contiguous(), bits


def rht_quantize(x: torch.Tensor, group_size: int = 256, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate x [M, K] group-wise, then quantize each row symmetrically.

    Returns ``(q, scale)``: q is uint8 [M, K/2] (two 4-bit codes per byte) for
    bits=4 or int8 [M, K] for bits=8; scale is float32 [M]. One pass over x.
    """
    x, bits = _checked(x, bits)
    group_size = require_group_size(group_size, x.shape[1])
    return _rht_quantize(x, group_size, bits)


def quantize(x: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of x [M, K] symmetrically, without rotation; as :func:`rht_quantize`."""
    x, bits = _checked(x, bits)
    return _rht_quantize(x, 0, bits)


def rht_quantize_into(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_size: int = 256, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Destination-passing :func:`rht_quantize` (``group_size=0``: :func:`quantize`, no rotation):
    writes the codes into ``q`` and the scales into ``scale``, and returns them.

    For hot paths, like :func:`convrot_kernels.gemm_into`: x, q and scale must be contiguous,
    of the right dtypes and shapes and on one device; nothing is allocated, and the call is
    eager (not a torch.library op).
    """
    bits = require_bits(bits)
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.dtype not in FLOAT_CODES:
        raise ValueError("x must be a 2-D float32, float16 or bfloat16 tensor [M, K]")
    m, k = x.shape
    if bits == 4 and k % 2:
        raise ValueError(f"K ({k}) must be even to pack 4-bit codes two per byte")
    if group_size != 0:
        require_group_size(group_size, k)
    pointers = (
        require_operand("x", x, x.dtype, (m, k), x.device),
        require_operand("q", q, torch.uint8 if bits == 4 else torch.int8, (m, k // 2 if bits == 4 else k), x.device),
        require_operand("scale", scale, torch.float32, (m,), x.device),
    )
    _C.rht_quantize_ptr(pointers[0], FLOAT_CODES[x.dtype], m, k, group_size, bits, *pointers[1:], *on_device(x))
    return q, scale
