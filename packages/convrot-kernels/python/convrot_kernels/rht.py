"""The regular Hadamard rotation of each contiguous group along the last dimension."""

from __future__ import annotations

import torch

from . import _C
from ._validation import FLOAT_DTYPES, require_dtype, require_group_size, require_same_device, require_tensor, stream_of


@torch.library.custom_op("convrot_kernels::rht", mutates_args=())
def _rht(x: torch.Tensor, group_size: int) -> torch.Tensor:
    out = torch.empty_like(x)
    _C.rht(x, out, group_size, stream_of(x))
    return out


@_rht.register_fake
def _(x: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.empty_like(x)


def rht(x: torch.Tensor, group_size: int = 256) -> torch.Tensor:
    """Rotate each contiguous group of ``group_size`` along the last dimension by
    the regular Hadamard matrix (docs/format.md). Same shape, dtype and device as x."""
    require_tensor("x", x)
    require_dtype("x", x, FLOAT_DTYPES)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension")
    require_group_size(group_size, x.shape[-1])
    require_same_device(x=x)
    return _rht(x.contiguous(), int(group_size))
