"""Argument checks shared by the public functions: each failure names the argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GROUP_SIZES = (4, 16, 64, 256, 1024)


def require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {str(t.dtype).removeprefix('torch.')}")


def require_ndim(name: str, t: torch.Tensor, ndim: int, shape_hint: str) -> None:
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_hint}; got shape {tuple(t.shape)}")


def require_bits(bits: object) -> int:
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8; got {bits!r}")
    return int(bits)


def require_group_size(group_size: object, k: int) -> int:
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be a power of 4 in 4..1024 (one of {GROUP_SIZES}); got {group_size!r}")
    if k % group_size:
        raise ValueError(f"the last dimension ({k}) must be a multiple of group_size ({group_size})")
    return int(group_size)


def require_same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on the same device; got {where}")
    device = devices.pop()
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"convrot_kernels runs on CPU and CUDA tensors; got a tensor on {device}")
    return device


def stream_of(t: torch.Tensor) -> int:
    """The raw handle of PyTorch's current stream on t's device (0 for CPU)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


# The compiled module's dtype codes (primitives.h, enum Float).
FLOAT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def require_operand(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], device) -> int:
    """Cheap checks of a destination-passing operand; returns its data pointer."""
    require_tensor(name, t)
    require_dtype(name, t, (dtype,))
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {list(shape)}; got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other operands on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t.data_ptr()


def on_device(t: torch.Tensor) -> tuple[bool, int]:
    """(is CUDA, raw current stream) for the compiled module's pointer entries."""
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"convrot_kernels runs on CPU and CUDA tensors; got a tensor on {t.device}")
    return t.is_cuda, stream_of(t)
