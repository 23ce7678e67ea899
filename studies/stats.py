"""Confidence intervals for the studies: the mean of n seeds with a Student-t interval, and
the paired difference of two criteria on the same seeds. Plain Python (no SciPy at run time;
the tests check it against SciPy)."""
import math
from dataclasses import dataclass

LEVEL = 0.95


def _beta_fraction(a, b, x):
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300

    def guard(v):
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, 500):
        even = m * (b - m) * x / ((a - 1.0 + 2 * m) * (a + 2 * m))
        d = 1.0 / guard(1.0 + even * d)
        c = guard(1.0 + even / c)
        h *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1.0 + 2 * m))
        d = 1.0 / guard(1.0 + odd * d)
        c = guard(1.0 + odd / c)
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a, b, x):
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p, df):
    """The t with P(T <= t) = p (bisection on t_cdf; p in (0, 1))."""
    if not 0 < p < 1 or df <= 0:
        raise ValueError(f"t_quantile needs p in (0, 1) and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided interval: mean +- half (half None when n < 2)."""
    mean: float
    half: float | None
    n: int

    @property
    def excludes_zero(self):
        return self.half is not None and abs(self.mean) > self.half

    def text(self, digits=2):
        if self.half is None:
            return f"{self.mean:.{digits}f} (n = 1)"
        return f"{self.mean:.{digits}f} +- {self.half:.{digits}f}"


def mean_interval(values, level=LEVEL):
    """The mean of `values` and its Student-t interval at `level` (n - 1 degrees of freedom)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, None, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n), n)


def paired_difference(a, b, level=LEVEL):
    """The mean of a[s] - b[s] over the seeds s both hold, with its interval, or None when
    they share no seed. a, b: seed -> value."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return mean_interval([a[s] - b[s] for s in seeds], level)
