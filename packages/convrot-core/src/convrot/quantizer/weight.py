"""Offline weight quantization: rotate along in_features, quantize per output channel."""

from __future__ import annotations

import torch

from ..hadamard import rotate_groups
from .clip_search import search_clip_ratio
from .symmetric import qmax, quantize_with_scale

# Rows rotated and quantized at a time: bounds the float64 temporaries to
# about 3 x rows x in_features x 8 bytes whatever the layer's size.
CHUNK_ROWS = 2048


def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int, rotation: str, clip_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [N, K], scale fp32 [N]) of a weight [N, K], on the weight's device.

    Each row is rotated group-wise in float64, then quantized symmetrically
    with scale = fp32(amax / qmax) (amax scaled down by the clipping search's
    ratio when ``clip_search``); codes are rounded against the fp32 scale that
    is stored, so that codes x scale is the weight the layer uses.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D floating-point weight, got {weight.dtype} of shape {tuple(weight.shape)}")
    if weight.is_meta:
        raise ValueError("cannot quantize a weight on the meta device: load real weights first")
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        v = rotate_groups(weight[rows].to(torch.float64), rotation, group_size)
        amax = v.abs().amax(dim=-1)
        if clip_search:
            amax = amax * search_clip_ratio(v, bits)
        scale[rows] = (amax / qmax(bits)).to(torch.float32)
        codes[rows] = quantize_with_scale(v, scale[rows].to(torch.float64), bits).to(torch.int8)
    bad_rows = (~torch.isfinite(scale)).nonzero().flatten()
    if bad_rows.numel():
        raise ValueError(
            f"weight has NaN or Inf in {bad_rows.numel()} output channel(s), first {bad_rows[:8].tolist()}: "
            "such a layer cannot be quantized"
        )
    return codes, scale
