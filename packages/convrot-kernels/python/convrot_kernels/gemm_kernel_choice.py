"""Pinning the CUDA GEMM kernel, for tests and benchmarks that compare the kernels.

By default ``gemm`` (and ``linear``) picks the fastest kernel that applies to each call
(src/cuda/gemm.cu). Inside ``forced_gemm_kernel(name)`` every CUDA GEMM runs that kernel, and
a call it cannot run raises ValueError instead of falling back to another. The choice is
process-wide (it is read by the compiled module, not per thread) and restored on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import _C

GEMM_KERNELS = ("small_m", "sm90_persistent", "sm90", "simt")
SM90_TILE_WIDTHS = (128, 256)

_current = ("automatic", 256)


@contextlib.contextmanager
def forced_gemm_kernel(kernel: str, *, sm90_tile_n: int = 256) -> Iterator[None]:
    """Run every CUDA GEMM inside the block on ``kernel``: ``"small_m"`` (weight streaming,
    M <= 64, compute capability 8.0+), ``"sm90_persistent"`` and ``"sm90"`` (TMA + wgmma, an
    sm_90a build on compute capability 9.0; ``sm90_tile_n`` 128 or 256 sets the latter's tile
    width) or ``"simt"`` (portable dp4a)."""
    global _current
    if kernel not in GEMM_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(GEMM_KERNELS)}; got {kernel!r}")
    if sm90_tile_n not in SM90_TILE_WIDTHS or isinstance(sm90_tile_n, bool):
        raise ValueError(f"sm90_tile_n must be 128 or 256; got {sm90_tile_n!r}")
    previous = _current
    _C.force_gemm_kernel(kernel, sm90_tile_n)
    _current = (kernel, sm90_tile_n)
    try:
        yield
    finally:
        _C.force_gemm_kernel(*previous)
        _current = previous
