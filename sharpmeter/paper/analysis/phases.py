"""The three phases of a sharpness curve: rise to a peak, exponential decay, plateau.

The paper's model (its eq. (1)), with t the fraction of training::

    S(t) = S_f + (S_p - S_f) t / t_p                  for t <  t_p   (rise)
    S(t) = S_f + (S_p - S_f) exp(-lambda (t - t_p))   for t >= t_p   (decay to the plateau S_f)

``fit_three_phase`` fits (S_p, S_f, t_p, lambda) by nonlinear least squares with t-based
intervals; ``detect_phases`` segments a curve without assuming that form; ``phase_means`` averages
over given index ranges (the paper's Table 3 uses [0, 40), [40, 120), [120, 200) of 200).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, signal, stats

from sharpmeter.paper.analysis._checks import (
    as_finite_1d,
    check_fit_scale,
    check_fraction,
    check_level,
    paired,
)
from sharpmeter.paper.analysis.curves import tail_mean

PARAMETERS = ("s_p", "s_f", "t_p", "lam")
_MIN_POINTS_FIT = len(PARAMETERS) + 2
_MIN_POINTS_DETECT = 5


def three_phase_curve(t: ArrayLike, s_p: float, s_f: float, t_p: float, lam: float) -> np.ndarray:
    """Eq. (1) of the paper at training fractions ``t`` (``t_p > 0``).

    >>> three_phase_curve([0.0, 0.1, 0.2], s_p=2.0, s_f=1.0, t_p=0.1, lam=0.0).tolist()
    [1.0, 2.0, 2.0]
    """
    if t_p <= 0:
        raise ValueError(f"t_p must be positive, got {t_p}")
    t = np.asarray(t, dtype=float)
    rise = s_f + (s_p - s_f) * t / t_p
    # clipping at 0 keeps exp from overflowing on the rise side, where the value is not used
    decay = s_f + (s_p - s_f) * np.exp(-lam * np.maximum(t - t_p, 0.0))
    return np.where(t < t_p, rise, decay)


def _jacobian(t: np.ndarray, s_p: float, s_f: float, t_p: float, lam: float) -> np.ndarray:
    """d S / d (S_p, S_f, t_p, lambda), columns in that order.

    rise:  (t/t_p, 1 - t/t_p, -(S_p - S_f) t / t_p^2, 0)
    decay: (e, 1 - e, (S_p - S_f) lambda e, -(S_p - S_f)(t - t_p) e),  e = exp(-lambda (t - t_p))
    """
    amplitude = s_p - s_f
    rising = t < t_p
    g_rise = t / t_p
    e = np.exp(-lam * np.maximum(t - t_p, 0.0))
    g = np.where(rising, g_rise, e)
    d_tp = np.where(rising, -amplitude * t / t_p**2, amplitude * lam * e)
    d_lam = np.where(rising, 0.0, -amplitude * (t - t_p) * e)
    return np.column_stack([g, 1.0 - g, d_tp, d_lam])


@dataclass(frozen=True)
class ThreePhaseFit:
    """Eq. (1) fitted to one curve.

    ``stderr`` and ``ci`` (t-based at ``level``, ``n - 4`` degrees of freedom) come from the
    linearised covariance ``s^2 (J^T J)^{-1}``, ``s^2 = RSS / (n - 4)``; they assume independent
    noise, so oscillations around the model make them optimistic.

    >>> t = np.linspace(0, 1, 50)
    >>> fit = fit_three_phase(t, three_phase_curve(t, 2.5, 1.1, 0.15, 3.0))
    >>> round(fit.t_p, 6), round(fit.peak_to_plateau, 4)
    (0.15, 2.2727)
    """

    s_p: float
    s_f: float
    t_p: float
    lam: float
    stderr: dict[str, float] = field(compare=False)
    ci: dict[str, tuple[float, float]] = field(compare=False)
    level: float
    rss: float
    r2: float
    n: int
    residual_std: float
    converged: bool
    covariance: np.ndarray = field(repr=False, compare=False)

    @property
    def params(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in PARAMETERS}

    def predict(self, t: ArrayLike) -> np.ndarray:
        """The fitted curve at ``t``."""
        return three_phase_curve(t, self.s_p, self.s_f, self.t_p, self.lam)

    @property
    def peak_to_plateau(self) -> float:
        """``S_p / S_f``."""
        return self.s_p / self.s_f

    @property
    def peak_to_plateau_se(self) -> float:
        """Delta-method standard error of ``S_p / S_f``.

        ``var(r) = r^2 (var S_p / S_p^2 + var S_f / S_f^2 - 2 cov(S_p, S_f) / (S_p S_f))``
        """
        c = self.covariance
        ratio = self.peak_to_plateau
        rel_var = (
            c[0, 0] / self.s_p**2 + c[1, 1] / self.s_f**2 - 2 * c[0, 1] / (self.s_p * self.s_f)
        )
        return float(abs(ratio) * np.sqrt(max(rel_var, 0.0)))

    @property
    def flat_f(self) -> float:
        """F statistic of the fit against a flat curve (the mean, 1 parameter):
        ``F = (R^2 / 3) / ((1 - R^2) / (n - 4))`` on ``(3, n - 4)`` degrees of freedom
        (NaN for a constant curve, which has no variance to explain)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.float64(self.r2 / 3) / ((1 - self.r2) / (self.n - len(PARAMETERS))))

    @property
    def flat_p_value(self) -> float:
        """P-value of :attr:`flat_f` under ``F(3, n - 4)``. Nominal only: ``t_p`` and ``lambda``
        do not exist under a flat curve and the fit searches them, so flat noise gives larger F
        than that law (Davies 1987): at 0.05, 9-12% of flat curves of 100-1000 points pass."""
        return float(stats.f.sf(self.flat_f, len(PARAMETERS) - 1, self.n - len(PARAMETERS)))

    @property
    def flat_delta_bic(self) -> float:
        """``BIC(fit) - BIC(flat) = n ln(RSS / TSS) + 3 ln n = n ln(1 - R^2) + 3 ln n``; negative
        when BIC prefers eq. (1). Its penalty grows with ``ln n``, faster than what the search
        over ``t_p`` and ``lambda`` gains on noise."""
        with np.errstate(divide="ignore", invalid="ignore"):
            fit_term = self.n * np.log(np.float64(1 - self.r2))
        return float(fit_term + (len(PARAMETERS) - 1) * math.log(self.n))

    def decay_time(self, remaining: float = 0.05) -> float:
        """Time at which only ``remaining`` of the decay is left: ``t_p + ln(1/remaining) / lam``.

        A model-based end of phase 2 (inf when lambda is 0).
        """
        check_fraction("remaining", remaining)
        return self.t_p + math.log(1 / remaining) / self.lam if self.lam > 0 else math.inf


def fit_three_phase(t: ArrayLike, s: ArrayLike, level: float = 0.95) -> ThreePhaseFit:
    """Fit eq. (1) to a curve (``t`` >= 0, fractions of training) by nonlinear least squares.

    The start comes from a grid over (t_p, lambda) with (S_p, S_f) solved exactly at each node
    (the model is linear in them), so no initial guess is needed; a trust-region least squares
    with the analytic Jacobian then refines all four. Needs at least 6 points, of magnitude
    within 1e-100 to 1e100 (:func:`~sharpmeter.paper.analysis._checks.check_fit_scale`).
    """
    level = check_level(level)
    t_arr, s_arr = paired("t", t, "s", s, min_points=_MIN_POINTS_FIT)
    check_fit_scale("s", s_arr)
    if np.any(t_arr < 0):
        raise ValueError("t must be non-negative fractions of training")
    order = np.argsort(t_arr, kind="stable")
    t_arr, s_arr = t_arr[order], s_arr[order]
    span = t_arr[-1] - t_arr[0]
    if span <= 0:
        raise ValueError("t must hold at least two distinct times")

    # t_p must stay positive (eq. (1) divides by it) and inside the observed window
    t_p_lower = max(t_arr[0], 1e-9 * span)
    x0 = _grid_start(t_arr, s_arr, t_p_lower)
    result = optimize.least_squares(
        lambda p: three_phase_curve(t_arr, *p) - s_arr,
        x0,
        jac=lambda p: _jacobian(t_arr, *p),
        bounds=([-np.inf, -np.inf, t_p_lower, 0.0], [np.inf, np.inf, t_arr[-1], np.inf]),
        x_scale="jac",
        xtol=1e-14,
        ftol=1e-14,
        gtol=1e-14,
        max_nfev=2000,
    )
    params = result.x
    residuals = result.fun
    n = t_arr.size
    dof = n - len(PARAMETERS)
    rss = float(residuals @ residuals)
    s2 = rss / dof
    jac = _jacobian(t_arr, *params)
    try:
        covariance = s2 * np.linalg.inv(jac.T @ jac)
    except np.linalg.LinAlgError:
        # a degenerate fit (e.g. no decay inside the window) leaves some parameters unidentified
        covariance = np.full((4, 4), np.nan)
    stderr = np.sqrt(np.clip(np.diag(covariance), 0.0, None))
    q = float(stats.t.ppf(0.5 + level / 2, dof))
    tss = float(np.sum((s_arr - s_arr.mean()) ** 2))
    return ThreePhaseFit(
        s_p=float(params[0]),
        s_f=float(params[1]),
        t_p=float(params[2]),
        lam=float(params[3]),
        stderr={k: float(se) for k, se in zip(PARAMETERS, stderr, strict=True)},
        ci={
            k: (float(p - q * se), float(p + q * se))
            for k, p, se in zip(PARAMETERS, params, stderr, strict=True)
        },
        level=level,
        rss=rss,
        r2=1.0 - rss / tss if tss > 0 else float("nan"),
        n=n,
        residual_std=math.sqrt(s2),
        converged=bool(result.success),
        covariance=covariance,
    )


def fit_three_phase_or_reason(
    t: ArrayLike, s: ArrayLike, level: float = 0.95
) -> ThreePhaseFit | str:
    """:func:`fit_three_phase`, or why a curve has no fit: one it cannot take (too few points,
    a degenerate curve), or a search that stopped before it converged. The parameters of the
    latter fit nothing (on flat noise its S_f runs off to 1e4 while lambda sinks to 0), so
    whoever draws, tabulates or counts fits gets only fits that are one.
    """
    try:
        fit = fit_three_phase(t, s, level)
    except (ValueError, RuntimeError) as error:
        return f"no fit: {error}"
    if not fit.converged:
        return "no fit: eq. (1) did not converge (its least-squares search stopped early)"
    return fit


def _grid_start(t: np.ndarray, s: np.ndarray, t_p_lower: float) -> np.ndarray:
    """Best (S_p, S_f, t_p, lambda) on a (t_p, lambda) grid, (S_p, S_f) by linear least squares.

    With g(t) the unit-amplitude shape, eq. (1) is ``S = S_f (1 - g) + S_p g``: for fixed
    (t_p, lambda) the best (S_f, S_p) solve 2x2 normal equations.
    """
    span = t[-1] - t[0]
    t_ps = np.linspace(t_p_lower, t[-1], 101)[:-1] + span / 200
    lams = np.geomspace(0.1, 1000.0, 61) / span
    best = (np.inf, None)
    for t_p in t_ps:
        g = np.where(t < t_p, t / t_p, np.exp(-lams[:, None] * np.maximum(t - t_p, 0.0)[None, :]))
        u = 1.0 - g
        uu, uv, vv = (u * u).sum(1), (u * g).sum(1), (g * g).sum(1)
        us, vs = u @ s, g @ s
        det = uu * vv - uv**2
        with np.errstate(divide="ignore", invalid="ignore"):
            s_f = (vv * us - uv * vs) / det
            s_p = (uu * vs - uv * us) / det
        fitted = s_f[:, None] * u + s_p[:, None] * g
        rss = np.where(det > 1e-12 * uu * vv, ((fitted - s) ** 2).sum(1), np.inf)
        i = int(np.argmin(rss))
        if rss[i] < best[0]:
            best = (rss[i], np.array([s_p[i], s_f[i], t_p, lams[i]]))
    if best[1] is None:
        raise ValueError("could not start the three-phase fit: the curve is degenerate")
    return best[1]


@dataclass(frozen=True)
class PhaseSegmentation:
    """Indices splitting a curve: rise ``[0, peak]``, decay, plateau ``[plateau_index, n)``.

    ``peak_value`` is the smoothed maximum; ``plateau_level`` the mean of the last
    ``tail_fraction`` of the raw curve. An empty plateau (``plateau_index == n``) means the curve
    had not settled by its end.
    """

    peak_index: int
    plateau_index: int
    peak_time: float
    plateau_time: float
    peak_value: float
    plateau_level: float
    n: int
    window: int

    @property
    def boundaries(self) -> tuple[int, int]:
        """Start indices of phases 2 and 3, for ``phase_means``."""
        return self.peak_index + 1, self.plateau_index

    @property
    def peak_to_plateau(self) -> float:
        return self.peak_value / self.plateau_level

    def means(self, s: ArrayLike) -> tuple[float, float, float]:
        """Mean of ``s`` within each detected phase."""
        return phase_means(s, self.boundaries)


def detect_phases(
    t: ArrayLike,
    s: ArrayLike,
    window: int | None = None,
    tolerance: float = 0.1,
    tail_fraction: float = 0.1,
) -> PhaseSegmentation:
    """Find the peak and the start of the plateau of a noisy, oscillating curve.

    The curve is smoothed with a quadratic Savitzky-Golay filter over ``window`` points (default:
    the odd number nearest 10% of the points, at least 5), which averages out noise and
    oscillations of period up to about ``window`` points. Then

    * peak = argmax of the smoothed curve;
    * plateau level F = mean of the last ``tail_fraction`` of the raw curve;
    * plateau start = first index after the peak from which the smoothed curve stays within
      ``tolerance * (peak - F)`` of F.

    >>> t = np.linspace(0, 1, 200)
    >>> seg = detect_phases(t, three_phase_curve(t, 2.5, 1.1, 0.15, 6.0))
    >>> seg.peak_index, seg.plateau_index
    (30, 106)
    """
    t_arr, s_arr = paired("t", t, "s", s, min_points=_MIN_POINTS_DETECT)
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
    order = np.argsort(t_arr, kind="stable")
    t_arr, s_arr = t_arr[order], s_arr[order]
    n = s_arr.size
    if window is None:
        window = max(5, 2 * round(0.05 * n) + 1)
    window = min(window if window % 2 else window + 1, n if n % 2 else n - 1)
    if window < 3:
        raise ValueError(f"window must be at least 3 points, got {window}")
    smooth = signal.savgol_filter(s_arr, window, polyorder=2, mode="interp")

    peak = int(np.argmax(smooth))
    level = tail_mean(s_arr, tail_fraction)
    amplitude = smooth[peak] - level
    unsettled = np.flatnonzero(np.abs(smooth[peak:] - level) > tolerance * max(amplitude, 0.0))
    plateau = peak + int(unsettled[-1]) + 1 if unsettled.size else peak + 1
    return PhaseSegmentation(
        peak_index=peak,
        plateau_index=plateau,
        peak_time=float(t_arr[peak]),
        plateau_time=float(t_arr[plateau]) if plateau < n else math.inf,
        peak_value=float(smooth[peak]),
        plateau_level=level,
        n=n,
        window=window,
    )


def phase_means(s: ArrayLike, boundaries: tuple[int, int]) -> tuple[float, float, float]:
    """Means of ``s[:b1]``, ``s[b1:b2]``, ``s[b2:]`` (NaN for an empty phase).

    The paper's Table 3 uses ``boundaries=(40, 120)`` on 200 checkpoints.

    >>> phase_means([1, 1, 2, 2, 3, 3], (2, 4))
    (1.0, 2.0, 3.0)
    """
    arr = as_finite_1d("s", s, min_points=1)
    b1, b2 = (int(b) for b in boundaries)
    if not 0 <= b1 <= b2 <= arr.size:
        raise ValueError(f"boundaries must satisfy 0 <= b1 <= b2 <= {arr.size}, got {boundaries}")
    parts = (arr[:b1], arr[b1:b2], arr[b2:])
    return tuple(float(p.mean()) if p.size else math.nan for p in parts)


def peak_to_plateau_ratio(s: ArrayLike, tail_fraction: float = 0.1) -> float:
    """The paper's ratio: maximum of the (noisy) curve over the mean of its last ``tail_fraction``.

    Noise biases the maximum upwards; ``ThreePhaseFit.peak_to_plateau`` is the model-based one.

    >>> peak_to_plateau_ratio([1, 3, 2, 1.5, 1.5], 0.4)
    2.0
    """
    arr = as_finite_1d("s", s, min_points=1)
    return float(arr.max() / tail_mean(arr, tail_fraction))


__all__ = [
    "PARAMETERS",
    "PhaseSegmentation",
    "ThreePhaseFit",
    "detect_phases",
    "fit_three_phase",
    "fit_three_phase_or_reason",
    "peak_to_plateau_ratio",
    "phase_means",
    "three_phase_curve",
]
