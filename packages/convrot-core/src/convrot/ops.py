"""The ConvLinear forward, and the same as a torch.library custom op (namespace ``convrot``).

``linear_forward`` is what an eager forward runs: two destination-passing kernel
calls, with no argument checks beyond the compiled module's (the layer's
buffers are well formed by construction) and no nested dispatch, because host
time per call decides eager speed. The custom op wraps the same function with a
fake (meta) implementation, so that torch.compile traces a model of ConvLinear
layers with fullgraph=True; neither synchronises, so CUDA-graph capture works.
``shared_input_forward`` (op ``convrot::shared_input_linear``) is the forward of
several layers that read one input: one activation quantization, a GEMM each;
``normed_input_forward`` (op ``convrot::normed_input_linear``) the same for an input
that is an AdaLN norm's output, computed inside the activation quantization, and
``residual_normed_input_forward`` (op ``convrot::residual_normed_input_linear``) for
the norm of a gated residual sum, which it also returns.
"""

from __future__ import annotations

import torch

import convrot_kernels

from .fused_input import materialize
from .hadamard import rotate_groups


def _code_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits == 4 else torch.int8


def _act_bits(bits: int, act_bits: int | None) -> int:
    """The activations' width: the weights' unless the scheme sets its own (W4A8)."""
    return bits if act_bits is None else act_bits


def _quantized_rows(x, x2, gelu_from, code_dtype, bits, group_size, rotation):
    """(codes, row scales) of the rows of x [..., K], or of cat([x, x2], -1), for the GEMM."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    rows2 = None if x2 is None else x2.reshape(-1, x2.shape[-1]).contiguous()
    gelu = None if gelu_from < 0 else gelu_from
    m = rows.shape[0]
    k = rows.shape[1] + (0 if rows2 is None else rows2.shape[1])
    q = torch.empty((m, k // 2 if bits == 4 else k), dtype=code_dtype, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m > 0:
        group = group_size if rotation == "regular" else 0
        if rotation == "sylvester":
            # Ablation only: the fused kernels implement the regular rotation alone.
            rows = rotate_groups(materialize(rows, rows2, gelu).float(), rotation, group_size)
            rows2 = gelu = None
        convrot_kernels.rht_quantize_into(rows, q, scale, group, bits, x2=rows2, gelu_from=gelu)
    return q, scale


def _dequantized_product(
    x, q, scale, qweight, weight_scale, bias, bits, lead=None, act_bits=None, group_scale=None
) -> torch.Tensor:
    """gemm of the activation codes with one layer's weights, in x's dtype, shaped [*lead, N] (lead: x's
    leading dims by default)."""
    n = qweight.shape[0]
    shape = (*(x.shape[:-1] if lead is None else lead), n)
    if bias is not None and bias.dtype != torch.float32:  # layers keep an fp32 bias; one set by hand may not
        bias = bias.float()
    if _act_bits(bits, act_bits) != bits or group_scale is not None:  # W4A8, group-scaled weights
        out = convrot_kernels.gemm(
            q, scale, qweight, weight_scale, bias, weight_bits=bits, act_bits=act_bits, group_scale=group_scale,
            out_dtype=x.dtype,
        )
        return out.reshape(shape)
    out = torch.empty((q.shape[0], n), dtype=x.dtype, device=x.device)
    if q.shape[0] > 0:
        convrot_kernels.gemm_into(out, q, scale, qweight, weight_scale, bias, bits=bits)
    return out.reshape(shape)


def _dequantized_products(
    x, q, scale, qweights, weight_scales, biases, bits, lead=None, act_bits=None, group_scales=None
) -> list[torch.Tensor]:
    """_dequantized_product of the same activation codes with each of several layers' weights.

    group_scales: None, or the layers' group-scale rows stacked in layer order (one tensor, which a
    torch.library schema can take where an optional list of tensors it cannot)."""
    if group_scales is None:
        group_scales = [None] * len(qweights)
    else:
        group_scales = group_scales.split([qweight.shape[0] for qweight in qweights])
    return [
        _dequantized_product(x, q, scale, qweight, weight_scale, bias, bits, lead, act_bits, group_scale)
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
    gelu_from: int = -1,
    act_bits: int | None = None,
    group_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = dequant(quant(rotate(x)) @ qweight^T) + bias for x [..., K]; returns [..., N] in x's dtype.

    Given in parts, the input is ``cat([x, x2], -1)`` with GELU from column ``gelu_from``
    on (-1: none), built by the quantization kernel as it loads the rows (fused_input.py).
    ``bits`` is the weights' width, ``act_bits`` the activations' (None: the same);
    ``group_scale`` the multipliers of group-scaled 4-bit weights.
    """
    a_bits = _act_bits(bits, act_bits)
    q, scale = _quantized_rows(x, x2, gelu_from, _code_dtype(a_bits), a_bits, group_size, rotation)
    return _dequantized_product(x, q, scale, qweight, weight_scale, bias, bits, None, act_bits, group_scale)


def shared_input_forward(
    x: torch.Tensor,
    qweights: list[torch.Tensor],
    weight_scales: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    bits: int,
    group_size: int,
    rotation: str,
    x2: torch.Tensor | None = None,
    gelu_from: int = -1,
    act_bits: int | None = None,
    group_scales: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """linear_forward of several layers' weights on one input, which is rotated and quantized once.

    The activation codes depend only on the input (per-token scales), so each output equals
    that layer's linear_forward bit for bit.
    """
    a_bits = _act_bits(bits, act_bits)
    q, scale = _quantized_rows(x, x2, gelu_from, _code_dtype(a_bits), a_bits, group_size, rotation)
    return _dequantized_products(x, q, scale, qweights, weight_scales, biases, bits, None, act_bits, group_scales)


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
    group_scales: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """shared_input_forward of ``layer_norm_modulate(x, scale, shift, eps=eps, prefix=prefix)``, bit for bit.

    The norm is computed by the quantization kernel as it loads each row
    (``convrot_kernels.layer_norm_modulate_rht_quantize``), so the normed tensor never goes to
    memory. Outputs are [batch, tokens0 + tokens, N].
    """
    lead = (x.shape[0], x.shape[1] + (0 if prefix is None else prefix.shape[1]))
    if rotation == "sylvester":  # ablation only: through the normed tensor
        normed = convrot_kernels.layer_norm_modulate(x, scale, shift, eps=eps, prefix=prefix)
        return shared_input_forward(
            normed, qweights, weight_scales, biases, bits, group_size, rotation, act_bits=act_bits,
            group_scales=group_scales,
        )
    group = group_size if rotation == "regular" else 0
    q, row_scale = convrot_kernels.layer_norm_modulate_rht_quantize(
        x, scale, shift, eps=eps, prefix=prefix, group_size=group, bits=_act_bits(bits, act_bits)
    )
    return _dequantized_products(x, q, row_scale, qweights, weight_scales, biases, bits, lead, act_bits, group_scales)


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
    group_scales: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``[h, *normed_input_forward(h, scale, shift, eps, None, ...)]`` for ``h = x + gate[:, None] * branch``
    (each step rounded to x's dtype), bit for bit: the sum, its norm, rotation and quantization in one kernel
    (``convrot_kernels.residual_layer_norm_modulate_rht_quantize``), the normed tensor never in memory."""
    if rotation == "sylvester":  # ablation only: through the normed tensor
        total = x + gate[:, None] * branch
        return [
            total,
            *normed_input_forward(
                total, scale, shift, eps, None, qweights, weight_scales, biases, bits, group_size, rotation,
                act_bits, group_scales,
            ),
        ]
    group = group_size if rotation == "regular" else 0
    total, q, row_scale = convrot_kernels.residual_layer_norm_modulate_rht_quantize(
        x, branch, gate, scale, shift, eps=eps, group_size=group, bits=_act_bits(bits, act_bits)
    )
    outputs = _dequantized_products(
        x, q, row_scale, qweights, weight_scales, biases, bits, None, act_bits, group_scales
    )
    return [total, *outputs]


# The same function as an opaque op for torch.compile (its signature gives the op's schema).
quantized_linear = torch.library.custom_op("convrot::quantized_linear", linear_forward, mutates_args=())


@quantized_linear.register_fake
def _quantized_linear_fake(
    x, qweight, weight_scale, bias, bits, group_size, rotation, x2=None, gelu_from=-1, act_bits=None, group_scale=None
):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


shared_input_linear = torch.library.custom_op("convrot::shared_input_linear", shared_input_forward, mutates_args=())


@shared_input_linear.register_fake
def _shared_input_linear_fake(
    x, qweights, weight_scales, biases, bits, group_size, rotation, x2=None, gelu_from=-1, act_bits=None,
    group_scales=None,
):
    return [x.new_empty((*x.shape[:-1], qweight.shape[0])) for qweight in qweights]


normed_input_linear = torch.library.custom_op("convrot::normed_input_linear", normed_input_forward, mutates_args=())


@normed_input_linear.register_fake
def _normed_input_linear_fake(
    x, scale, shift, eps, prefix, qweights, weight_scales, biases, bits, group_size, rotation, act_bits=None,
    group_scales=None,
):
    tokens = x.shape[1] + (0 if prefix is None else prefix.shape[1])
    return [x.new_empty((x.shape[0], tokens, qweight.shape[0])) for qweight in qweights]


residual_normed_input_linear = torch.library.custom_op(
    "convrot::residual_normed_input_linear", residual_normed_input_forward, mutates_args=()
)


@residual_normed_input_linear.register_fake
def _residual_normed_input_linear_fake(
    x, branch, gate, scale, shift, eps, qweights, weight_scales, biases, bits, group_size, rotation, act_bits=None,
    group_scales=None,
):
    total = torch.empty_like(x, memory_format=torch.contiguous_format)
    return [total] + [x.new_empty((*x.shape[:-1], qweight.shape[0])) for qweight in qweights]
