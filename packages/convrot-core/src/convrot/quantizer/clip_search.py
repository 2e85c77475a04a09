"""Per-output-channel weight clipping search, data-free.

Clipping a row's range below its absmax trades a larger error on the few
largest weights for a finer step on all the others. For inputs with equal
variance in every direction (which the rotation approaches) the expected
output error of a row is proportional to its weight reconstruction error
||w - s·q(w)||², so the search minimises that, per row, over a grid of
clipping ratios; no activations are needed.
"""

from __future__ import annotations

import torch

from .symmetric import qmax

# Ratios of the row absmax tried, 1.0 (no clipping) first so that ties keep it.
CLIP_RATIOS = tuple(1.0 - 0.01 * i for i in range(51))


def search_clip_ratio(v: torch.Tensor, bits: int, ratios: tuple[float, ...] = CLIP_RATIOS) -> torch.Tensor:
    """For each row of v [N, K], the ratio r minimising ||v - s_r·q_r||², s_r = fp32(r·amax/qmax)."""
    top = qmax(bits)
    amax = v.abs().amax(dim=-1)
    best_error = torch.full_like(amax, float("inf"))
    best_ratio = torch.ones_like(amax)
    residual = torch.empty_like(v)
    for ratio in ratios:
        scale = (amax * ratio / top).to(torch.float32).to(v.dtype)
        # An all-zero row (scale 0) has zero error at every ratio and keeps 1.0.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
        torch.div(v, scale, out=residual)
        residual.round_().clamp_(-top - 1, top).mul_(scale).sub_(v)
        error = residual.square_().sum(dim=-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio
