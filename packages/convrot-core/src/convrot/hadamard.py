"""Hadamard matrices and the group-wise rotation built on them.

The regular Hadamard matrix (Kronecker powers of H4) is the ConvRot rotation:
every row and column sums to sqrt(n), so a per-token offset that is constant
across a group of channels stays spread evenly over that group. The Sylvester
matrix (Kronecker powers of H2) is kept for ablations: its first column is all
ones, so it gathers the same offset into a single channel of every group.
"""

from __future__ import annotations

import functools
import math

import torch

# The rotations a ConvLinear layer accepts; the last two exist for ablations.
ROTATIONS = ("regular", "sylvester", "none")

# Group sizes the kernels implement (powers of 4).
MIN_GROUP_SIZE = 4
MAX_GROUP_SIZE = 1024

_H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))
_H2 = ((1, 1), (1, -1))


def _is_power_of_2(n: int) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def is_power_of_4(n: int) -> bool:
    return _is_power_of_2(n) and (n.bit_length() - 1) % 2 == 0


def _kronecker_power(base: tuple, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    h_base = torch.tensor(base, dtype=torch.float64)
    h = torch.ones((1, 1), dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h_base, h)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def regular_hadamard(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthonormal regular Hadamard matrix of order n (a power of 4).

    H_n = H4 ⊗ H_{n/4} scaled by 1/sqrt(n): symmetric and orthonormal. Every
    row and column of the ±1 matrix H_n sums to sqrt(n), so those of the
    scaled matrix sum to 1. Built in float64, then cast to ``dtype``.
    """
    if not is_power_of_4(n):
        raise ValueError(f"regular_hadamard: n must be a power of 4 (1, 4, 16, 64, ...), got {n!r}")
    return _kronecker_power(_H4, n, dtype, device)


def sylvester_hadamard(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order n (a power of 2).

    H_n = H2 ⊗ H_{n/2} scaled by 1/sqrt(n); its first row and column are
    constant, every other column sums to zero.
    """
    if not _is_power_of_2(n):
        raise ValueError(f"sylvester_hadamard: n must be a power of 2, got {n!r}")
    return _kronecker_power(_H2, n, dtype, device)


@functools.lru_cache(maxsize=64)
def rotation_matrix(rotation: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The cached n x n matrix of a rotation ("regular" or "sylvester")."""
    if rotation == "regular":
        return regular_hadamard(n, dtype, device)
    if rotation == "sylvester":
        return sylvester_hadamard(n, dtype, device)
    raise ValueError(f"rotation_matrix: no matrix for rotation {rotation!r}; expected 'regular' or 'sylvester'")


def rotate_groups(x: torch.Tensor, rotation: str, group_size: int) -> torch.Tensor:
    """Multiplies each contiguous group of ``group_size`` along the last dim by the rotation.

    Dense matrix products in x's dtype: the reference and ablation path (the
    fused kernels implement only the regular rotation). "none" returns x.
    """
    check_rotation(rotation)
    if rotation == "none":
        return x
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"rotate_groups: last dimension {k} is not a multiple of group_size {group_size}")
    matrix = rotation_matrix(rotation, group_size, x.dtype, x.device)
    return (x.unflatten(-1, (k // group_size, group_size)) @ matrix).flatten(-2)


def check_rotation(rotation: str) -> None:
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")


def resolve_group_size(in_features: int, group_size: int = 256) -> int:
    """The rotation group size a layer with ``in_features`` inputs uses.

    ``group_size`` itself when it divides in_features, else the largest power
    of 4 below it that does (1152 -> 64 and 2432 -> 64 for group_size 256).
    """
    if not is_power_of_4(group_size) or not MIN_GROUP_SIZE <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(
            f"group_size must be a power of 4 between {MIN_GROUP_SIZE} and {MAX_GROUP_SIZE} "
            f"(4, 16, 64, 256, 1024), got {group_size!r}"
        )
    if not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    size = group_size
    while size >= MIN_GROUP_SIZE:
        if in_features % size == 0:
            return size
        size //= 4
    raise ValueError(
        f"in_features={in_features} is not a multiple of 4, so no rotation group size "
        f"(a power of 4, at least {MIN_GROUP_SIZE}) divides it; keep this layer in high precision "
        f"(policy 'skip')"
    )
