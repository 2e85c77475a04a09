import float64_reference as ref
import pytest
import torch

import convrot_kernels
from convrot.quantizer.packing import pack_int4, unpack_int4


def test_nibble_layout():
    codes = torch.tensor([[1, -1, -8, 7, 0, -2]], dtype=torch.int8)
    assert pack_int4(codes).tolist() == [[0xF1, 0x78, 0xE0]]


def test_round_trip_every_code_pair():
    values = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(values, values)  # [256, 2]
    packed = pack_int4(pairs)
    assert sorted(packed.flatten().tolist()) == list(range(256))
    assert torch.equal(unpack_int4(packed), pairs)
    assert torch.equal(ref.unpack_int4(packed), pairs.double())


def test_matches_convrot_kernels():
    codes = torch.randint(-8, 8, (33, 128), dtype=torch.int8)
    packed = pack_int4(codes)
    assert torch.equal(packed, convrot_kernels.pack_int4(codes))
    assert torch.equal(unpack_int4(packed), convrot_kernels.unpack_int4(packed))


def test_bad_input():
    with pytest.raises(TypeError, match="int8"):
        pack_int4(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(TypeError, match="uint8"):
        unpack_int4(torch.zeros(2, 4, dtype=torch.int8))
