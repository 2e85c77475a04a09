"""The one place where the public ops check their arguments, and how they reach the compiled module.

Every public function of convrot_kernels checks each of its arguments here, once, and raises
TypeError (a wrong type or dtype) or ValueError (a wrong shape, size or device) naming the
argument; the compiled module trusts what it is given. The checks are plain attribute
comparisons, because an eager layer's host time is what they cost.
"""

from __future__ import annotations

import torch

from . import _C

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GROUP_SIZES = (4, 16, 64, 256, 1024)
# The compiled module's dtype codes (primitives.h, enum Float).
FLOAT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# The compiled module's device argument for the CPU.
CPU = -1

_HAS_CUDA = bool(_C.build_info()["cuda"])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(_dtype_name(d) for d in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {_dtype_name(t.dtype)}")


def require_ndim(name: str, t: torch.Tensor, ndim: int, shape_hint: str) -> None:
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_hint}; got shape {tuple(t.shape)}")


def require_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], hint: str) -> None:
    if t.shape != shape:
        raise ValueError(f"{name} must be {hint} = {list(shape)}; got {list(t.shape)}")


def require_rows(name: str, rows: int) -> None:
    if rows == 0:
        raise ValueError(f"{name} has no rows (M = 0): there is nothing to compute")


def require_bits(bits: object) -> int:
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8; got {bits!r}")
    return int(bits)


def require_group_size(group_size: object, k: int, *, allow_none: bool = False) -> int:
    """A power of 4 in 4..1024 dividing k; with allow_none, 0 too (quantize without rotating)."""
    if allow_none and group_size == 0 and not isinstance(group_size, bool):
        return 0
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be a power of 4 in 4..1024 (one of {GROUP_SIZES}); got {group_size!r}")
    if k % group_size:
        raise ValueError(f"the row width K = {k} must be a multiple of group_size ({group_size})")
    return int(group_size)


def require_even_for_4bit(bits: int, k: int) -> None:
    if bits == 4 and k % 2:
        raise ValueError(f"the row width K = {k} must be even to pack 4-bit codes two per byte")


def require_gelu_from(gelu_from: object, k: int) -> int:
    """The first column of a fused GELU: a multiple of 16 in [0, k]."""
    if isinstance(gelu_from, bool) or not isinstance(gelu_from, int) or not 0 <= gelu_from <= k or gelu_from % 16:
        raise ValueError(f"gelu_from must be a multiple of 16 in [0, {k}] (the row width); got {gelu_from!r}")
    return gelu_from


def require_eps(name: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{name} must be a non-negative number; got {eps!r}")
    return float(eps)


def device_index(**tensors: torch.Tensor | None) -> int:
    """The compiled module's device argument for these tensors (CPU or the CUDA device index),
    once they are all on that one device and this build can run there."""
    first = None
    for t in tensors.values():
        if t is None:
            continue
        if first is None:
            first = t
        # Cheaper than comparing devices, and as exact: the index, and the CUDA and meta flags.
        elif t.get_device() != first.get_device() or t.is_cuda != first.is_cuda or t.is_meta != first.is_meta:
            where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items() if t is not None)
            raise ValueError(f"all tensors must be on one device; got {where}")
    device = first.device
    if device.type == "cpu":
        return CPU
    if device.type != "cuda":
        name = next(name for name, t in tensors.items() if t is not None)
        raise ValueError(f"convrot_kernels runs on CPU and CUDA tensors; {name} is on {device}")
    if not _HAS_CUDA:
        name = next(name for name, t in tensors.items() if t is not None)
        raise ValueError(
            f"{name} is on {device}, but this convrot_kernels build has no CUDA backend "
            "(reinstall it with CONVROT_CUDA=ON on a machine with nvcc)"
        )
    return device.index


def stream(device: int) -> int:
    """The raw handle of PyTorch's current stream on `device` (a checked tensor's ``get_device()``:
    its CUDA index, or -1 for the CPU, the compiled module's device argument); 0 for the CPU."""
    return 0 if device == CPU else torch._C._cuda_getCurrentRawStream(device)


def eager_or_traced(op, eager):
    """The function a public op runs: its torch.library op while torch.compile traces (which needs the
    op and its fake), the op's Python body otherwise, sparing eager calls the op's dispatch (tens of
    microseconds, more than the kernels' own launch)."""
    return op if torch.compiler.is_compiling() else eager
