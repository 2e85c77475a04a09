"""A ConvLinear input given in parts: ``cat([x, x2], -1)``, GELU'd from column ``gelu_from`` on.

convrot_diffusers hands layers their input this way where a model computes
``proj_out(cat([attn, gelu(mlp)]))`` or ``proj(gelu(h))``, and the kernels
build each row as they load it. This is the same input in torch ops, for the
paths that rotate in torch: the float simulation and the Sylvester ablation.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def materialize(x: torch.Tensor, x2: torch.Tensor | None = None, gelu_from: int | None = None) -> torch.Tensor:
    """The whole input, in x's dtype (the GELU computed as torch computes it, rounded to that dtype)."""
    full = x if x2 is None else torch.cat([x, x2], dim=-1)
    if gelu_from is None:
        return full
    return torch.cat([full[..., :gelu_from], F.gelu(full[..., gelu_from:], approximate="tanh")], dim=-1)
