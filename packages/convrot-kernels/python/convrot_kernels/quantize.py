"""Per-row symmetric quantization, with or without the regular Hadamard rotation in front."""

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
    require_even_for_4bit,
    require_gelu_from,
    require_group_size,
    require_ndim,
    require_rows,
    require_tensor,
    stream,
)


def empty_codes(rows: int, k: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (codes, row scales) for rows of k elements: uint8 [rows, k/2] or int8 [rows, k], fp32 [rows]."""
    shape, dtype = ((rows, k // 2), torch.uint8) if bits == 4 else ((rows, k), torch.int8)
    return torch.empty(shape, dtype=dtype, device=device), torch.empty(rows, dtype=torch.float32, device=device)


def check_row_parts(x: torch.Tensor, x2: torch.Tensor | None, gelu_from: int | None) -> tuple[int, int]:
    """Checks x [M, K1] and the fused-input arguments; returns the row width K (K1 + x2's) and
    gelu_from as the compiled module takes it (-1: no GELU)."""
    require_tensor("x", x)
    require_dtype("x", x, FLOAT_DTYPES)
    require_ndim("x", x, 2, "[M, K]")
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
    return k, -1 if gelu_from is None else require_gelu_from(gelu_from, k)


def rht_quantize_rows(
    x: torch.Tensor, x2: torch.Tensor | None, k: int, gelu_from: int, group_size: int, bits: int, device: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on checked, contiguous rows (group_size 0: no rotation)."""
    m, x_k = x.shape
    q, scale = empty_codes(m, k, bits, x.device)
    _C.rht_quantize(
        x.data_ptr(),
        FLOAT_CODES[x.dtype],
        m,
        x_k,
        0 if x2 is None else x2.data_ptr(),
        k,
        gelu_from,
        group_size,
        bits,
        q.data_ptr(),
        scale.data_ptr(),
        device,
        stream(device),
    )
    return q, scale


def _rht_quantize(
    x: torch.Tensor, group_size: int, bits: int, x2: torch.Tensor | None = None, gelu_from: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[1] + (0 if x2 is None else x2.shape[1])
    return rht_quantize_rows(x, x2, k, gelu_from, group_size, bits, x.get_device())


# group_size 0 means no rotation; gelu_from -1 means no GELU.
_rht_quantize_op = torch.library.custom_op("convrot_kernels::rht_quantize", _rht_quantize, mutates_args=())


@_rht_quantize_op.register_fake
def _(x, group_size, bits, x2=None, gelu_from=-1):
    return empty_codes(x.shape[0], x.shape[1] + (0 if x2 is None else x2.shape[1]), bits, x.device)


def _checked_rht_quantize(x, group_size, bits, x2, gelu_from, allow_no_rotation):
    k, gelu = check_row_parts(x, x2, gelu_from)
    bits = require_bits(bits)
    require_even_for_4bit(bits, k)
    group_size = require_group_size(group_size, k, allow_none=allow_no_rotation)
    require_rows("x", x.shape[0])
    device_index(x=x, x2=x2)
    run = eager_or_traced(_rht_quantize_op, _rht_quantize)
    return run(x.contiguous(), group_size, bits, None if x2 is None else x2.contiguous(), gelu)


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
    ``group_size=0`` quantizes without rotating (as :func:`quantize`).

    Fused inputs: with ``x2`` [M, K2] the rows are ``cat([x, x2], 1)`` (x's
    width a multiple of 16), and with ``gelu_from`` the row's columns from
    there on first pass through GELU (tanh approximation, in fp32, rounded to
    x's dtype), as if the caller had materialised
    ``cat([x, gelu(x2)])``; neither is ever written to memory.
    """
    return _checked_rht_quantize(x, group_size, bits, x2, gelu_from, allow_no_rotation=True)


def quantize(x: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of x [M, K] symmetrically, without rotation; as :func:`rht_quantize`."""
    return _checked_rht_quantize(x, 0, bits, None, None, allow_no_rotation=True)
