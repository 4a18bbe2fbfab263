"""The comparison helpers of tests/compare.py: equal values pass, and a NaN or an infinity where
the reference is finite fails (the NaN-blind `diff > bound` form passed it)."""
from __future__ import annotations

import math

import pytest
import torch

from compare import (assert_bitwise_equal, assert_close_in_norm, assert_fp32_bound,
                     assert_mixed_precision_bound, assert_same_nonfinite, assert_within, ulp)

NONFINITE = [math.nan, math.inf, -math.inf]


def values(dtype=torch.float32):
    return torch.tensor([0.5, -1.25, 3e-3, 0.0, -0.0, 7.0], dtype=dtype)


def with_value(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def test_the_old_form_is_nan_blind():
    """Why the helpers test `not (diff <= bound)`: with a NaN diff, `diff > bound` is False."""
    diff = (with_value(values(), 2, math.nan) - values()).abs()
    assert not (diff > 1e-6).any()
    assert (~(diff <= 1e-6)).any()


def test_equal_values_pass():
    a = values()
    assert_bitwise_equal(a, a.clone(), "equal")
    assert_fp32_bound(a, a.clone(), a.abs(), "equal")
    assert_within(a, a.clone(), 0.0, "equal")
    assert_close_in_norm([a], [a.clone()], 1e-12, "equal")
    for dtype in (torch.bfloat16, torch.float16):
        b = values(dtype)
        assert_mixed_precision_bound(b, b.clone(), b.double(), "equal")
        assert_bitwise_equal(b, b.clone(), "equal")


def test_values_within_the_bounds_pass_and_beyond_fail():
    a = values()
    scale = a.abs()
    inside = a + 0.5 * (1e-6 + 1e-5 * scale)
    assert_fp32_bound(inside, a, scale, "inside")
    with pytest.raises(AssertionError, match="outside the bound"):
        assert_fp32_bound(a + 2 * (1e-6 + 1e-5 * scale), a, scale, "outside")
    oracle = torch.tensor([0.5, -1.25, 3e-3, 1e-7, 2.0, 7.0], dtype=torch.float64)
    same = oracle.to(torch.bfloat16)
    one_ulp = (same.double() + ulp(same, torch.bfloat16)).to(torch.bfloat16)
    assert_mixed_precision_bound(same, same, oracle, "rounded")
    with pytest.raises(AssertionError, match="outside the bound"):
        assert_mixed_precision_bound((one_ulp.double() + ulp(one_ulp, torch.bfloat16))
                                     .to(torch.bfloat16), same, oracle, "two ulps")


@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
def test_a_nonfinite_value_where_the_reference_is_finite_fails(bad):
    a = values()
    broken = with_value(a, 2, bad)
    with pytest.raises(AssertionError):
        assert_bitwise_equal(broken, a, "bits")
    with pytest.raises(AssertionError, match="at different positions"):
        assert_same_nonfinite(broken, a, "same non-finite")
    with pytest.raises(AssertionError, match="at different positions"):
        assert_fp32_bound(broken, a, a.abs(), "fp32")
    with pytest.raises(AssertionError, match="at different positions"):
        assert_within(broken, a, math.inf, "any bound")
    with pytest.raises(AssertionError):
        assert_close_in_norm([broken], [a], 1e-4, "norm")
    for dtype in (torch.bfloat16, torch.float16):
        b = values(dtype)
        with pytest.raises(AssertionError, match="at different positions"):
            assert_mixed_precision_bound(with_value(b, 2, bad), b, b.double(), "16-bit")


@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
def test_a_finite_value_where_the_reference_is_not_fails(bad):
    a = values()
    with pytest.raises(AssertionError, match="at different positions"):
        assert_fp32_bound(a, with_value(a, 0, bad), a.abs(), "fp32")


def test_the_same_nonfinite_values_pass():
    a = torch.tensor([math.nan, math.inf, -math.inf, 1.0])
    finite = assert_same_nonfinite(a, a.clone(), "same")
    assert finite.tolist() == [False, False, False, True]
    assert_fp32_bound(a, a.clone(), torch.ones(4), "same")
    with pytest.raises(AssertionError, match=r"\+inf at different positions"):
        assert_same_nonfinite(a, torch.tensor([math.nan, -math.inf, math.inf, 1.0]), "signs")


def test_a_nan_bound_fails():
    a = values()
    with pytest.raises(AssertionError, match="outside the bound"):
        assert_fp32_bound(a, a.clone(), with_value(a.abs(), 1, math.nan), "NaN scale")


def test_where_leaves_positions_out_but_not_their_nonfinite_values():
    a = values()
    off = with_value(a, 1, 100.0)
    where = torch.ones(a.shape, dtype=torch.bool)
    where[1] = False
    assert_fp32_bound(off, a, a.abs(), "masked", where=where)
    with pytest.raises(AssertionError, match="at different positions"):
        assert_fp32_bound(with_value(a, 1, math.nan), a, a.abs(), "masked NaN", where=where)


def test_the_oracle_must_be_finite_where_the_storage_dtype_run_is():
    b = values(torch.bfloat16)
    with pytest.raises(AssertionError, match="oracle is not finite"):
        assert_mixed_precision_bound(b, b.clone(), with_value(b.double(), 0, math.nan), "oracle")
