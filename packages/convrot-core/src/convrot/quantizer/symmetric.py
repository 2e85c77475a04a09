"""Symmetric per-row quantization (docs/format.md), in float ops of the input's dtype."""

from __future__ import annotations

import torch


def qmax(bits: int) -> int:
    """The largest code: 7 for 4 bits, 127 for 8 bits."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    return 2 ** (bits - 1) - 1


def row_scale(v: torch.Tensor, bits: int) -> torch.Tensor:
    """amax(|row|) / qmax for each row of v, in v's dtype; NaN for a row holding NaN or Inf."""
    scale = v.abs().amax(dim=-1) / qmax(bits)
    return torch.where(torch.isfinite(scale), scale, torch.full_like(scale, float("nan")))


def quantize_with_scale(v: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes clamp(round_half_to_even(v / scale), -qmax-1, qmax) as integer-valued floats.

    A row whose scale is 0 or not finite gets all-zero codes, so that it
    cannot poison the rest of a GEMM.
    """
    top = qmax(bits)
    scale = scale.unsqueeze(-1)
    usable = (scale != 0) & torch.isfinite(scale)
    codes = torch.clamp(torch.round(v / torch.where(usable, scale, torch.ones_like(scale))), -top - 1, top)
    return torch.where(usable, codes, torch.zeros_like(codes))


def quantize_rows(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of each row of v, absmax-scaled, computed in v's dtype."""
    scale = row_scale(v, bits)
    return quantize_with_scale(v, scale, bits), scale
