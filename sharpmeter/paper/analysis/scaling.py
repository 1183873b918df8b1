"""Scaling-law fits of a per-scale quantity (e.g. final sharpness S) against model size N.

Two forms, each fitted by ordinary least squares on a linearised scale ``y = a x + b``:

* log-linear:  ``S = a log10(N) + b``          (x = log10 N, y = S)
* power law:   ``S = c N^p``, i.e. ``ln S = p ln N + ln c``   (x = ln N, y = ln S)

Goodness of fit is measured on the original scale of S for both forms, so they are compared on
the same footing (the paper's convention)::

    RSS = sum_i (S_i - S_hat_i)^2,   R^2 = 1 - RSS / sum_i (S_i - mean S)^2
    AIC = n ln(RSS / n) + 2k,   AICc = AIC + 2k(k + 1) / (n - k - 1),   BIC = n ln(RSS / n) + k ln n

with k = 2 fitted coefficients. For the power law this is a pseudo-AIC: the coefficients minimise
the log-scale residuals, the RSS is taken on the original scale.

Parameter intervals are t-based on the linearised scale, with ``n - 2`` degrees of freedom:
``a +- t_{n-2} se(a)``, ``se`` from ``s^2 (X^T X)^{-1}``, ``s^2 = sum (y_i - y_hat_i)^2 / (n - 2)``.
``bootstrap_fit`` gives resampling intervals instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from sharpmeter.paper.analysis._checks import as_finite_1d, check_fit_scale, check_level, paired

NUM_COEFFICIENTS = 2


@dataclass(frozen=True)
class ScalingFit:
    """A fitted scaling law ``y = slope * x + intercept`` on the form's linearised scale.

    ``r2``, ``rss``, ``aic``, ``aicc`` and ``bic`` are on the original scale of the values;
    ``slope_ci`` and ``intercept_ci`` are t-based intervals at ``level``.
    """

    form: ClassVar[str]
    slope: float
    intercept: float
    slope_se: float
    intercept_se: float
    slope_ci: tuple[float, float]
    intercept_ci: tuple[float, float]
    level: float
    r2: float
    rss: float
    aic: float
    aicc: float
    bic: float
    n: int
    n_params: np.ndarray = field(repr=False, compare=False)
    values: np.ndarray = field(repr=False, compare=False)
    covariance: np.ndarray = field(repr=False, compare=False)
    residual_variance: float = field(repr=False)

    @staticmethod
    def _x(n_params: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def _y(values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def _from_y(y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, n: ArrayLike) -> np.ndarray | float:
        """Predicted value at model size(s) ``n`` (a float for a scalar ``n``)."""
        x = self._x(_positive("n", n))
        return _scalar_or_array(self._from_y(self.slope * x + self.intercept), n)

    def predict_interval(
        self,
        n: ArrayLike,
        level: float | None = None,
        kind: Literal["confidence", "prediction"] = "confidence",
    ) -> tuple[np.ndarray | float, np.ndarray | float]:
        """t-based band at ``n`` for the fitted line (``confidence``) or a new run (``prediction``).

        On the linearised scale ``y_hat +- t_{n-2} sqrt(x^T C x [+ s^2])`` with ``C`` the
        coefficient covariance; mapped back to the original scale for the power law.
        """
        if kind not in ("confidence", "prediction"):
            raise ValueError(f"kind must be 'confidence' or 'prediction', got {kind!r}")
        level = check_level(self.level if level is None else level)
        x = self._x(_positive("n", n))
        y_hat = self.slope * x + self.intercept
        c = self.covariance
        var = c[0, 0] * x**2 + 2 * c[0, 1] * x + c[1, 1]
        if kind == "prediction":
            var = var + self.residual_variance
        half = _t_quantile(level, self.n - NUM_COEFFICIENTS) * np.sqrt(var)
        lo, hi = self._from_y(y_hat - half), self._from_y(y_hat + half)
        return _scalar_or_array(lo, n), _scalar_or_array(hi, n)


class LogLinearFit(ScalingFit):
    """``S = slope * log10(N) + intercept``.

    >>> fit = fit_log_linear([1e7, 1e8, 1e9], [1.3, 1.2, 1.1])
    >>> round(fit.slope, 6), round(fit.intercept, 6)
    (-0.1, 2.0)
    """

    form = "log-linear"

    @staticmethod
    def _x(n_params: np.ndarray) -> np.ndarray:
        return np.log10(n_params)

    @staticmethod
    def _y(values: np.ndarray) -> np.ndarray:
        return values

    @staticmethod
    def _from_y(y: np.ndarray) -> np.ndarray:
        return y


class PowerLawFit(ScalingFit):
    """``S = coefficient * N ** exponent``; ``slope``/``intercept`` are ``exponent``/``ln c``.

    >>> fit = fit_power_law([1e6, 1e8, 1e10], [2.0, 1.0, 0.5])
    >>> round(fit.exponent, 6), round(fit.coefficient, 3)
    (-0.150515, 16.0)
    """

    form = "power-law"

    @staticmethod
    def _x(n_params: np.ndarray) -> np.ndarray:
        return np.log(n_params)

    @staticmethod
    def _y(values: np.ndarray) -> np.ndarray:
        return np.log(values)

    @staticmethod
    def _from_y(y: np.ndarray) -> np.ndarray:
        return np.exp(y)

    @property
    def exponent(self) -> float:
        """p in ``S = c N^p``."""
        return self.slope

    @property
    def exponent_ci(self) -> tuple[float, float]:
        return self.slope_ci

    @property
    def coefficient(self) -> float:
        """c in ``S = c N^p``."""
        return float(np.exp(self.intercept))

    @property
    def coefficient_ci(self) -> tuple[float, float]:
        lo, hi = self.intercept_ci
        return float(np.exp(lo)), float(np.exp(hi))


def fit_log_linear(n_params: ArrayLike, values: ArrayLike, level: float = 0.95) -> LogLinearFit:
    """Least-squares fit of ``S = a log10(N) + b`` (needs 3+ points, 2+ distinct sizes).

    >>> fit = fit_log_linear([1e7, 1e8, 1e9], [1.3, 1.2, 1.1])
    >>> round(float(fit.predict(1e10)), 6)
    1.0
    """
    return _fit(LogLinearFit, n_params, values, level)


def fit_power_law(n_params: ArrayLike, values: ArrayLike, level: float = 0.95) -> PowerLawFit:
    """Fit ``S = c N^p`` by least squares of ``ln S`` on ``ln N``; R^2 and RSS on the S scale.

    Needs 3+ points, 2+ distinct sizes and positive values.

    >>> round(fit_power_law([1e6, 1e8, 1e10], [2.0, 1.0, 0.5]).r2, 6)
    1.0
    """
    return _fit(PowerLawFit, n_params, values, level)


def _fit(cls: type[ScalingFit], n_params: ArrayLike, values: ArrayLike, level: float):
    level = check_level(level)
    n_arr, v_arr = paired("n_params", n_params, "values", values, min_points=3)
    check_fit_scale("values", v_arr)  # RSS, R^2 and AIC are on their scale, for both forms
    _positive("n_params", n_arr)
    if cls is PowerLawFit and np.any(v_arr <= 0):
        raise ValueError("a power law needs positive values (it fits ln S)")
    x, y = cls._x(n_arr), cls._y(v_arr)
    if np.ptp(x) == 0:
        raise ValueError("n_params must hold at least two distinct model sizes")

    design = np.column_stack([x, np.ones_like(x)])
    (slope, intercept), *_ = np.linalg.lstsq(design, y, rcond=None)
    n = x.size
    dof = n - NUM_COEFFICIENTS
    linear_residuals = y - design @ np.array([slope, intercept])
    residual_variance = float(linear_residuals @ linear_residuals / dof)
    covariance = residual_variance * np.linalg.inv(design.T @ design)
    slope_se, intercept_se = np.sqrt(np.diag(covariance))
    q = _t_quantile(level, dof)

    fitted = cls._from_y(design @ np.array([slope, intercept]))
    rss = float(np.sum((v_arr - fitted) ** 2))
    tss = float(np.sum((v_arr - v_arr.mean()) ** 2))
    aic, aicc, bic = information_criteria(rss, n, NUM_COEFFICIENTS)
    return cls(
        slope=float(slope),
        intercept=float(intercept),
        slope_se=float(slope_se),
        intercept_se=float(intercept_se),
        slope_ci=(float(slope - q * slope_se), float(slope + q * slope_se)),
        intercept_ci=(float(intercept - q * intercept_se), float(intercept + q * intercept_se)),
        level=level,
        # constant values leave R^2 undefined
        r2=1.0 - rss / tss if tss > 0 else float("nan"),
        rss=rss,
        aic=aic,
        aicc=aicc,
        bic=bic,
        n=n,
        n_params=n_arr,
        values=v_arr,
        covariance=covariance,
        residual_variance=residual_variance,
    )


def information_criteria(rss: float, n: int, k: int) -> tuple[float, float, float]:
    """``(AIC, AICc, BIC)`` of a least-squares fit with Gaussian errors of unknown variance.

    ``AIC = n ln(RSS/n) + 2k``, ``AICc = AIC + 2k(k+1)/(n-k-1)`` (inf when n <= k + 1),
    ``BIC = n ln(RSS/n) + k ln n``. An exact fit (RSS = 0) gives -inf.

    >>> [round(v, 2) for v in information_criteria(1.0260826e-4, 6, 2)]
    [-61.86, -57.86, -62.27]
    """
    with np.errstate(divide="ignore"):
        base = n * float(np.log(rss / n))
    aic = base + 2 * k
    aicc = aic + 2 * k * (k + 1) / (n - k - 1) if n > k + 1 else float("inf")
    return aic, aicc, base + k * float(np.log(n))


@dataclass(frozen=True)
class FitComparison:
    """Log-linear vs power law on the same data; ``best`` is the form with the lower AIC.

    ``delta_aic = AIC(worse) - AIC(best) >= 0``; ``relative_likelihood = exp(-delta_aic / 2)`` is
    how probable the worse form is relative to the better one (Akaike).

    When a statistic of either fit is not finite (values so large that squares overflow, an
    exact fit with ``RSS = 0``), AIC cannot rank the forms: ``best`` is None, the deltas NaN,
    and ``undecided`` says which statistics.
    """

    log_linear: LogLinearFit
    power_law: PowerLawFit
    best: str | None
    delta_aic: float
    delta_bic: float
    relative_likelihood: float
    undecided: str | None = None

    @property
    def best_fit(self) -> ScalingFit | None:
        if self.best is None:
            return None
        return self.log_linear if self.best == LogLinearFit.form else self.power_law


def compare_fits(n_params: ArrayLike, values: ArrayLike, level: float = 0.95) -> FitComparison:
    """Fit both forms and pick the one with the lower AIC (ties go to the log-linear form);
    none when a fit's statistics are not finite (a difference of infinities is NaN, and a NaN
    compares as neither larger nor smaller).

    >>> c = compare_fits([1e7, 1e8, 1e9, 1e10], [1.30, 1.21, 1.10, 1.01])
    >>> c.best
    'log-linear'
    >>> compare_fits([1e7, 1e8, 1e9, 1e10], [1.0, 1.0, 1.0, 1.0]).undecided  # exact fits
    'not finite: log-linear R^2 nan, AIC -inf, BIC -inf; power-law R^2 nan, AIC -inf, BIC -inf'
    """
    log_linear = fit_log_linear(n_params, values, level)
    power_law = fit_power_law(n_params, values, level)
    nonfinite = [text for fit in (log_linear, power_law) if (text := _nonfinite_statistics(fit))]
    if nonfinite:
        return FitComparison(
            log_linear=log_linear,
            power_law=power_law,
            best=None,
            delta_aic=float("nan"),
            delta_bic=float("nan"),
            relative_likelihood=float("nan"),
            undecided="not finite: " + "; ".join(nonfinite),
        )
    best, worse = (
        (log_linear, power_law) if log_linear.aic <= power_law.aic else (power_law, log_linear)
    )
    delta_aic = worse.aic - best.aic
    return FitComparison(
        log_linear=log_linear,
        power_law=power_law,
        best=best.form,
        delta_aic=delta_aic,
        delta_bic=worse.bic - best.bic,
        relative_likelihood=float(np.exp(-delta_aic / 2)),
    )


def _nonfinite_statistics(fit: ScalingFit) -> str:
    """``log-linear R^2 nan, AIC inf``: the statistics of ``fit`` that are not finite (AICc
    left out: it is infinite by definition with 3 points), or an empty string."""
    statistics = {
        "slope": fit.slope,
        "intercept": fit.intercept,
        "R^2": fit.r2,
        "RSS": fit.rss,
        "AIC": fit.aic,
        "BIC": fit.bic,
    }
    bad = [f"{name} {value}" for name, value in statistics.items() if not np.isfinite(value)]
    return f"{fit.form} " + ", ".join(bad) if bad else ""


@dataclass(frozen=True)
class BootstrapIntervals:
    """Percentile bootstrap intervals for a scaling fit's coefficients and predictions."""

    fit: ScalingFit = field(repr=False)
    method: str
    level: float
    n_resamples: int
    slope_ci: tuple[float, float]
    intercept_ci: tuple[float, float]
    slopes: np.ndarray = field(repr=False, compare=False)
    intercepts: np.ndarray = field(repr=False, compare=False)

    def predict_interval(self, n: ArrayLike) -> tuple[np.ndarray | float, np.ndarray | float]:
        """Percentile interval of the resampled fits' predictions at ``n``."""
        x = self.fit._x(_positive("n", n))
        y = self.slopes[:, None] * np.atleast_1d(x)[None, :] + self.intercepts[:, None]
        lo, hi = _percentiles(self.fit._from_y(y), self.level)
        return _scalar_or_array(lo, n), _scalar_or_array(hi, n)


def bootstrap_fit(
    fit: ScalingFit,
    n_resamples: int = 2000,
    seed: int | None = 0,
    level: float | None = None,
    method: Literal["residual", "pairs"] = "residual",
) -> BootstrapIntervals:
    """Resample a fit and refit it ``n_resamples`` times; percentile intervals at ``level``.

    ``residual`` (default, suited to a handful of fixed model sizes): ``y* = y_hat + e*`` with
    ``e*`` drawn with replacement from the linearised residuals inflated by ``sqrt(n / (n - 2))``.
    ``pairs``: resample (N, S) points; resamples with a single distinct size are dropped
    (``n_resamples`` of the result counts the ones kept).

    >>> fit = fit_log_linear([1e7, 1e8, 1e9, 1e10], [1.30, 1.21, 1.10, 1.01])
    >>> lo, hi = bootstrap_fit(fit, n_resamples=200).slope_ci
    >>> lo < fit.slope < hi
    True
    """
    if n_resamples < 10:
        raise ValueError(f"n_resamples must be at least 10, got {n_resamples}")
    level = check_level(fit.level if level is None else level)
    rng = np.random.default_rng(seed)
    x, y = fit._x(fit.n_params), fit._y(fit.values)
    n = x.size
    if method == "residual":
        y_hat = fit.slope * x + fit.intercept
        residuals = (y - y_hat) * np.sqrt(n / (n - NUM_COEFFICIENTS))
        xs = np.broadcast_to(x, (n_resamples, n))
        ys = y_hat + residuals[rng.integers(0, n, size=(n_resamples, n))]
    elif method == "pairs":
        index = rng.integers(0, n, size=(n_resamples, n))
        xs, ys = x[index], y[index]
        keep = np.ptp(xs, axis=1) > 0
        xs, ys = xs[keep], ys[keep]
    else:
        raise ValueError(f"method must be 'residual' or 'pairs', got {method!r}")
    x_dev = xs - xs.mean(axis=1, keepdims=True)
    slopes = np.sum(x_dev * ys, axis=1) / np.sum(x_dev**2, axis=1)
    intercepts = ys.mean(axis=1) - slopes * xs.mean(axis=1)
    return BootstrapIntervals(
        fit=fit,
        method=method,
        level=level,
        n_resamples=int(slopes.size),
        slope_ci=_percentiles(slopes, level),
        intercept_ci=_percentiles(intercepts, level),
        slopes=slopes,
        intercepts=intercepts,
    )


@dataclass(frozen=True)
class Extrapolation:
    """Fit on the smaller sizes, predict the held-out largest ones.

    One entry per held-out point (per seed, with replicates): ``rel_error = (predicted -
    actual) / actual``; ``lower``/``upper`` is the fit's t-based prediction interval for a new
    run at its size.
    """

    fit: ScalingFit = field(repr=False)
    n_target: np.ndarray
    actual: np.ndarray
    predicted: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    rel_error: np.ndarray

    @property
    def max_abs_rel_error(self) -> float:
        return float(np.max(np.abs(self.rel_error)))

    @property
    def covered(self) -> np.ndarray:
        """Whether each actual value lies in its prediction interval."""
        return (self.lower <= self.actual) & (self.actual <= self.upper)


def extrapolation_error(
    n_params: ArrayLike,
    values: ArrayLike,
    form: Literal["log-linear", "power-law"] = "log-linear",
    n_holdout: int = 1,
    level: float = 0.95,
) -> Extrapolation:
    """Hold out the ``n_holdout`` largest sizes, fit the rest, and compare the predictions.

    Every point of a held-out size is held out (all its seeds, with replicates: one left in the
    fit would hand it the answer). The fit keeps at least 3 sizes, so 4+ sizes are needed for
    one held-out size.

    >>> e = extrapolation_error([1e7, 1e8, 1e9, 1e10], [1.3, 1.2, 1.1, 1.0])
    >>> round(float(e.rel_error[0]), 9)
    0.0
    """
    fitters = {LogLinearFit.form: fit_log_linear, PowerLawFit.form: fit_power_law}
    if form not in fitters:
        raise ValueError(f"form must be one of {sorted(fitters)}, got {form!r}")
    n_arr, v_arr = paired("n_params", n_params, "values", values, min_points=4)
    sizes = np.unique(n_arr)
    if not 1 <= n_holdout <= sizes.size - 3:
        raise ValueError(f"n_holdout must be in [1, {sizes.size - 3}] for {sizes.size} sizes")
    order = np.argsort(n_arr, kind="stable")
    n_arr, v_arr = n_arr[order], v_arr[order]
    held = n_arr >= sizes[-n_holdout]
    fit = fitters[form](n_arr[~held], v_arr[~held], level)
    n_target, actual = n_arr[held], v_arr[held]
    predicted = np.asarray(fit.predict(n_target))
    lower, upper = fit.predict_interval(n_target, kind="prediction")
    return Extrapolation(
        fit=fit,
        n_target=n_target,
        actual=actual,
        predicted=predicted,
        lower=np.asarray(lower),
        upper=np.asarray(upper),
        rel_error=(predicted - actual) / actual,
    )


def _positive(name: str, n: ArrayLike) -> np.ndarray:
    arr = as_finite_1d(name, np.atleast_1d(np.asarray(n, dtype=float)))
    if np.any(arr <= 0):
        raise ValueError(f"{name} must be positive model sizes")
    return arr


def _t_quantile(level: float, dof: int) -> float:
    return float(stats.t.ppf(0.5 + level / 2, dof))


def _percentiles(samples: np.ndarray, level: float) -> tuple:
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)], axis=0)
    if np.ndim(lo) == 0:
        return float(lo), float(hi)
    return lo, hi


def _scalar_or_array(result: np.ndarray, like: ArrayLike) -> np.ndarray | float:
    """Return a float when the caller passed a scalar size."""
    return float(result[0]) if np.ndim(like) == 0 else result
