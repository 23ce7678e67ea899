"""pruning/stats.py against SciPy and hand computations."""
import math

import pytest
import scipy.stats

from studies import stats


@pytest.mark.parametrize("df", [1, 2, 3, 4, 6, 9, 19, 29, 120])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.025])
def test_t_quantile_equals_scipy(df, p):
    assert stats.t_quantile(p, df) == pytest.approx(scipy.stats.t.ppf(p, df), rel=1e-9, abs=1e-9)


def test_t_quantile_closed_forms():
    assert stats.t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-10)  # Cauchy
    p = 0.975  # df 2: t = (2p - 1) / sqrt(2 p (1 - p))
    assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)


def test_mean_interval_by_hand():
    values = [94.0, 95.5, 93.0, 96.0, 94.5]   # mean 94.6, sample SD sqrt(1.425)
    ci = stats.mean_interval(values)
    assert ci.mean == pytest.approx(94.6) and ci.n == 5
    assert ci.half == pytest.approx(2.7764451052 * math.sqrt(1.425) / math.sqrt(5), rel=1e-9)
    low, high = scipy.stats.t.interval(0.95, 4, loc=94.6, scale=scipy.stats.sem(values))
    assert (ci.mean - ci.half, ci.mean + ci.half) == pytest.approx((low, high), rel=1e-12)
    one = stats.mean_interval([3.0])
    assert one.half is None and not one.excludes_zero and one.text() == "3.00 (n = 1)"


def test_paired_difference_on_shared_seeds_against_scipy():
    a = {0: 95.0, 1: 94.0, 2: 96.5, 3: 95.5, 7: 90.0}
    b = {0: 93.0, 1: 93.5, 2: 94.0, 3: 94.5, 5: 99.0}
    d = stats.paired_difference(a, b)
    assert d.n == 4 and d.mean == pytest.approx(1.5)
    result = scipy.stats.ttest_rel([a[s] for s in range(4)], [b[s] for s in range(4)])
    low, high = result.confidence_interval(0.95)
    assert (d.mean - d.half, d.mean + d.half) == pytest.approx((low, high), rel=1e-10)
    assert d.excludes_zero == (low > 0 or high < 0) and d.excludes_zero
    assert stats.paired_difference({0: 1.0}, {1: 1.0}) is None
    assert not stats.paired_difference({0: 1.0, 1: 3.0}, {0: 2.0, 1: 1.0}).excludes_zero
