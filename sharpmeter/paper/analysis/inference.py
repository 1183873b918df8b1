r"""Inference that stays honest with a handful of model sizes: an interval for a median paired
difference that assumes nothing about its distribution, and Holm's correction for testing
several claims on one study.

**Sign-test interval.** For ``n`` independent paired differences with median :math:`m`, the
order statistics give :math:`P(d_{(k)} \le m \le d_{(n+1-k)}) = 1 - 2 P(B \le k - 1)`,
:math:`B \sim \mathrm{Bin}(n, 1/2)`, whatever the distribution (the interval inverts the sign
test). The narrowest such interval at ``level`` is taken; none exists when even ``[min, max]``
covers less, :math:`1 - 2^{1-n} < \text{level}`: below 6 differences at 95%. A bootstrap would
give an interval at any ``n`` -- four differences of one sign make every resampled mean
positive -- while the exact chance of that under no effect is 1/8.

**Holm (1979).** With ``m`` p-values sorted :math:`p_{(1)} \le \dots \le p_{(m)}`, reject
:math:`p_{(i)}` while :math:`p_{(i)} \le \alpha / (m - i + 1)`, and stop at the first that is
not: the chance of any false rejection among the ``m`` stays below :math:`\alpha`, whatever
their dependence.

>>> interval = sign_interval([0.3, 0.5, 0.2, 0.9, 0.4, 0.7])
>>> interval.ci, round(interval.coverage, 4), round(interval.p_value, 4)
((0.2, 0.9), 0.9688, 0.0312)
>>> holm([0.01, 0.04, 0.03])
[True, False, False]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from sharpmeter.paper.analysis._checks import as_finite_1d, check_level


@dataclass(frozen=True)
class SignInterval:
    """The median of paired differences, its distribution-free interval (NaN when too few
    differences for ``level``) with the interval's exact coverage, and the two-sided sign-test
    p-value of a zero median (differences of exactly 0 carry no sign and are left out of it)."""

    median: float
    ci: tuple[float, float]
    coverage: float
    p_value: float
    n: int
    positive: int
    negative: int

    @property
    def excludes_zero(self) -> bool:
        lo, hi = self.ci
        return lo > 0 or hi < 0  # False for NaN: no interval excludes nothing


def min_pairs(level: float = 0.95) -> int:
    """Fewest differences with a sign-test interval at ``level``: ``1 - 2^(1-n) >= level``.

    >>> min_pairs(0.95), min_pairs(0.9)
    (6, 5)
    """
    check_level(level)
    return math.ceil(1 - math.log2(1 - level) - 1e-12)


def sign_interval(differences: ArrayLike, level: float = 0.95) -> SignInterval:
    """Median of ``differences`` with its sign-test interval at ``level`` (module docstring)."""
    d = np.sort(as_finite_1d("differences", differences))
    n = d.size
    ci, coverage = (math.nan, math.nan), math.nan
    # k = 1 is [min, max], the widest; a larger k is narrower and covers less
    for k in range(1, n // 2 + 1):
        k_coverage = 1 - 2 * float(stats.binom.cdf(k - 1, n, 0.5))
        if k_coverage < level:
            break
        ci, coverage = (float(d[k - 1]), float(d[n - k])), k_coverage
    positive, negative = int(np.sum(d > 0)), int(np.sum(d < 0))
    signed = positive + negative
    p_value = float(stats.binomtest(positive, signed).pvalue) if signed else 1.0
    return SignInterval(float(np.median(d)), ci, coverage, p_value, n, positive, negative)


def holm(p_values: Sequence[float], level: float = 0.05) -> list[bool]:
    """Which of ``p_values`` Holm's step-down procedure rejects at family-wise ``level``, in
    the order given."""
    check_level(level)
    order = np.argsort(p_values, kind="stable")
    rejected = [False] * len(p_values)
    for rank, index in enumerate(order):
        if not p_values[index] <= level / (len(p_values) - rank):
            break
        rejected[index] = True
    return rejected
