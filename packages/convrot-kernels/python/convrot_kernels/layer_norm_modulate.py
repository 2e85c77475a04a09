"""LayerNorm without affine, then AdaLN's modulation, in one pass: the input norm of DiT blocks.

diffusers' AdaLayerNormZero(Single) computes ``norm(x) * (1 + scale[:, None]) + shift[:, None]``
with ``norm`` a ``torch.nn.LayerNorm(elementwise_affine=False)``; in Flux's single blocks
``x`` is ``cat([text, image], 1)``. Under torch.compile that became one inductor reduction
that reads each row twice and ran near 1 TB/s on the H200 (docs/benchmarks.md of 8b40706). Here each row
is read once, from either part (the joint sequence is never concatenated), and written once.
The contract is docs/format.md, "layer_norm_modulate".
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

MAX_WIDTH = 262144  # primitives.h, kLayerNormModulateMaxK


def norm_arguments(x, scale, shift, eps, prefix) -> tuple[tuple, tuple]:
    """(tensors, arguments): the NormModulate arguments of the compiled module's entries (batch .. eps),
    and the tensors they point into, which the caller keeps alive until the kernel has run. x and prefix
    are read in place when each batch's rows are contiguous (_batch_of_rows), scale and shift when they
    share one row stride (diffusers' chunks of one embedding share it); otherwise copies are."""
    if scale.stride() != shift.stride() or scale.stride(-1) != 1 or scale.stride(0) < scale.shape[1]:
        scale, shift = scale.contiguous(), shift.contiguous()
    x = _batch_of_rows(x)
    prefix = None if prefix is None else _batch_of_rows(prefix)
    b, s, k = x.shape
    s0 = 0 if prefix is None else prefix.shape[1]
    return (x, prefix, scale, shift), (
        b,
        s0 + s,
        s0,
        k,
        x.stride(0),
        0 if prefix is None else prefix.data_ptr(),
        0 if prefix is None else prefix.stride(0),
        scale.data_ptr(),
        shift.data_ptr(),
        scale.stride(0),
        eps,
    )


def _batch_of_rows(t: torch.Tensor) -> torch.Tensor:
    """t itself when each batch's rows are contiguous (any batch stride: a Flux single block's text and
    image outputs are slices of its joint sequence), else a contiguous copy."""
    _, tokens, k = t.shape
    rows_contiguous = (t.stride(2) == 1 or k <= 1) and (t.stride(1) == k or tokens <= 1)
    return t if rows_contiguous else t.contiguous()


def check_norm_inputs(x, scale, shift, eps, prefix) -> None:
    """layer_norm_modulate's argument checks, each failure naming the argument."""
    require_tensor("x", x)
    require_dtype("x", x, FLOAT_DTYPES)
    if x.ndim != 3:
        raise ValueError(f"x must be 3-D [batch, tokens, K]; got shape {tuple(x.shape)}")
    b, _, k = x.shape
    if k > MAX_WIDTH:
        raise ValueError(f"rows may have at most {MAX_WIDTH} elements; got {k}")
    if prefix is not None:
        require_tensor("prefix", prefix)
        if prefix.ndim != 3 or prefix.shape[0] != b or prefix.shape[2] != k or prefix.dtype != x.dtype:
            raise ValueError(
                f"prefix must be [batch, tokens0, K] = [{b}, *, {k}] with x's dtype ({x.dtype}); "
                f"got {prefix.dtype} {tuple(prefix.shape)}"
            )
    for name, t in (("scale", scale), ("shift", shift)):
        require_tensor(name, t)
        if t.shape != (b, k) or t.dtype != x.dtype:
            raise ValueError(
                f"{name} must be [batch, K] = [{b}, {k}] with x's dtype ({x.dtype}); got {t.dtype} {tuple(t.shape)}"
            )
    require_eps("eps", eps)
    require_rows("x", b * (x.shape[1] + (0 if prefix is None else prefix.shape[1])))
    device_index(x=x, scale=scale, shift=shift, prefix=prefix)


def _layer_norm_modulate(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, prefix: torch.Tensor | None
) -> torch.Tensor:
    held, args = norm_arguments(x, scale, shift, eps, prefix)
    b, tokens, _, k = args[:4]
    out = torch.empty((b, tokens, k), dtype=x.dtype, device=x.device)
    device = x.get_device()
    _C.layer_norm_modulate(held[0].data_ptr(), out.data_ptr(), FLOAT_CODES[x.dtype], *args, device, stream(device))
    return out


_layer_norm_modulate_op = torch.library.custom_op(
    "convrot_kernels::layer_norm_modulate", _layer_norm_modulate, mutates_args=()
)


@_layer_norm_modulate_op.register_fake
def _(x, scale, shift, eps, prefix):
    tokens = x.shape[1] + (0 if prefix is None else prefix.shape[1])
    return x.new_empty((x.shape[0], tokens, x.shape[2]))


def layer_norm_modulate(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    eps: float = 1e-6,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale[:, None]) + shift[:, None]`` for x [batch, tokens, K].

    The norm has no weight or bias (diffusers' AdaLN norms); mean and variance in fp32,
    ``eps`` added to the variance, the normalised row rounded to x's dtype; then ``1 + scale``,
    the product and the sum each rounded to x's dtype, as torch's eager ops round them.
    scale and shift are [batch, K] in x's dtype (views such as ``emb.chunk(3, dim=1)`` are
    read in place), and so are x and prefix when each batch's rows are contiguous, whatever the
    batch stride (slices of a joint sequence along the tokens). With ``prefix`` [batch, tokens0, K]
    the rows are those of ``cat([prefix, x], 1)``, which is never materialised; the result [batch, tokens0 + tokens, K]
    is a new contiguous tensor. K is at most 262144. A torch.library op under torch.compile.
    """
    check_norm_inputs(x, scale, shift, eps, prefix)
    return eager_or_traced(_layer_norm_modulate_op, _layer_norm_modulate)(x, scale, shift, float(eps), prefix)
