"""The paper's stated model, eqs. (1)-(6), as functions of the training fraction t and the size N.

Notation used throughout: ``N`` is the parameter count, ``x = log10(N) - 7`` its number of decades
above 10M, ``t`` in [0, 1] the fraction of training done. Every constant in this module is printed
in the paper (Section 2); the constants it does not print live in :mod:`.presets`.

Example:
    >>> round(peak_sharpness(1e7), 4), round(plateau_sharpness(1e7), 4)
    (2.0, 1.2)
    >>> float(sharpness_trend(0.15, 1e7))  # the peak is reached at t_p(10M) = 0.15
    2.0
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
from numpy.typing import ArrayLike, NDArray


def log_scale(n_params: float) -> float:
    """Decades above 10M parameters: ``x = log10(N) - 7``.

    Raises ``ValueError`` unless N is a finite positive number.

    >>> log_scale(1e9)
    2.0
    """
    if isinstance(n_params, bool) or not isinstance(n_params, Real):
        raise ValueError(f"n_params must be a positive number, got {n_params!r}")
    if not math.isfinite(n_params) or n_params <= 0:
        raise ValueError(f"n_params must be a finite number > 0, got {n_params!r}")
    return math.log10(n_params) - 7.0


def peak_sharpness(n_params: float) -> float:
    """Eq. (2): ``S_p(N) = 2.0 + 0.35 x``, the height of the rise."""
    return 2.0 + 0.35 * log_scale(n_params)


def plateau_sharpness(n_params: float) -> float:
    """Eq. (3): ``S_f(N) = 1.2 - 0.12 x``, the level the decay tends to."""
    return 1.2 - 0.12 * log_scale(n_params)


def peak_time(n_params: float) -> float:
    """Eq. (4): ``t_p(N) = 0.15 - 0.005 x``, the training fraction of the peak."""
    return 0.15 - 0.005 * log_scale(n_params)


def decay_rate(n_params: float) -> float:
    """Eq. (5): ``lambda(N) = 3.0 + 0.2 x``, the rate of the exponential decay after the peak."""
    return 3.0 + 0.2 * log_scale(n_params)


def no_shape_reason(n_params: float) -> str | None:
    """Why eq. (1) at ``n_params`` is no rise-decay-plateau, or None when it is one.

    Eqs. (2)-(5) are lines in ``x`` fitted on 10M-7B; extrapolated, they cross: ``S_p > S_f``
    needs ``2.0 + 0.35 x > 1.2 - 0.12 x``, i.e. ``x > -0.8 / 0.47`` (N above ~2.0e5), and a
    positive plateau ``S_f > 0`` needs ``x < 10`` (N below 1e17). Outside, the "peak" is a dip
    or the curve is no sharpness at all, and its shape says nothing about the paper's.

    >>> no_shape_reason(1e7) is None
    True
    >>> no_shape_reason(1e5)
    'eqs. (2)-(3) give no rise: S_p 1.3 <= S_f 1.44 (below N = 2e+05)'
    """
    s_p, s_f = peak_sharpness(n_params), plateau_sharpness(n_params)
    if s_p <= s_f:
        hint = " (a size in millions? N counts parameters)" if n_params < 1e3 else ""
        return (
            f"eqs. (2)-(3) give no rise: S_p {s_p:.3g} <= S_f {s_f:.3g} "
            f"(below N = {10 ** (7 - 0.8 / 0.47):.2g}){hint}"
        )
    if s_f <= 0:
        return f"eq. (3) gives a plateau S_f {s_f:.3g} <= 0 (from N = 1e17)"
    return None


def sharpness_trend(t: ArrayLike, n_params: float) -> NDArray[np.float64]:
    """Eq. (1): the deterministic three-phase sharpness curve.

    ``S(t) = S_f + (S_p - S_f) t / t_p``              for ``t < t_p`` (linear rise from S_f),
    ``S(t) = S_f + (S_p - S_f) exp(-lambda (t - t_p))`` for ``t >= t_p`` (decay to the plateau).

    >>> np.round(sharpness_trend([0.0, 0.075, 1.0], 1e7), 4).tolist()
    [1.2, 1.6, 1.2625]
    """
    t = np.asarray(t, dtype=np.float64)
    s_p, s_f, t_p, lam = (
        peak_sharpness(n_params),
        plateau_sharpness(n_params),
        peak_time(n_params),
        decay_rate(n_params),
    )
    rise = s_f + (s_p - s_f) * t / t_p
    # The decay branch overflows for no t in [0, 1], so evaluating both branches everywhere is safe.
    decay = s_f + (s_p - s_f) * np.exp(-lam * (t - t_p))
    return np.where(t < t_p, rise, decay)


def loss_floor(n_params: float) -> float:
    """``L_f(N) = 3.5 (N / 1e9)^-0.076``, the Chinchilla-style limit of the loss in eq. (6).

    >>> loss_floor(1e9)
    3.5
    """
    log_scale(n_params)  # validates N
    return 3.5 * (n_params / 1e9) ** -0.076


def loss_trend(t: ArrayLike, n_params: float, initial_loss: float) -> NDArray[np.float64]:
    """Eq. (6): ``L(t, N) = L_f(N) + (L_0 - L_f(N)) exp(-5 t)``.

    The paper does not state ``L_0``; the paper preset recovers it as ``10 - 0.1 x``.

    >>> round(float(loss_trend(0.0, 1e9, initial_loss=9.8)), 6)
    9.8
    """
    t = np.asarray(t, dtype=np.float64)
    l_f = loss_floor(n_params)
    return l_f + (initial_loss - l_f) * np.exp(-5.0 * t)
