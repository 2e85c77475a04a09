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


def empty_codes(rows: int, k: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (codes, row scales) for rows of k elements: uint8 [rows, k/2] or int8 [rows, k], fp32 [rows]."""
    shape, dtype = ((rows, k // 2), torch.uint8) if bits == 4 else ((rows, k), torch.int8)
    return torch.empty(shape, dtype=dtype, device=device), torch.empty(rows, dtype=torch.float32, device=device)


def _codes_like(x: torch.Tensor, bits: int, x2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return empty_codes(x.shape[0], x.shape[1] + (0 if x2 is None else x2.shape[1]), bits, x.device)


# group_size 0 means no rotation; gelu_from -1 means no GELU.
@torch.library.custom_op("convrot_kernels::rht_quantize", mutates_args=())
def _rht_quantize(
    x: torch.Tensor, group_size: int, bits: int, x2: torch.Tensor | None = None, gelu_from: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = _codes_like(x, bits, x2)
    _C.rht_quantize(x, q, scale, group_size, bits, stream_of(x), x2, gelu_from)
    return q, scale


@_rht_quantize.register_fake
def _(x, group_size, bits, x2=None, gelu_from=-1):
    return _codes_like(x, bits, x2)


def _row_width(x: torch.Tensor, x2: torch.Tensor | None, gelu_from: int | None) -> tuple[int, int]:
    """Checks the fused-input arguments; returns the row width and gelu_from as the kernels take it (-1: none)."""
    k = x.shape[1]
    if x2 is not None:
        require_tensor("x2", x2)
        if x2.ndim != 2 or x2.shape[0] != x.shape[0] or x2.dtype != x.dtype:
            raise ValueError(
                f"x2 must be 2-D [M, K2] with x's M ({x.shape[0]}) and dtype ({x.dtype}); "
                f"got {x2.dtype} {tuple(x2.shape)}"
            )
        if k % 16:
            raise ValueError(f"with x2, x's width ({k}) must be a multiple of 16")
        k += x2.shape[1]
    if gelu_from is None:
        return k, -1
    if isinstance(gelu_from, bool) or not isinstance(gelu_from, int) or not 0 <= gelu_from <= k or gelu_from % 16:
        raise ValueError(f"gelu_from must be a multiple of 16 in [0, {k}] (the row width); got {gelu_from!r}")
    return k, gelu_from


def _checked(
    x: torch.Tensor, bits: int, x2: torch.Tensor | None = None, gelu_from: int | None = None
) -> tuple[torch.Tensor, int, torch.Tensor | None, int, int]:
    require_tensor("x", x)
    require_dtype("x", x, FLOAT_DTYPES)
    require_ndim("x", x, 2, "[M, K]")
    bits = require_bits(bits)
    k, gelu_from = _row_width(x, x2, gelu_from)
    if bits == 4 and k % 2:
        raise ValueError(f"K ({k}) must be even to pack 4-bit codes two per byte")
    require_same_device(x=x, x2=x2)
    return x.contiguous(), bits, None if x2 is None else x2.contiguous(), k, gelu_from


def rht_quantize(
    x: torch.Tensor,
    group_size: int = 256,
    bits: int = 4,
    *,
    x2: torch.Tensor | None = None,
    gelu_from: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate x [M, K] group-wise, then quantize each row symmetrically.

    Returns ``(q, scale)``: q is uint8 [M, K/2] (two 4-bit codes per byte) for
    bits=4 or int8 [M, K] for bits=8; scale is float32 [M]. One pass over x.

    Fused inputs: with ``x2`` [M, K2] the rows are ``cat([x, x2], 1)`` (x's
    width a multiple of 16), and with ``gelu_from`` the row's columns from
    there on first pass through GELU (tanh approximation, in fp32, rounded to
    x's dtype), as if the caller had materialised
    ``cat([x, gelu(x2)])``; neither is ever written to memory.
    """
    x, bits, x2, k, gelu_from = _checked(x, bits, x2, gelu_from)
    group_size = require_group_size(group_size, k)
    return _rht_quantize(x, group_size, bits, x2, gelu_from)


def quantize(x: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of x [M, K] symmetrically, without rotation; as :func:`rht_quantize`."""
    x, bits, _, _, _ = _checked(x, bits)
    return _rht_quantize(x, 0, bits)


def rht_quantize_into(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    group_size: int = 256,
    bits: int = 4,
    *,
    x2: torch.Tensor | None = None,
    gelu_from: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Destination-passing :func:`rht_quantize` (``group_size=0``: :func:`quantize`, no rotation):
    writes the codes into ``q`` and the scales into ``scale``, and returns them.

    For hot paths, like :func:`convrot_kernels.gemm_into`: x, x2, q and scale must be contiguous,
    of the right dtypes and shapes and on one device; nothing is allocated, and the call is
    eager (not a torch.library op).
    """
    bits = require_bits(bits)
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.dtype not in FLOAT_CODES:
        raise ValueError("x must be a 2-D float32, float16 or bfloat16 tensor [M, K]")
    m = x.shape[0]
    k, gelu_from = _row_width(x, x2, gelu_from)
    if bits == 4 and k % 2:
        raise ValueError(f"K ({k}) must be even to pack 4-bit codes two per byte")
    if group_size != 0:
        require_group_size(group_size, k)
    x_ptr = require_operand("x", x, x.dtype, tuple(x.shape), x.device)
    x2_ptr = 0 if x2 is None else require_operand("x2", x2, x.dtype, tuple(x2.shape), x.device)
    q_ptr = require_operand("q", q, torch.uint8 if bits == 4 else torch.int8, (m, k // 2 if bits == 4 else k), x.device)
    scale_ptr = require_operand("scale", scale, torch.float32, (m,), x.device)
    _C.rht_quantize_ptr(
        x_ptr,
        FLOAT_CODES[x.dtype],
        m,
        k,
        group_size,
        bits,
        q_ptr,
        scale_ptr,
        *on_device(x),
        x2_ptr,
        x.shape[1],
        gelu_from,
    )
    return q, scale
