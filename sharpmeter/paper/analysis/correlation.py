"""Correlations with confidence intervals: across scales (one point per run) and within runs.

Pearson ``r`` and Spearman ``rho`` with Fisher-z intervals::

    z = atanh(r),  z +- z_{(1+level)/2} * se,  se = 1 / sqrt(n - 3) (Pearson),
    se = sqrt(1.06 / (n - 3)) (Spearman; Fieller, Hartley & Pearson 1957)

and the p-value of ``t = r sqrt((n - 2) / (1 - r^2))`` on ``n - 2`` degrees of freedom.

Points along one training run are autocorrelated, so ``n`` overstates the evidence. With
``autocorrelated=True`` (the default of ``within_run_correlations``) ``n`` is replaced by
Bartlett's effective size ``n_eff = n (1 - a_x a_y) / (1 + a_x a_y)``, ``a`` the lag-1
autocorrelations.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from sharpmeter.paper.analysis._checks import check_fit_scale, check_level, paired

Method = Literal["pearson", "spearman"]


@dataclass(frozen=True)
class Correlation:
    """A correlation coefficient with its interval; ``n_effective < n`` after the autocorrelation
    correction. ``ci`` is (-1, 1) when ``n_effective <= 3`` (no information for an interval)."""

    method: str
    r: float
    ci: tuple[float, float]
    p_value: float
    n: int
    n_effective: float
    level: float


def pearson(
    x: ArrayLike, y: ArrayLike, level: float = 0.95, autocorrelated: bool = False
) -> Correlation:
    """Pearson correlation with a Fisher-z interval (needs 3+ points, neither input constant,
    each within 1e-100 to 1e100 in magnitude).

    >>> c = pearson([1, 2, 3, 4, 5], [1.1, 1.9, 3.2, 3.9, 5.1])
    >>> round(c.r, 4), c.ci[0] > 0.8
    (0.9964, True)
    """
    x_arr, y_arr = _check(x, y)
    check_fit_scale("x", x_arr)  # Spearman takes ranks, which never overflow
    check_fit_scale("y", y_arr)
    r = float(np.corrcoef(x_arr, y_arr)[0, 1])
    return _with_interval("pearson", r, x_arr, y_arr, level, autocorrelated, 1.0)


def spearman(
    x: ArrayLike, y: ArrayLike, level: float = 0.95, autocorrelated: bool = False
) -> Correlation:
    """Spearman rank correlation with a Fisher-z interval (variance factor 1.06).

    >>> spearman([1, 2, 3, 4], [1, 4, 9, 16]).r
    1.0
    """
    x_arr, y_arr = _check(x, y)
    rho = float(stats.spearmanr(x_arr, y_arr).statistic)
    return _with_interval("spearman", rho, x_arr, y_arr, level, autocorrelated, 1.06)


def within_run_correlations(
    x_by_run: Mapping[Hashable, ArrayLike],
    y_by_run: Mapping[Hashable, ArrayLike],
    method: Method = "pearson",
    level: float = 0.95,
    autocorrelated: bool = True,
) -> dict[Hashable, Correlation]:
    """Correlate two quantities along each run (e.g. sharpness and loss over checkpoints).

    >>> out = within_run_correlations({"a": [1, 2, 3, 4]}, {"a": [2, 4, 6, 9]})
    >>> round(out["a"].r, 3)
    0.994
    """
    if set(x_by_run) != set(y_by_run):
        differ = sorted(map(str, set(x_by_run) ^ set(y_by_run)))
        raise ValueError(f"x_by_run and y_by_run hold different runs: {differ}")
    functions = {"pearson": pearson, "spearman": spearman}
    if method not in functions:
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    return {
        run: functions[method](x_by_run[run], y_by_run[run], level, autocorrelated)
        for run in x_by_run
    }


def effective_sample_size(x: ArrayLike, y: ArrayLike) -> float:
    """Bartlett's ``n (1 - a_x a_y) / (1 + a_x a_y)``, clipped to ``[2, n]``.

    >>> effective_sample_size([1, -1, 1, -1, 1, -1], [1, 2, 3, 4, 5, 6])
    6.0
    """
    x_arr, y_arr = _check(x, y)
    product = _lag1(x_arr) * _lag1(y_arr)
    n = x_arr.size
    return float(np.clip(n * (1 - product) / (1 + product), 2.0, n))


def _lag1(a: np.ndarray) -> float:
    d = a - a.mean()
    return float(np.dot(d[:-1], d[1:]) / np.dot(d, d))


def _check(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x_arr, y_arr = paired("x", x, "y", y, min_points=3)
    for name, a in (("x", x_arr), ("y", y_arr)):
        if np.ptp(a) == 0:
            raise ValueError(f"{name} is constant: its correlation is undefined")
    return x_arr, y_arr


def _with_interval(
    method: str,
    r: float,
    x: np.ndarray,
    y: np.ndarray,
    level: float,
    autocorrelated: bool,
    variance_factor: float,
) -> Correlation:
    level = check_level(level)
    n_eff = effective_sample_size(x, y) if autocorrelated else float(x.size)
    r = float(np.clip(r, -1.0, 1.0))
    if n_eff > 3:
        half = stats.norm.ppf(0.5 + level / 2) * math.sqrt(variance_factor / (n_eff - 3))
        # atanh(+-1) is infinite: a perfect correlation has a degenerate interval
        with np.errstate(divide="ignore"):
            z = np.arctanh(r)
        ci = (float(np.tanh(z - half)), float(np.tanh(z + half)))
    else:
        ci = (-1.0, 1.0)
    dof = n_eff - 2
    if abs(r) == 1.0:
        p_value = 0.0
    else:
        t_stat = r * math.sqrt(dof / (1 - r * r))
        p_value = float(2 * stats.t.sf(abs(t_stat), dof))
    return Correlation(method, r, ci, p_value, int(x.size), n_eff, level)
