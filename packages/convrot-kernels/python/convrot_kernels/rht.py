"""The regular Hadamard rotation of each contiguous group along the last dimension."""

from __future__ import annotations

import torch

from . import _C
from ._validation import (
    FLOAT_CODES,
    FLOAT_DTYPES,
    device_index,
    eager_or_traced,
    require_dtype,
    require_group_size,
    require_rows,
    require_tensor,
    stream,
)


def _rht(x: torch.Tensor, group_size: int) -> torch.Tensor:
    out = torch.empty_like(x)
    _C.rht(x, out, FLOAT_CODES[x.dtype], group_size, stream(x.get_device()))
    return out


_rht_op = torch.library.custom_op("convrot_kernels::rht", _rht, mutates_args=())


@_rht_op.register_fake
def _(x: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.empty_like(x)


def rht(x: torch.Tensor, group_size: int = 256) -> torch.Tensor:
    """Rotate each contiguous group of ``group_size`` along the last dimension by
    the regular Hadamard matrix (docs/format.md). Same shape, dtype and device as x."""
    require_tensor("x", x)
    require_dtype("x", x, FLOAT_DTYPES)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension")
    group_size = require_group_size(group_size, x.shape[-1])
    require_rows("x", x.numel())
    device_index(x=x)
    return eager_or_traced(_rht_op, _rht)(x.contiguous(), group_size)
