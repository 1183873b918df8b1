"""Input checks shared by the analysis functions: every bad input raises a clear ``ValueError``."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

# Least squares sums squares and products of the values: far beyond this magnitude they overflow
# to inf (far below its inverse they underflow to 0), and every statistic made of them with them;
# the margin leaves room for the Jacobians and sums the fits build.
MAX_FIT_MAGNITUDE = 1e100


def as_finite_1d(name: str, values: ArrayLike, *, min_points: int = 1) -> np.ndarray:
    """``values`` as a 1-D float array; raise if it is not one, holds NaN/inf, or is too short.

    >>> as_finite_1d("s", [1, 2, 3])
    array([1., 2., 3.])
    """
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of numbers ({exc})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if arr.size < min_points:
        raise ValueError(f"{name} needs at least {min_points} points, got {arr.size}")
    return arr


def paired(
    x_name: str, x: ArrayLike, y_name: str, y: ArrayLike, *, min_points: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Check two sequences of equal length with at least ``min_points`` finite values each.

    >>> paired("x", [1, 2, 3], "y", [3, 2, 1])[1]
    array([3., 2., 1.])
    """
    xa = as_finite_1d(x_name, x)
    ya = as_finite_1d(y_name, y)
    if xa.size != ya.size:
        raise ValueError(f"{x_name} and {y_name} differ in length ({xa.size} vs {ya.size})")
    if xa.size < min_points:
        raise ValueError(f"need at least {min_points} points, got {xa.size}")
    return xa, ya


def check_fit_scale(name: str, values: np.ndarray) -> np.ndarray:
    """``values`` when least squares (or a correlation) can take them: their largest magnitude
    lies within [1e-100, 1e100], or they are all 0; else raise ``ValueError`` saying why, not
    an inf or NaN statistic later with no reason.

    >>> check_fit_scale("s", np.array([2.0, 0.5]))
    array([2. , 0.5])
    """
    largest = float(np.max(np.abs(values), initial=0.0))
    if largest == 0.0 or 1 / MAX_FIT_MAGNITUDE <= largest <= MAX_FIT_MAGNITUDE:
        return values
    where = "overflow" if largest > 1 else "underflow"
    raise ValueError(
        f"{name} reach {largest:.3g} in magnitude, outside the 1e-100 to 1e100 that fits and "
        f"correlations take (beyond it their squares and products {where} double precision, "
        "to inf or NaN statistics); rescale them, or drop a failed measurement"
    )


def check_level(level: float) -> float:
    """A confidence level strictly between 0 and 1."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(level)


def check_fraction(name: str, fraction: float) -> float:
    """A fraction of a curve in (0, 1]."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {fraction}")
    return float(fraction)
