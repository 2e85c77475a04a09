import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import convrot_kernels as ck

import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@given(
    rows=st.integers(1, 9),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([4, 16, 64, 256, 1024]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_rht_matches_float64_reference(rows, groups, group_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, groups * group_size, generator=g).to(dtype)
    y = ck.rht(x, group_size)
    assert y.shape == x.shape and y.dtype == dtype
    expected = ref.rht(x, group_size)
    err = np.abs(y.double().numpy() - expected).max(initial=0.0)
    # Within twice the error of rounding the exact result to the same dtype (fp32: its own rounding).
    floor = np.abs(ref.cast(expected, dtype) - expected).max(initial=0.0)
    assert err <= 2 * floor + 1e-6 * (np.abs(expected).max(initial=0.0) + 1)


@pytest.mark.parametrize("group_size", [4, 64, 256])
def test_rht_is_its_own_inverse(group_size):
    # R is symmetric and orthonormal, so rotating twice gives back x.
    x = torch.randn(3, 2, 4 * group_size, dtype=torch.float32)
    torch.testing.assert_close(ck.rht(ck.rht(x, group_size), group_size), x, rtol=1e-5, atol=1e-5)


def test_rht_spreads_a_constant_offset_evenly():
    # Each column of R sums to sqrt(n): a per-token offset lands on every channel alike.
    x = torch.full((2, 256), 3.0)
    torch.testing.assert_close(ck.rht(x, 256), torch.full((2, 256), 3.0))


def test_rht_keeps_leading_shape_and_accepts_non_contiguous_input():
    x = torch.randn(256, 6)[:, :4].T  # [4, 256], not contiguous
    np.testing.assert_allclose(ck.rht(x, 64).numpy(), ref.rht(x, 64), atol=1e-5)
    assert ck.rht(torch.randn(2, 3, 5, 64), 64).shape == (2, 3, 5, 64)


def test_rht_rejects_bad_arguments():
    with pytest.raises(TypeError, match="x must have dtype"):
        ck.rht(torch.zeros(4, 64, dtype=torch.float64), 64)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ck.rht(np.zeros((4, 64), dtype=np.float32), 64)
    with pytest.raises(ValueError, match="group_size must be a power of 4"):
        ck.rht(torch.zeros(4, 64), 32)
    with pytest.raises(ValueError, match="group_size must be a power of 4"):
        ck.rht(torch.zeros(4, 4096), 4096)
    with pytest.raises(ValueError, match="multiple of group_size"):
        ck.rht(torch.zeros(4, 96), 64)
    with pytest.raises(ValueError, match="at least one dimension"):
        ck.rht(torch.tensor(1.0), 4)
