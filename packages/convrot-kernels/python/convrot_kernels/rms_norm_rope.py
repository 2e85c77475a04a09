"""RMSNorm of each attention head, then the rotary position embedding, in one pass.

The q/k normalisation of Flux-style attention: ``torch.nn.RMSNorm`` on the
head dimension followed by diffusers' ``apply_rotary_emb`` (interleaved pairs), whose eager
form runs a dozen fp32 elementwise kernels per tensor. The contract is
docs/format.md, "rms_norm_rope".
"""

from __future__ import annotations

import torch

from . import _C
from ._validation import (
    FLOAT_CODES,
    FLOAT_DTYPES,
    device_index,
    eager_or_traced,
    require_dtype,
    require_eps,
    require_rows,
    require_tensor,
    stream,
)

MAX_HEAD_DIM = 1024


def _check_x(x: torch.Tensor) -> None:
    require_tensor("x", x)
    require_dtype("x", x, FLOAT_DTYPES)
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D [batch, tokens, heads, head_dim]; got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if d % 2 or not 2 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"the head dimension must be even, 2 to {MAX_HEAD_DIM}; got {d}")


def _check_weight(name: str, weight, x: torch.Tensor) -> None:
    d = x.shape[-1]
    if weight is not None:
        require_tensor(name, weight)
        if weight.shape != (d,) or weight.dtype != x.dtype:
            raise ValueError(
                f"{name} must be [{d}] (the head dimension) with x's dtype ({x.dtype}); "
                f"got {weight.dtype} {tuple(weight.shape)}"
            )


def _check_parameters(x: torch.Tensor, weight, cos, sin, eps, tokens: int | None = None) -> float:
    """Checks weight, cos, sin and eps for x; the angles cover `tokens` rows (default: x's)."""
    d = x.shape[-1]
    tokens = x.shape[1] if tokens is None else tokens
    _check_weight("weight", weight, x)
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (or neither, for RMSNorm alone)")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            require_tensor(name, t)
            if t.dtype != torch.float32 or t.shape != (tokens, d):
                raise ValueError(
                    f"{name} must be float32 [tokens, head_dim] = [{tokens}, {d}]; got {t.dtype} {tuple(t.shape)}"
                )
    require_rows("x", x.shape[0] * tokens * x.shape[2])
    device_index(x=x, weight=weight, cos=cos, sin=sin)
    return require_eps("eps", eps)


def _launch(x, weight, cos, sin, eps: float, out: torch.Tensor) -> torch.Tensor:
    """The kernel call; x and out have the last dimension contiguous, the parameters are contiguous."""
    b, s, h, d = x.shape
    device = x.get_device()
    _C.rms_norm_rope(
        x.data_ptr(),
        *x.stride()[:3],
        out.data_ptr(),
        *out.stride()[:3],
        FLOAT_CODES[x.dtype],
        b,
        s,
        h,
        d,
        0 if weight is None else weight.data_ptr(),
        0 if cos is None else cos.data_ptr(),
        0 if sin is None else sin.data_ptr(),
        eps,
        device,
        stream(device),
    )
    return out


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _rms_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float,
    prefix: torch.Tensor | None = None,
    prefix_weight: torch.Tensor | None = None,
    prefix_eps: float = 1e-6,
) -> torch.Tensor:
    s0 = 0 if prefix is None else prefix.shape[1]
    b, s, h, d = x.shape
    out = torch.empty((b, s0 + s, h, d), dtype=x.dtype, device=x.device)
    cos, sin = _contiguous(cos), _contiguous(sin)

    def angles(lo, hi):
        return (None, None) if cos is None else (cos[lo:hi], sin[lo:hi])  # row ranges: still contiguous

    if prefix is not None:
        _launch(_rows_contiguous(prefix), _contiguous(prefix_weight), *angles(0, s0), prefix_eps, out[:, :s0])
    _launch(_rows_contiguous(x), _contiguous(weight), *angles(s0, s0 + s), eps, out[:, s0:])
    return out


_rms_norm_rope_op = torch.library.custom_op("convrot_kernels::rms_norm_rope", _rms_norm_rope, mutates_args=())


@_rms_norm_rope_op.register_fake
def _(x, weight, cos, sin, eps, prefix=None, prefix_weight=None, prefix_eps=1e-6):
    tokens = x.shape[1] + (0 if prefix is None else prefix.shape[1])
    return x.new_empty((x.shape[0], tokens, *x.shape[2:]))


def rms_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    prefix: torch.Tensor | None = None,
    prefix_weight: torch.Tensor | None = None,
    prefix_eps: float = 1e-6,
) -> torch.Tensor:
    """RMSNorm over the last dimension of x [batch, tokens, heads, head_dim], then the rotary embedding.

    Each row ``r = x[b, s, h, :]`` becomes ``rope(round(r / rms(r) * weight), s)``: in
    fp32, ``eps`` added to the mean square, rounded once to x's dtype as
    ``torch.nn.functional.rms_norm`` does; then elements (2i, 2i+1) rotated by ``cos[s]``,
    ``sin[s]`` (float32 [tokens, head_dim]) in fp32 and rounded, as diffusers'
    ``apply_rotary_emb`` with ``use_real_unbind_dim=-1``. Without ``weight`` no scaling; without ``cos``/``sin``
    no rotation. x may be a strided view (e.g. q out of a fused qkv projection); the result
    is a new contiguous tensor. With ``prefix`` [batch, tokens0, heads, head_dim] (its own
    ``prefix_weight`` and ``prefix_eps``) the result is the joint
    ``cat([rms_norm_rope(prefix), rms_norm_rope(x)], 1)`` of a two-stream attention, each part
    written in place (no concatenation), and cos and sin cover the tokens0 + tokens joint rows.
    A torch.library op under torch.compile.
    """
    _check_x(x)
    tokens = x.shape[1]
    if prefix is not None:
        require_tensor("prefix", prefix)
        if (
            prefix.ndim != 4
            or prefix.shape[0] != x.shape[0]
            or prefix.shape[2:] != x.shape[2:]
            or prefix.dtype != x.dtype
        ):
            raise ValueError(
                f"prefix must be [batch, tokens0, heads, head_dim] = [{x.shape[0]}, *, {x.shape[2]}, {x.shape[3]}] "
                f"with x's dtype ({x.dtype}); got {prefix.dtype} {tuple(prefix.shape)}"
            )
        tokens += prefix.shape[1]
        _check_weight("prefix_weight", prefix_weight, x)
        prefix_eps = require_eps("prefix_eps", prefix_eps)
        device_index(x=x, prefix=prefix, prefix_weight=prefix_weight)
    elif prefix_weight is not None:
        raise ValueError("prefix_weight needs a prefix")
    eps = _check_parameters(x, weight, cos, sin, eps, tokens)
    run = eager_or_traced(_rms_norm_rope_op, _rms_norm_rope)
    return run(x, weight, cos, sin, eps, prefix, prefix_weight, float(prefix_eps))


def rms_norm_rope_into(
    x: torch.Tensor,
    out: torch.Tensor,
    weight: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Destination-passing :func:`rms_norm_rope`: writes into ``out`` and returns it.

    ``out`` has x's shape and dtype and may be a strided view, e.g. the image part of the
    joint [text + image] query that attention reads, so that no concatenation follows; it
    may also be x itself. x and out need a contiguous last dimension, weight, cos and sin
    must be contiguous. Eager only (not a torch.library op), for hot paths.
    """
    _check_x(x)
    eps = _check_parameters(x, weight, cos, sin, eps)
    require_tensor("out", out)
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must have x's shape, dtype and device ({tuple(x.shape)}, {x.dtype}, {x.device}); "
            f"got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    for name, t in (("x", x), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension; got strides {t.stride()}")
    for name, t in (("weight", weight), ("cos", cos), ("sin", sin)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return _launch(x, weight, cos, sin, eps, out)
