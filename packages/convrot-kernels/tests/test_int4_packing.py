import numpy as np
import pytest
import torch

import convrot_kernels as ck

import reference as ref


def test_nibble_layout_is_quarot_compatible():
    q = torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)
    # Element 2j in the low nibble, 2j+1 in the high nibble, two's complement.
    assert ck.pack_int4(q).tolist() == [[0xF1, 0x78]]


def test_round_trip_of_random_codes():
    q = torch.randint(-8, 8, (3, 5, 64), dtype=torch.int8)
    p = ck.pack_int4(q)
    assert p.shape == (3, 5, 32) and p.dtype == torch.uint8
    assert (ref.unpack_int4(p.numpy()) == q.numpy()).all()
    assert torch.equal(ck.unpack_int4(p), q)


def test_every_byte_unpacks_as_the_reference_says():
    p = torch.arange(256, dtype=torch.uint8).reshape(1, 256)
    np.testing.assert_array_equal(ck.unpack_int4(p).numpy(), ref.unpack_int4(p.numpy()))


def test_packing_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"outside \[-8, 7\]"):
        ck.pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="must be even"):
        ck.pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(TypeError, match="q must have dtype int8"):
        ck.pack_int4(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="p must have dtype uint8"):
        ck.unpack_int4(torch.zeros(2, 4, dtype=torch.int8))
