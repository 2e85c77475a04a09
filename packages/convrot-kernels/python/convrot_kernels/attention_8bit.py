"""Softmax attention with 8-bit operands: q and k Hadamard-rotated and quantized to int8, P and V in
fp8 e4m3, softmax and accumulation in fp32 (docs/format.md, "attention_8bit").

The CPU backend is the reference of the numerics; the CUDA backend runs an sm_90a (Hopper) kernel
and refuses other GPUs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _C
from ._validation import FLOAT_CODES, device_index, eager_or_traced, require_dtype, require_tensor, stream

DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 128)
BLOCK = 128  # queries and keys are padded to whole blocks of 128 in the codes


class AttentionCodes(NamedTuple):
    """The pre-pass's codes and scales (BH = batch * heads, N_pad = N rounded up to 128)."""

    q8: torch.Tensor  # int8 [BH, Nq_pad, D], rows rotated by rht(., 64)
    sq: torch.Tensor  # float32 [BH, Nq_pad], per query
    k8: torch.Tensor  # int8 [BH, Nkv_pad, D], rows rotated by rht(., 64)
    sk: torch.Tensor  # float32 [BH, Nkv_pad / 128], per block of 128 keys
    vt8: torch.Tensor  # uint8 e4m3 codes [BH, D, Nkv_pad], V transposed, keys permuted in groups of 32
    sv: torch.Tensor  # float32 [BH, D], per channel


def _padded(tokens: int) -> int:
    return -(-tokens // BLOCK) * BLOCK


def _check(query, key, value, scale) -> float:
    """Checks the operands; returns the softmax scale (1 / sqrt(D) by default)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        require_tensor(name, t)
        require_dtype(name, t, DTYPES)
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D [batch, tokens, heads, head_dim]; got shape {tuple(t.shape)}")
    b, _, h, d = query.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"the head dimension must be one of {HEAD_DIMS}; got {d}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must have one dtype; got {query.dtype}, {key.dtype}, {value.dtype}")
    if key.shape != value.shape or key.shape[0] != b or key.shape[2:] != (h, d):
        raise ValueError(
            f"key and value must both be [batch, kv_tokens, heads, head_dim] = [{b}, *, {h}, {d}] (query's batch, "
            f"heads and head_dim); got key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if query.numel() == 0:
        raise ValueError(f"query has no rows (shape {tuple(query.shape)}): there is nothing to compute")
    if key.shape[1] == 0:
        raise ValueError("key and value have no tokens: softmax over zero keys is undefined")
    device_index(query=query, key=key, value=value)
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number (or None for 1/sqrt(head_dim)); got {scale!r}")
    return float(scale)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_codes(query: torch.Tensor, key: torch.Tensor) -> AttentionCodes:
    b, nq, h, d = query.shape
    nq_pad, nkv_pad, bh = _padded(nq), _padded(key.shape[1]), b * h
    dev = query.device
    return AttentionCodes(
        torch.empty((bh, nq_pad, d), dtype=torch.int8, device=dev),
        torch.empty((bh, nq_pad), dtype=torch.float32, device=dev),
        torch.empty((bh, nkv_pad, d), dtype=torch.int8, device=dev),
        torch.empty((bh, nkv_pad // BLOCK), dtype=torch.float32, device=dev),
        torch.empty((bh, d, nkv_pad), dtype=torch.uint8, device=dev),
        torch.empty((bh, d), dtype=torch.float32, device=dev),
    )


def _operands(query, key, value) -> list:
    """The compiled entries' leading arguments: each tensor's pointer and strides, the dtype and shape."""
    b, nq, h, d = query.shape
    args = []
    for t in (query, key, value):
        args += [t.data_ptr(), *t.stride()[:3]]
    return [*args, FLOAT_CODES[query.dtype], b, h, nq, key.shape[1], d]


def _attention_8bit(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    query, key, value = _rows_contiguous(query), _rows_contiguous(key), _rows_contiguous(value)
    codes = _empty_codes(query, key)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    device = query.get_device()
    _C.attention_8bit(
        *_operands(query, key, value),
        *(c.data_ptr() for c in codes),
        scale * math.log2(math.e),
        out.data_ptr(),
        *out.stride()[:3],
        device,
        stream(device),
    )
    return out


_attention_8bit_op = torch.library.custom_op("convrot_kernels::attention_8bit", _attention_8bit, mutates_args=())


@_attention_8bit_op.register_fake
def _(query, key, value, scale):
    return query.new_empty(query.shape)


def attention_8bit(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Non-causal ``softmax(scale * Q Kᵀ) V`` per batch and head with 8-bit operands.

    query [batch, q_tokens, heads, head_dim], key and value [batch, kv_tokens, heads, head_dim]
    (the layout diffusers' attention processors hold, before their transpose), bf16 or fp16, one
    dtype and device, head_dim 64 or 128; views with a contiguous last dimension are read in place.
    ``scale`` defaults to 1 / sqrt(head_dim). Returns a new contiguous [batch, q_tokens, heads,
    head_dim] tensor of query's dtype. q and k rows are rotated by the regular Hadamard of order 64
    and quantized to int8 (per query, per block of 128 keys), V to fp8 e4m3 per channel and P to
    e4m3; softmax in fp32 (docs/format.md). CUDA needs an sm_90a (Hopper) GPU. A torch.library op
    under torch.compile.
    """
    scale = _check(query, key, value, scale)
    return eager_or_traced(_attention_8bit_op, _attention_8bit)(query, key, value, scale)


def attention_8bit_prepass(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> AttentionCodes:
    """The codes and scales :func:`attention_8bit` computes from its operands before the attention
    (docs/format.md; both backends write the same bytes). Arguments as for :func:`attention_8bit`."""
    _check(query, key, value, None)
    query, key, value = _rows_contiguous(query), _rows_contiguous(key), _rows_contiguous(value)
    codes = _empty_codes(query, key)
    device = query.get_device()
    _C.attention_8bit_prepass(*_operands(query, key, value), *(c.data_ptr() for c in codes), device, stream(device))
    return codes
