"""Mean, standard deviation and Student-t confidence interval of a few runs' values.

With S seeds a configuration's mean is uncertain; the interval ``mean ± t(1 - (1-level)/2, S-1)
· std / sqrt(S)`` (``std`` with ``ddof=1``) covers the true mean with probability ``level`` when
the runs' values are independent and roughly normal. The t quantile is computed here (no scipy):
for an integer number of degrees of freedom the t distribution's two-sided probability has a
closed form (Abramowitz & Stegun 26.7.3 and 26.7.4), inverted by bisection.

Example:
    >>> round(t_quantile(0.975, 2), 3)
    4.303
    >>> iv = mean_interval([1.0, 2.0, 3.0])
    >>> iv.mean, iv.std, round(iv.low, 3), round(iv.high, 3)
    (2.0, 1.0, -0.484, 4.484)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Interval", "mean_interval", "t_quantile", "t_two_sided"]


def t_two_sided(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with ``df`` (a positive integer) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    term = total = 1.0
    if df % 2:  # odd: (2/pi)(theta + sin cos (1 + 2/3 c^2 + 2·4/(3·5) c^4 + ...))
        for k in range(1, (df - 3) // 2 + 1):
            term *= (2 * k) / (2 * k + 1) * c2
            total += term
        return 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    for k in range(1, (df - 2) // 2 + 1):  # even: sin (1 + 1/2 c^2 + 1·3/(2·4) c^4 + ...)
        term *= (2 * k - 1) / (2 * k) * c2
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``0.5 < p < 1``) of Student's t with ``df`` degrees of freedom, to
    about 1e-10 (``t_quantile(0.975, 1)`` = 12.706, ``(0.975, 10)`` = 2.228)."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p!r}")
    level = 2 * p - 1  # P(|T| <= t)
    lo, hi = 0.0, 1.0
    while t_two_sided(hi, df) < level:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided(mid, df) < level else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values, their standard deviation (``ddof=1``; NaN for one value) and
    the ``level`` Student-t interval of the mean (NaN bounds for one value)."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    level: float = 0.95


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The :class:`Interval` of ``values`` (finite numbers; NaN fields when empty)."""
    n = len(values)
    nan = float("nan")
    if n == 0:
        return Interval(0, nan, nan, nan, nan, level)
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(1, mean, nan, nan, nan, level)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(1 - (1 - level) / 2, n - 1) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half, level)
