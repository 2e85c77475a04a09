"""Float64 reference math for the convrot-core tests, written from docs/format.md
independently of the package (entry formulas, not the package's Kronecker builders)."""

import math

import torch

H4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)


def regular_hadamard(n: int) -> torch.Tensor:
    """R[i, j] = prod over the base-4 digits (i_d, j_d) of H4[i_d, j_d], over sqrt(n)."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    h = torch.ones(n, n, dtype=torch.float64)
    for d in range(round(math.log(n, 4))):
        h *= H4[(i >> (2 * d)) & 3, (j >> (2 * d)) & 3]
    return h / math.sqrt(n)


def sylvester_hadamard(n: int) -> torch.Tensor:
    """S[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
    bits = torch.arange(n)[:, None] & torch.arange(n)[None, :]
    parity = torch.zeros(n, n, dtype=torch.int64)
    while bits.any():
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(torch.float64) / math.sqrt(n)


MATRICES = {"regular": regular_hadamard, "sylvester": sylvester_hadamard}


def rotate(x: torch.Tensor, rotation: str, group_size: int) -> torch.Tensor:
    """Each group of group_size along the last dim times the rotation matrix, in float64."""
    x = x.to(torch.float64)
    if rotation == "none":
        return x
    matrix = MATRICES[rotation](group_size)
    groups = [x[..., j : j + group_size] @ matrix for j in range(0, x.shape[-1], group_size)]
    return torch.cat(groups, dim=-1)


def quantize_rows(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 (codes, scale) per docs/format.md: absmax scale, round half to even, clamp;
    zero codes for a row with scale 0, NaN scale and zero codes for a non-finite row."""
    qmax = 2 ** (bits - 1) - 1
    v = v.to(torch.float64)
    scale = v.abs().amax(dim=-1) / qmax
    finite = torch.isfinite(v).all(dim=-1)
    scale = torch.where(finite, scale, torch.full_like(scale, math.nan))
    usable = finite & (scale > 0)
    safe = torch.where(usable, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(v / safe[:, None]), -qmax - 1, qmax)
    return torch.where(usable[:, None], codes, torch.zeros_like(codes)), scale


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> float64 [..., K]: low nibble first, two's complement."""
    p = packed.to(torch.int64)
    nibbles = torch.stack((p & 15, p >> 4), dim=-1).flatten(-2)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.float64)


def weight_codes(layer) -> torch.Tensor:
    """The decoded weights that enter the integer product: codes, times their group's
    multiplier (docs/format.md: code x mult[n, k // 64]) for group-scaled weights."""
    codes = unpack_int4(layer.qweight) if layer.bits == 4 else layer.qweight.to(torch.float64)
    group_scale = getattr(layer, "weight_group_scale", None)
    if group_scale is not None:
        codes = codes * group_scale.to(torch.float64).repeat_interleave(64, dim=1)
    return codes


def act_bits(layer) -> int:
    return getattr(layer, "act_bits", layer.bits)


def quantized_linear(x, layer) -> torch.Tensor:
    """The layer's math in float64 from its stored codes: rotate and quantize the
    activation per token, integer GEMM, scale, add bias. x [M, K] -> [M, N]."""
    codes, scale = quantize_rows(rotate(x, layer.rotation, layer.group_size), act_bits(layer))
    y = (codes @ weight_codes(layer).T) * scale[:, None] * layer.weight_scale.to(torch.float64)
    if layer.bias is not None:
        y = y + layer.bias.to(torch.float64)
    return y


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    reference = reference.to(torch.float64)
    error = approximation.to(torch.float64) - reference
    return 10 * math.log10(reference.square().sum().item() / error.square().sum().item())
