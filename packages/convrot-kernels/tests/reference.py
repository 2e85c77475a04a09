"""Float64 reference of docs/format.md, written independently of the code under test."""

from __future__ import annotations

import numpy as np
import torch

H4 = np.array([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=np.float64)


def regular_hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(H4, h)
    assert h.shape[0] == n, "n must be a power of 4"
    return h / np.sqrt(n)


def rht(x: torch.Tensor, group_size: int) -> np.ndarray:
    """x (any float dtype) rotated group-wise, in float64."""
    v = x.double().numpy()
    groups = v.reshape(*v.shape[:-1], v.shape[-1] // group_size, group_size)
    return (groups @ regular_hadamard(group_size)).reshape(v.shape)


def quantize_rows(v: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes (int64) and fp32-rounded scales of each row of float64 values v."""
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(v).max(axis=1) if v.shape[1] else np.zeros(v.shape[0])
    scale = (amax / qmax).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = v / scale.astype(np.float64)[:, None]
    codes = np.clip(np.rint(ratio), -qmax - 1, qmax)
    codes[scale == 0] = 0
    return codes.astype(np.int64), scale


def tie_distance(v: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """How far each v/scale lies from a rounding boundary (k + 0.5), in code units."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = v / scale.astype(np.float64)[:, None]
    return np.abs(ratio - np.floor(ratio) - 0.5)


def unpack_int4(p: np.ndarray) -> np.ndarray:
    low = (p & 0x0F).astype(np.int64)
    high = (p >> 4).astype(np.int64)
    low = np.where(low > 7, low - 16, low)
    high = np.where(high > 7, high - 16, high)
    return np.stack([low, high], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def gemm(qa: np.ndarray, sa: np.ndarray, qw: np.ndarray, sw: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Integer codes (int64) and float scales to the float64 GEMM output."""
    acc = qa.astype(np.int64) @ qw.astype(np.int64).T
    y = acc.astype(np.float64) * sa.astype(np.float64)[:, None] * sw.astype(np.float64)[None, :]
    if bias is not None:
        y = y + bias.astype(np.float64)[None, :]
    return y


def cast(v: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float64 values rounded to dtype and back: the error of the same math in that precision."""
    return torch.from_numpy(v).to(dtype).double().numpy()


def gelu_tanh(v: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation, in float64."""
    return 0.5 * v * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v**3)))


def gelu_steady(x: torch.Tensor) -> torch.Tensor:
    """x with each element whose GELU lies within 1/20 of a unit in the last place of x's dtype
    from a rounding boundary set to 0: only there may a GELU computed in fp32 (a few fp32 ulps
    off) round to another value of the dtype than the float64 one."""
    if x.dtype == torch.float32:
        return x
    g = gelu_tanh(x.double().numpy())
    eps = 0.05 * 2.0 ** (-8 if x.dtype == torch.bfloat16 else -11)
    steady = cast(g * (1 - eps), x.dtype) == cast(g * (1 + eps), x.dtype)
    return torch.where(torch.from_numpy(steady), x, torch.zeros_like(x))


def fused_rows(x: torch.Tensor, x2: torch.Tensor | None, gelu_from: int | None) -> torch.Tensor:
    """cat([x, x2], 1) with GELU (rounded to x's dtype) from column gelu_from on, in float64."""
    rows = x.double() if x2 is None else torch.cat([x.double(), x2.double()], dim=1)
    if gelu_from is not None:
        tail = cast(gelu_tanh(rows[:, gelu_from:].numpy()), x.dtype)
        rows[:, gelu_from:] = torch.from_numpy(tail)
    return rows


def rms_norm_rope(x: torch.Tensor, weight, cos, sin, eps: float) -> np.ndarray:
    """RMSNorm over the last dimension, then the interleaved-pair rotary embedding, in float64."""
    v = x.double().numpy()
    v = v / np.sqrt((v * v).mean(axis=-1, keepdims=True) + eps)
    if weight is not None:
        v = v * weight.double().numpy()
    if cos is not None:
        c, s = cos.double().numpy()[None, :, None, :], sin.double().numpy()[None, :, None, :]
        rotated = np.stack([-v[..., 1::2], v[..., 0::2]], axis=-1).reshape(v.shape)
        v = v * c + rotated * s
    return v


def rms_norm_rope_torch(x: torch.Tensor, weight, cos, sin, eps: float) -> torch.Tensor:
    """The same in x's precision with torch's eager ops: torch.nn.RMSNorm, then diffusers' apply_rotary_emb."""
    h = torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    if cos is None:
        return h
    real, imag = h.reshape(*h.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (h.float() * cos[None, :, None] + rotated.float() * sin[None, :, None]).to(x.dtype)


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> np.ndarray:
    """LayerNorm without affine over the last dimension, then x * (1 + scale[b]) + shift[b], in float64."""
    v = x.double().numpy()
    mean = v.mean(axis=-1, keepdims=True)
    v = (v - mean) / np.sqrt(((v - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    return v * (1 + scale.double().numpy()[:, None]) + shift.double().numpy()[:, None]


def layer_norm_modulate_torch(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """The same in x's precision with torch's eager ops, as diffusers' AdaLayerNormZeroSingle computes it."""
    normed = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)
    return normed * (1 + scale[:, None]) + shift[:, None]


def attention(q, k, v, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v in float64 (on q's device), [B, N, H, D] in and out."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    return torch.softmax(scale * q @ k.transpose(-1, -2), -1).matmul(v).transpose(1, 2)


def attention_8bit_simulated(q, k, v, scale: float) -> torch.Tensor:
    """The same quantization in float64 torch: q, k rotated (block-diagonal Hadamard of 64) and
    fake-quantized to int8 (per query, per block of 128 keys), V per channel and P (scale 448) through
    e4m3, the normaliser from the unquantized P."""
    d, nkv = q.shape[-1], k.shape[1]
    rot = torch.block_diag(*[torch.from_numpy(regular_hadamard(64))] * (d // 64)).to(q.device)
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
    q, k = q @ rot, k @ rot
    sq = q.abs().amax(-1, keepdim=True) / 127
    q = torch.where(sq > 0, (q / sq).round().clamp(-127, 127) * sq, 0)
    pad = -nkv % 128
    kb = torch.nn.functional.pad(k, (0, 0, 0, pad)).unflatten(2, (-1, 128))
    sk = kb.abs().amax((-1, -2), keepdim=True) / 127
    k = torch.where(sk > 0, (kb / sk).round().clamp(-127, 127) * sk, 0).flatten(2, 3)[:, :, :nkv]
    sv = v.abs().amax(2, keepdim=True) / 448
    v = torch.where(sv > 0, (v / sv).float().to(torch.float8_e4m3fn).double() * sv, 0)
    s = scale * q @ k.transpose(-1, -2)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p8 = (448 * p).float().to(torch.float8_e4m3fn).double() / 448
    return (p8 @ v / p.sum(-1, keepdim=True)).transpose(1, 2)
