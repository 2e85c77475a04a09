import math

import float64_reference as ref
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import convrot
from convrot.hadamard import rotate_groups

POWERS_OF_4 = [1, 4, 16, 64, 256, 1024]


@pytest.mark.parametrize("n", POWERS_OF_4)
def test_regular_hadamard_matches_entry_formula_and_is_regular(n):
    h = convrot.regular_hadamard(n, dtype=torch.float64)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.equal(h, ref.regular_hadamard(n))
    assert torch.equal(h, h.T)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    # Regular: the +-1 matrix sqrt(n)·R has every row and column sum equal to
    # sqrt(n), so the orthonormal R's sum to 1 (a constant row maps to itself).
    sqrt_n = torch.full((n,), math.sqrt(n), dtype=torch.float64)
    torch.testing.assert_close((h * math.sqrt(n)).sum(dim=0), sqrt_n, atol=1e-9, rtol=0)
    torch.testing.assert_close((h * math.sqrt(n)).sum(dim=1), sqrt_n, atol=1e-9, rtol=0)


def test_regular_hadamard_of_order_4_is_h4_over_2():
    assert torch.equal(convrot.regular_hadamard(4), ref.H4.float() / 2)


@pytest.mark.parametrize("n", [1, 2, 8, 32, 128, 512])
def test_sylvester_hadamard_matches_entry_formula(n):
    h = convrot.sylvester_hadamard(n, dtype=torch.float64)
    assert torch.equal(h, ref.sylvester_hadamard(n))
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    # Its first column is constant and every other column sums to zero: the
    # property that gathers a per-token offset into a single channel.
    torch.testing.assert_close(h.sum(dim=0)[1:], torch.zeros(n - 1, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hadamard_dtype(dtype):
    assert convrot.regular_hadamard(16, dtype=dtype).dtype == dtype
    assert convrot.sylvester_hadamard(16, dtype=dtype).dtype == dtype


@pytest.mark.parametrize("n", [0, -4, 2, 8, 12, 32, 4.0, True, "16"])
def test_regular_hadamard_rejects_non_powers_of_4(n):
    with pytest.raises(ValueError, match="power of 4"):
        convrot.regular_hadamard(n)


@pytest.mark.parametrize("n", [0, 3, 12, 2.0, False])
def test_sylvester_hadamard_rejects_non_powers_of_2(n):
    with pytest.raises(ValueError, match="power of 2"):
        convrot.sylvester_hadamard(n)


def test_constant_row_stays_flat_under_regular_and_concentrates_under_sylvester():
    offset = torch.full((1, 256), 3.0, dtype=torch.float64)
    torch.testing.assert_close(rotate_groups(offset, "regular", 256), offset)
    sylvester = rotate_groups(offset, "sylvester", 256)
    assert sylvester[0, 0].item() == pytest.approx(3.0 * 16)
    torch.testing.assert_close(sylvester[0, 1:], torch.zeros(255, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("rotation", convrot.ROTATIONS)
@pytest.mark.parametrize("group_size", [4, 64, 256])
def test_rotate_groups_matches_reference_and_preserves_products(rotation, group_size):
    x = torch.randn(3, 5, 2 * group_size, dtype=torch.float64)
    w = torch.randn(7, 2 * group_size, dtype=torch.float64)
    rotated = rotate_groups(x, rotation, group_size)
    torch.testing.assert_close(rotated, ref.rotate(x, rotation, group_size), atol=1e-12, rtol=0)
    # (x R)(W R)^T = x W^T
    torch.testing.assert_close(rotated @ rotate_groups(w, rotation, group_size).T, x @ w.T, atol=1e-10, rtol=0)


def test_rotate_groups_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of group_size"):
        rotate_groups(torch.randn(2, 100), "regular", 64)
    with pytest.raises(ValueError, match="rotation must be one of"):
        rotate_groups(torch.randn(2, 64), "hadamard", 64)


@pytest.mark.parametrize(
    ("in_features", "group_size", "expected"),
    [
        (3072, 256, 256),
        (12288, 256, 256),
        (15360, 256, 256),
        (1152, 256, 64),
        (2432, 256, 64),
        (64, 256, 64),
        (4, 256, 4),
        (3072, 1024, 1024),
        (1152, 16, 16),
        (6 * 4, 256, 4),
    ],
)
def test_resolve_group_size(in_features, group_size, expected):
    assert convrot.resolve_group_size(in_features, group_size) == expected


@pytest.mark.parametrize("in_features", [1, 2, 6, 1001, 4098])
def test_resolve_group_size_without_a_dividing_power_of_4(in_features):
    with pytest.raises(ValueError, match=f"in_features={in_features} is not a multiple of 4"):
        convrot.resolve_group_size(in_features, 256)


@pytest.mark.parametrize("group_size", [0, 1, 2, 8, 128, 4096, 256.0])
def test_resolve_group_size_rejects_bad_group_sizes(group_size):
    with pytest.raises(ValueError, match="group_size must be a power of 4"):
        convrot.resolve_group_size(1024, group_size)


@given(st.integers(min_value=1, max_value=1 << 20), st.sampled_from([4, 16, 64, 256, 1024]))
def test_resolve_group_size_is_the_largest_dividing_power_of_4(in_features, group_size):
    candidates = [4**e for e in range(1, 6) if 4**e <= group_size and in_features % 4**e == 0]
    if not candidates:
        with pytest.raises(ValueError):
            convrot.resolve_group_size(in_features, group_size)
    else:
        assert convrot.resolve_group_size(in_features, group_size) == max(candidates)
