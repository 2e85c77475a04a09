"""The ConvLinear forwards as calls of the kernels' public ops.

Each convrot_kernels op checks its arguments once and, while torch.compile traces, is a
torch.library op with a fake implementation, so a model of ConvLinear layers compiles with
fullgraph=True and captures in CUDA graphs; eager calls skip the op dispatch. The regular
rotation happens inside the kernels; the Sylvester one, an ablation, is applied here in torch
and the kernels quantize without rotating.

Every forward takes the scheme as ``bits`` (the weights' width), ``act_bits`` (the activations',
None: the same; W4A8 is ``bits=4, act_bits=8``) and, for group-scaled 4-bit weights, the layers'
multipliers (``group_scale``, one per layer for the shared-input forms).

``linear_forward`` is one layer (``convrot_kernels.linear``); ``shared_input_forward`` several
layers that read one input (one activation quantization, a GEMM each);
``normed_input_forward`` the same for an input that is an AdaLN norm's output, computed inside
the activation quantization, and ``residual_normed_input_forward`` for the norm of a gated
residual sum, which it also returns.
"""

from __future__ import annotations

import torch

import convrot_kernels

from .fused_input import materialize
from .hadamard import rotate_groups


def _kernel_group(group_size: int, rotation: str) -> int:
    """The kernels' group_size argument: 0 quantizes without rotating."""
    return group_size if rotation == "regular" else 0


def _sylvester_rows(x, x2, gelu_from, group_size) -> torch.Tensor:
    """The ablation's input, rotated in fp32 by torch: [rows, K]."""
    rows = rotate_groups(materialize(x, x2, gelu_from).float(), "sylvester", group_size)
    return rows.reshape(-1, rows.shape[-1])


def _act_bits(bits: int, act_bits: int | None) -> int:
    return bits if act_bits is None else act_bits


def _products(q, scale, qweights, weight_scales, biases, bits, act_bits, group_scales, dtype, lead):
    """The GEMM of one input's codes with each layer's weights, in `dtype`, shaped [*lead, N]."""
    if group_scales is None:
        group_scales = [None] * len(qweights)
    return [
        convrot_kernels.gemm(
            q,
            scale,
            qweight,
            weight_scale,
            bias,
            bits=bits,
            act_bits=act_bits,
            group_scale=group_scale,
            out_dtype=dtype,
        ).view(*lead, qweight.shape[0])
        for qweight, weight_scale, bias, group_scale in zip(qweights, weight_scales, biases, group_scales, strict=True)
    ]


def linear_forward(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    rotation: str,
    x2: torch.Tensor | None = None,
    gelu_from: int | None = None,
    act_bits: int | None = None,
    group_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = dequant(quant(rotate(x)) @ qweight^T) + bias for x [..., K]; returns [..., N] in x's dtype.

    Given in parts, the input is ``cat([x, x2], -1)`` with GELU from column ``gelu_from``
    on, built by the quantization kernel as it loads the rows (fused_input.py).
    """
    if rotation == "sylvester":
        rows = _sylvester_rows(x, x2, gelu_from, group_size)
        y = convrot_kernels.linear(
            rows, qweight, weight_scale, bias, bits=bits, group_size=0, act_bits=act_bits, group_scale=group_scale
        )
        return y.to(x.dtype).view(*x.shape[:-1], qweight.shape[0])
    return convrot_kernels.linear(
        x, qweight, weight_scale, bias, bits=bits, group_size=_kernel_group(group_size, rotation), x2=x2,
        gelu_from=gelu_from, act_bits=act_bits, group_scale=group_scale,
    )  # fmt: skip


def shared_input_forward(
    x: torch.Tensor,
    qweights: list[torch.Tensor],
    weight_scales: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    bits: int,
    group_size: int,
    rotation: str,
    x2: torch.Tensor | None = None,
    gelu_from: int | None = None,
    act_bits: int | None = None,
    group_scales: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """linear_forward of several layers' weights on one input, which is rotated and quantized once.

    The activation codes depend only on the input (per-token scales), so each output equals
    that layer's linear_forward bit for bit.
    """
    lead = x.shape[:-1]
    a_bits = _act_bits(bits, act_bits)
    if rotation == "sylvester":
        q, scale = convrot_kernels.rht_quantize(_sylvester_rows(x, x2, gelu_from, group_size), 0, a_bits)
    else:
        rows2 = None if x2 is None else x2.reshape(-1, x2.shape[-1])
        q, scale = convrot_kernels.rht_quantize(
            x.reshape(-1, x.shape[-1]), _kernel_group(group_size, rotation), a_bits, x2=rows2, gelu_from=gelu_from
        )
    return _products(q, scale, qweights, weight_scales, biases, bits, act_bits, group_scales, x.dtype, lead)


def normed_input_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    prefix: torch.Tensor | None,
    qweights: list[torch.Tensor],
    weight_scales: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    bits: int,
    group_size: int,
    rotation: str,
    act_bits: int | None = None,
    group_scales: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """shared_input_forward of ``layer_norm_modulate(x, scale, shift, eps=eps, prefix=prefix)``, bit for bit.

    The norm is computed by the quantization kernel as it loads each row
    (``convrot_kernels.layer_norm_modulate_rht_quantize``), so the normed tensor never goes to
    memory. Outputs are [batch, tokens0 + tokens, N].
    """
    if rotation == "sylvester":  # ablation only: through the normed tensor
        normed = convrot_kernels.layer_norm_modulate(x, scale, shift, eps=eps, prefix=prefix)
        return shared_input_forward(
            normed,
            qweights,
            weight_scales,
            biases,
            bits,
            group_size,
            rotation,
            act_bits=act_bits,
            group_scales=group_scales,
        )
    lead = (x.shape[0], x.shape[1] + (0 if prefix is None else prefix.shape[1]))
    q, row_scale = convrot_kernels.layer_norm_modulate_rht_quantize(
        x,
        scale,
        shift,
        eps=eps,
        prefix=prefix,
        group_size=_kernel_group(group_size, rotation),
        bits=_act_bits(bits, act_bits),
    )
    return _products(q, row_scale, qweights, weight_scales, biases, bits, act_bits, group_scales, x.dtype, lead)


def residual_normed_input_forward(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    qweights: list[torch.Tensor],
    weight_scales: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    bits: int,
    group_size: int,
    rotation: str,
    act_bits: int | None = None,
    group_scales: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(h, normed_input_forward(h, scale, shift, eps, None, ...))`` for ``h = x + gate[:, None] * branch``
    (each step rounded to x's dtype), bit for bit: the sum, its norm, rotation and quantization in one kernel
    (``convrot_kernels.residual_layer_norm_modulate_rht_quantize``), the normed tensor never in memory."""
    if rotation == "sylvester":  # ablation only: through the normed tensor
        total = x + gate[:, None] * branch
        return total, normed_input_forward(
            total,
            scale,
            shift,
            eps,
            None,
            qweights,
            weight_scales,
            biases,
            bits,
            group_size,
            rotation,
            act_bits,
            group_scales,
        )
    total, q, row_scale = convrot_kernels.residual_layer_norm_modulate_rht_quantize(
        x,
        branch,
        gate,
        scale,
        shift,
        eps=eps,
        group_size=_kernel_group(group_size, rotation),
        bits=_act_bits(bits, act_bits),
    )
    outputs = _products(q, row_scale, qweights, weight_scales, biases, bits, act_bits, group_scales, x.dtype,
                        x.shape[:-1])  # fmt: skip
    return total, outputs
