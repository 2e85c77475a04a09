"""Two 4-bit two's-complement codes per byte: element 2j in the low nibble of byte j."""

from __future__ import annotations

import torch

from . import _C
from ._validation import device_index, eager_or_traced, require_dtype, require_tensor, stream


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    packed = q.new_empty((*q.shape[:-1], q.shape[-1] // 2), dtype=torch.uint8)
    if packed.numel():
        _C.pack_int4(q, packed, stream(q.get_device()))
    return packed


_pack_int4_op = torch.library.custom_op("convrot_kernels::pack_int4", _pack_int4, mutates_args=())


@_pack_int4_op.register_fake
def _(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], q.shape[-1] // 2), dtype=torch.uint8)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    q = packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=torch.int8)
    if q.numel():
        _C.unpack_int4(packed, q, stream(packed.get_device()))
    return q


_unpack_int4_op = torch.library.custom_op("convrot_kernels::unpack_int4", _unpack_int4, mutates_args=())


@_unpack_int4_op.register_fake
def _(packed: torch.Tensor) -> torch.Tensor:
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in [-8, 7], last dimension even, into uint8 [..., K/2].

    Out-of-range codes raise ValueError instead of wrapping (this check reads
    the data, so on CUDA it waits for q).
    """
    require_tensor("q", q)
    require_dtype("q", q, (torch.int8,))
    if q.ndim == 0 or q.shape[-1] % 2:
        raise ValueError(f"q's last dimension must be even to pack two codes per byte; got shape {tuple(q.shape)}")
    device_index(q=q)
    if q.numel() and bool(((q < -8) | (q > 7)).any()):
        raise ValueError("q holds values outside [-8, 7], which do not fit in 4 bits")
    return eager_or_traced(_pack_int4_op, _pack_int4)(q.contiguous())


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Unpack uint8 [..., K/2] into int8 codes [..., K] in [-8, 7]."""
    require_tensor("p", p)
    require_dtype("p", p, (torch.uint8,))
    if p.ndim == 0:
        raise ValueError("p must have at least one dimension")
    device_index(p=p)
    return eager_or_traced(_unpack_int4_op, _unpack_int4)(p.contiguous())
