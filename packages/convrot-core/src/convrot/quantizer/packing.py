"""int4 packing in torch (QuaRot-compatible, docs/format.md): element 2j in the low
nibble of byte j, element 2j+1 in the high nibble, two's complement."""

from __future__ import annotations

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 [..., K] codes in [-8, 7], K even -> uint8 [..., K/2]."""
    if codes.dtype != torch.int8:
        raise TypeError(f"pack_int4: expected int8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dimension must be even, got {codes.shape[-1]}")
    nibbles = codes.to(torch.uint8) & 0xF
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 [..., K] codes in [-8, 7]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4: expected uint8, got {packed.dtype}")
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2).to(torch.int8)
    # Sign-extend the 4-bit two's complement values.
    return nibbles - ((nibbles >= 8).to(torch.int8) << 4)
