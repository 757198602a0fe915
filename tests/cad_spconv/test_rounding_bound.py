"""The rounding bound the exactness tests hold float32 and half-precision convs to
(``tests/support/rounding.py``): it holds for the route it describes and fails one that rounds
once more or sums in the dtype."""
import pytest
import torch

from tests.support import rounding as R


def _dot_rows(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(500, n, generator=gen, dtype=torch.float64).to(torch.bfloat16),
            torch.randn(n, generator=gen, dtype=torch.float64).to(torch.bfloat16))


def test_bound_holds_for_a_float32_sum_rounded_once():
    x, w = _dot_rows(72, 0)
    want = x.double() @ w.double()
    size = x.double().abs() @ w.double().abs()
    got = (x.float() @ w.float()).to(torch.bfloat16)
    ratio = R.assert_within(got, want, R.conv_bound(size, want, torch.bfloat16, 72))
    assert 0.5 < ratio <= 1  # round to nearest reaches close to its half ulp on 500 sites


def test_bound_fails_a_second_rounding_and_a_sum_in_the_dtype():
    x, w = _dot_rows(72, 1)
    want = x.double() @ w.double()
    size = x.double().abs() @ w.double().abs()
    bound = R.conv_bound(size, want, torch.bfloat16, 72)
    # each product rounded to bfloat16 before a float32 sum: one rounding more than claimed
    products = (x * w).float().sum(1).to(torch.bfloat16)
    with pytest.raises(AssertionError, match="exceed the rounding bound"):
        R.assert_within(products, want, bound, "products rounded")
    R.assert_within(products, want, R.conv_bound(size, want, torch.bfloat16, 72, roundings=2))
    # one large term, then 71 terms of a quarter ulp: a bfloat16 sum drops them all
    ones = torch.ones(1, 72, dtype=torch.bfloat16)
    w = torch.full((72,), torch.finfo(torch.bfloat16).eps / 4, dtype=torch.bfloat16)
    w[0] = 1
    want, size = ones.double() @ w.double(), ones.double() @ w.double()
    running = torch.zeros(1, dtype=torch.bfloat16)
    for i in range(72):
        running = running + ones[:, i] * w[i]
    assert float(running) == 1.0
    with pytest.raises(AssertionError, match=r"worst at \(0,\)"):
        R.assert_within(running, want, R.conv_bound(size, want, torch.bfloat16, 72, roundings=3))


def test_float64_reference_error_is_part_of_the_bound():
    """In float64 the reference rounds as much as the engine: the bound counts both sums."""
    size, want = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    u = R.unit_roundoff(torch.float64)
    bound = R.conv_bound(size, want, torch.float64, 10)
    torch.testing.assert_close(bound, torch.full((3,), R.MARGIN * 2 * R.gamma(10, u),
                                                 dtype=torch.float64), rtol=1e-12, atol=0)


def test_gamma_refuses_an_unbounded_sum():
    assert R.gamma(4, 2.0 ** -8) == pytest.approx(4 * 2 ** -8 / (1 - 4 * 2 ** -8), rel=1e-15)
    with pytest.raises(ValueError, match="too many"):
        R.gamma(256, 2.0 ** -8)


def test_bound_holds_for_results_in_the_subnormal_range():
    """float16 outputs near 1e-6 (below its smallest normal, 6.1e-5) keep fewer significant
    bits: the bound's absolute term covers them."""
    x, w = _dot_rows(72, 2)
    x, w = x.double() * 1e-4, w.double() * 1e-3
    x, w = x.to(torch.float16), w.to(torch.float16)
    want = x.double() @ w.double()
    size = x.double().abs() @ w.double().abs()
    assert (want.abs() < torch.finfo(torch.float16).tiny).float().mean() > 0.9
    got = (x.float() @ w.float()).to(torch.float16)
    R.assert_within(got, want, R.conv_bound(size, want, torch.float16, 72))
