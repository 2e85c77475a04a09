"""rht_quantize of layer_norm_modulate's output in one pass: a DiT block's AdaLN input norm fused
into the activation quantization of the layers that read it (and, before a block's second norm,
the gated residual sum that norm reads).

A Flux single block normalises and modulates its joint input and hands the result only to
quantized layers, whose first step is to rotate and quantize it: the normed tensor went to memory
and came back once. Here each row is read once (from the text or the image part), normalised,
modulated, rotated and quantized in registers; only the codes and the row scales are written.
The codes equal ``rht_quantize(layer_norm_modulate(...).flatten(0, 1))`` bit for bit, on either
backend (docs/format.md, "layer_norm_modulate_rht_quantize").
"""

from __future__ import annotations

import torch

from . import _C
from ._validation import (
    FLOAT_CODES,
    eager_or_traced,
    require_bits,
    require_even_for_4bit,
    require_group_size,
    require_tensor,
    stream,
)
from .layer_norm_modulate import check_norm_inputs, norm_arguments
from .quantize import empty_codes


def _code_arguments(group_size, bits, k: int) -> tuple[int, int]:
    """Checked (group_size, bits) for rows of k elements; group_size 0 means no rotation."""
    bits = require_bits(bits)
    require_even_for_4bit(bits, k)
    return require_group_size(group_size, k, allow_none=True), bits


def _layer_norm_modulate_rht_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    prefix: torch.Tensor | None,
    group_size: int,
    bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    held, args = norm_arguments(x, scale, shift, eps, prefix)
    batch, tokens, k = args[0], args[1], args[3]
    q, q_scale = empty_codes(batch * tokens, k, bits, x.device)
    device = x.get_device()
    _C.layer_norm_modulate_rht_quantize(
        held[0].data_ptr(),
        FLOAT_CODES[x.dtype],
        *args,
        group_size,
        bits,
        q.data_ptr(),
        q_scale.data_ptr(),
        device,
        stream(device),
    )
    return q, q_scale


# group_size 0 means no rotation.
_layer_norm_modulate_rht_quantize_op = torch.library.custom_op(
    "convrot_kernels::layer_norm_modulate_rht_quantize", _layer_norm_modulate_rht_quantize, mutates_args=()
)


@_layer_norm_modulate_rht_quantize_op.register_fake
def _(x, scale, shift, eps, prefix, group_size, bits):
    tokens = x.shape[1] + (0 if prefix is None else prefix.shape[1])
    return empty_codes(x.shape[0] * tokens, x.shape[2], bits, x.device)


def layer_norm_modulate_rht_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    eps: float = 1e-6,
    prefix: torch.Tensor | None = None,
    group_size: int = 256,
    bits: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rht_quantize(layer_norm_modulate(x, scale, shift, eps=eps, prefix=prefix).flatten(0, 1), group_size, bits)``
    without the normed tensor in memory.

    Arguments as :func:`layer_norm_modulate` (x [batch, tokens, K], scale and shift [batch, K],
    the optional text prefix) and :func:`rht_quantize` (``group_size=0``: quantize without
    rotating, as :func:`quantize`). Returns ``(q, scale)`` for the batch * (tokens0 + tokens) rows
    in order: q uint8 [rows, K/2] for bits=4, int8 [rows, K] for bits=8; scale float32 [rows].
    On CUDA the rows are normed in registers where the row engine's fast path takes them
    (K a multiple of 16, at most 16384, 16-byte aligned rows); elsewhere the normed rows pass
    through a temporary buffer. A torch.library op under torch.compile.
    """
    check_norm_inputs(x, scale, shift, eps, prefix)
    group_size, bits = _code_arguments(group_size, bits, x.shape[2])
    run = eager_or_traced(_layer_norm_modulate_rht_quantize_op, _layer_norm_modulate_rht_quantize)
    return run(x, scale, shift, float(eps), prefix, group_size, bits)


def _residual_layer_norm_modulate_rht_quantize(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    group_size: int,
    bits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    held, args = norm_arguments(x, scale, shift, eps, None)
    batch, tokens, _, k, x_batch_stride, _, _, scale_ptr, shift_ptr, modulation_stride, _ = args
    branch = branch.contiguous()
    gate = gate if gate.stride(-1) == 1 else gate.contiguous()
    total = torch.empty((batch, tokens, k), dtype=x.dtype, device=x.device)
    q, q_scale = empty_codes(batch * tokens, k, bits, x.device)
    device = x.get_device()
    _C.residual_layer_norm_modulate_rht_quantize(
        held[0].data_ptr(),
        FLOAT_CODES[x.dtype],
        batch,
        tokens,
        k,
        x_batch_stride,
        branch.data_ptr(),
        gate.data_ptr(),
        gate.stride(0),
        total.data_ptr(),
        scale_ptr,
        shift_ptr,
        modulation_stride,
        eps,
        group_size,
        bits,
        q.data_ptr(),
        q_scale.data_ptr(),
        device,
        stream(device),
    )
    return total, q, q_scale


_residual_layer_norm_modulate_rht_quantize_op = torch.library.custom_op(
    "convrot_kernels::residual_layer_norm_modulate_rht_quantize",
    _residual_layer_norm_modulate_rht_quantize,
    mutates_args=(),
)


@_residual_layer_norm_modulate_rht_quantize_op.register_fake
def _(x, branch, gate, scale, shift, eps, group_size, bits):
    total = torch.empty_like(x, memory_format=torch.contiguous_format)
    return total, *empty_codes(x.shape[0] * x.shape[1], x.shape[2], bits, x.device)


def residual_layer_norm_modulate_rht_quantize(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    eps: float = 1e-6,
    group_size: int = 256,
    bits: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, *layer_norm_modulate_rht_quantize(h, scale, shift, eps=eps, ...))`` for
    ``h = x + gate[:, None] * branch``: a DiT block's residual update and the second norm that reads it.

    x and branch [batch, tokens, K], gate, scale and shift [batch, K], all of x's dtype; the product
    and the sum are each rounded to the dtype (as diffusers' eager ``x + gate.unsqueeze(1) * branch``).
    Returns h (a new contiguous tensor, the block's updated hidden states) and the codes and row
    scales of its normed rows, which never go to memory. A torch.library op under torch.compile.
    """
    check_norm_inputs(x, scale, shift, eps, None)
    for name, t, shape in (("branch", branch, tuple(x.shape)), ("gate", gate, (x.shape[0], x.shape[2]))):
        require_tensor(name, t)
        if tuple(t.shape) != shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"{name} must be {list(shape)} with x's dtype ({x.dtype}) and device; got {t.dtype} {tuple(t.shape)}"
                f" on {t.device}"
            )
    group_size, bits = _code_arguments(group_size, bits, x.shape[2])
    run = eager_or_traced(_residual_layer_norm_modulate_rht_quantize_op, _residual_layer_norm_modulate_rht_quantize)
    return run(x, branch, gate, scale, shift, float(eps), group_size, bits)
