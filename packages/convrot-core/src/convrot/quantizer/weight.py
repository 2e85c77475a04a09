"""Offline weight quantization: rotate along in_features, quantize per output channel
(optionally with a multiplier per group of 64 codes, docs/format.md)."""

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


# Group-scaled 4-bit weights (docs/format.md): codes per multiplier, the largest multiplier and
# the row scale's divisor 7 x 16, so that code x multiplier always fits an int8.
WEIGHT_GROUP = 64
MAX_MULTIPLIER = 16
GROUPED_ROW_QMAX = 7 * MAX_MULTIPLIER


def quantize_weight_grouped(
    weight: torch.Tensor, group_size: int, rotation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int8 [N, K] in [-8, 7], row scale fp32 [N], multipliers uint8 [N, K/64] in [1, 16])
    of a weight [N, K] (K a multiple of 64), the two-level 4-bit format of docs/format.md.

    Each row is rotated group-wise in float64; scale = fp32(amax / 112), each group of 64 codes
    gets the multiplier ceil(amax_g / (7 scale)) (clamped to [1, 16]) and its codes are rounded
    against scale x multiplier, so that codes x multiplier x scale is the weight the layer uses.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D floating-point weight, got {weight.dtype} of shape {tuple(weight.shape)}")
    if weight.is_meta:
        raise ValueError("cannot quantize a weight on the meta device: load real weights first")
    n, k = weight.shape
    if k % WEIGHT_GROUP:
        raise ValueError(f"group-scaled weights need in_features a multiple of {WEIGHT_GROUP}; got {k}")
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    multipliers = torch.empty(n, k // WEIGHT_GROUP, dtype=torch.uint8, device=weight.device)
    for start in range(0, n, CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        v = rotate_groups(weight[rows].to(torch.float64), rotation, group_size)
        scale[rows] = (v.abs().amax(dim=-1) / GROUPED_ROW_QMAX).to(torch.float32)
        s = scale[rows].to(torch.float64).unsqueeze(-1)
        usable = (s > 0) & torch.isfinite(s)
        s = torch.where(usable, s, torch.ones_like(s))
        groups = v.unflatten(-1, (k // WEIGHT_GROUP, WEIGHT_GROUP))
        mult = torch.ceil(groups.abs().amax(dim=-1) / (7 * s)).clamp_(1, MAX_MULTIPLIER)
        mult = torch.where(usable, mult, torch.ones_like(mult))
        q = torch.round(groups / (s * mult).unsqueeze(-1)).clamp_(-8, 7)
        q = torch.where(usable.unsqueeze(-1), q, torch.zeros_like(q))
        codes[rows] = q.flatten(-2).to(torch.int8)
        multipliers[rows] = mult.to(torch.uint8)
    bad_rows = (~torch.isfinite(scale)).nonzero().flatten()
    if bad_rows.numel():
        raise ValueError(
            f"weight has NaN or Inf in {bad_rows.numel()} output channel(s), first {bad_rows[:8].tolist()}: "
            "such a layer cannot be quantized"
        )
    return codes, scale, multipliers
