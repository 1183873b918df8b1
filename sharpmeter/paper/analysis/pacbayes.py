"""The paper's PAC-Bayes-style bound and its relation to accuracy.

    B(S, N, m) = sqrt((S ln N + ln(m / delta)) / m)

S the sharpness, N the parameter count, m the number of training samples, delta the failure
probability. ``S ln N`` is the complexity term, ``ln(m / delta)`` the confidence term. The paper
writes "log"; the natural log is used here (any base only rescales the complexity term).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from sharpmeter.paper.analysis._checks import as_finite_1d, check_level
from sharpmeter.paper.analysis.correlation import Correlation, pearson


@dataclass(frozen=True)
class PacBayesTerms:
    """The bound and its two terms, one entry per (S, N) pair."""

    complexity: np.ndarray
    confidence: float
    bound: np.ndarray


def pac_bayes_terms(
    sharpness: ArrayLike, n_params: ArrayLike, m: float, delta: float = 0.05
) -> PacBayesTerms:
    """``S ln N``, ``ln(m / delta)`` and ``B = sqrt((S ln N + ln(m / delta)) / m)``.

    >>> terms = pac_bayes_terms([1.0], [np.e], m=100, delta=1.0 / np.e)
    >>> round(float(terms.bound[0]), 6)
    0.257005
    """
    s = as_finite_1d("sharpness", np.atleast_1d(sharpness))
    n = as_finite_1d("n_params", np.atleast_1d(n_params))
    if s.size != n.size:
        raise ValueError(f"sharpness and n_params differ in length ({s.size} vs {n.size})")
    if np.any(s < 0):
        raise ValueError("sharpness must be non-negative")
    if np.any(n < 1):
        raise ValueError("n_params must be at least 1")
    if not m >= 1:
        raise ValueError(f"m (training samples) must be at least 1, got {m}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    complexity = s * np.log(n)
    confidence = float(np.log(m / delta))
    return PacBayesTerms(complexity, confidence, np.sqrt((complexity + confidence) / m))


def pac_bayes_bound(
    sharpness: ArrayLike, n_params: ArrayLike, m: float, delta: float = 0.05
) -> np.ndarray | float:
    """``B(S, N, m)``, a float for scalar inputs.

    >>> round(pac_bayes_bound(1.0, 1e9, m=1e6), 6)
    0.006127
    """
    bound = pac_bayes_terms(sharpness, n_params, m, delta).bound
    scalar = np.ndim(sharpness) == 0 and np.ndim(n_params) == 0
    return float(bound[0]) if scalar else bound


def bound_accuracy_correlation(
    sharpness: ArrayLike,
    n_params: ArrayLike,
    accuracy: ArrayLike,
    m: float,
    delta: float = 0.05,
    level: float = 0.95,
) -> Correlation:
    """Pearson correlation across scales between the bound and the measured accuracy.

    >>> s, n = [1.2785, 1.1669, 1.1217, 1.0646], [1e7, 1.25e8, 3.5e8, 1.3e9]
    >>> round(bound_accuracy_correlation(s, n, [0.36, 0.45, 0.48, 0.53], m=100).r, 2)
    0.98
    """
    bound = pac_bayes_terms(sharpness, n_params, m, delta).bound
    return pearson(bound, accuracy, check_level(level))
