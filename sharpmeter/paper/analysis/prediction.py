"""Early prediction of final sharpness from the start of training.

Across runs i of model size N_i, regress the final value on the early mean and the scale::

    F_i = b0 + b1 E_i + b2 log10 N_i + e_i

with ``E_i`` the mean of the first ``early_fraction`` of run i's checkpoints and ``F_i`` the mean
of its last ``final_fraction``. Reported: the in-sample R^2 and the leave-one-size-out errors,
each run predicted by the regression fitted on the runs of the other sizes -- the honest measure
with few sizes. With one run per size that is leave-one-out; with several seeds per size, all
of a size's seeds are left out together: a seed of the same size left in would hand the fit
nearly the answer, and what is to be predicted is a size not yet trained.

:func:`against_last_seen` sets the regression against the model it nests, the size alone::

    F_i = a + b log10 N_i + e_i

left out by size the same way: what the regression gains over it is what the early values add
(with finals a law of N and early values unrelated to anything, the regression itself errs
less than forecasts that ignore N in nearly every study, crediting the early values with what
the size predicts). The naive forecasts, "the final value is the last value seen by the early
cutoff" and "... is the early mean", stand beside them. Curves are over the fraction of
training ``t``: the early mean over ``t <= early_fraction``, the final value over the last
``final_fraction`` of training time (:func:`~sharpmeter.paper.analysis.curves.final_value`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from sharpmeter.paper.analysis._checks import as_finite_1d, check_fit_scale, check_fraction, paired
from sharpmeter.paper.analysis.curves import final_value, head_mean, tail_mean
from sharpmeter.paper.analysis.replicates import Curve, Seed, as_replicates

_NUM_COEFFICIENTS = 3


@dataclass(frozen=True)
class EarlyPrediction:
    """``F = b0 + b1 E + b2 log10 N`` fitted across runs, with leave-one-size-out errors.

    ``loo_predictions[i]`` comes from the fit without the runs of run i's size; ``loo_rmse``
    and ``loo_max_abs_rel_error`` summarise ``loo_predictions - finals``.
    """

    coefficients: tuple[float, float, float]
    r2: float
    rss: float
    n_runs: int
    loo_predictions: np.ndarray = field(repr=False, compare=False)
    loo_rmse: float
    loo_max_abs_rel_error: float
    n_params: np.ndarray = field(repr=False, compare=False)
    early_means: np.ndarray = field(repr=False, compare=False)
    finals: np.ndarray = field(repr=False, compare=False)

    def predict(self, early_mean: ArrayLike, n_params: ArrayLike) -> np.ndarray:
        """Predicted final value of runs with these early means and sizes."""
        e = np.atleast_1d(np.asarray(early_mean, dtype=float))
        n = np.atleast_1d(np.asarray(n_params, dtype=float))
        if np.any(n <= 0):
            raise ValueError("n_params must be positive")
        return _design(e, n) @ np.asarray(self.coefficients)


def regress_final(
    n_params: ArrayLike, early_means: ArrayLike, finals: ArrayLike
) -> EarlyPrediction:
    """Fit ``F = b0 + b1 E + b2 log10 N`` across runs (needs 4+ runs, positive sizes), each
    run then predicted without the runs of its size.

        >>> n = [1e7, 1e8, 1e9, 1e10, 1e11]
        >>> e = [1.0, 1.3, 1.5, 1.9, 2.0]
        >>> f = [1.0 + 0.5 * ei - 0.1 * k for ei, k in zip(e, range(7, 12))]
        >>> fit = regress_final(n, e, f)
        >>> [round(c, 6) for c in fit.coefficients], round(fit.loo_rmse, 9)
        ([1.0, 0.5, -0.1], 0.0)
    """
    n_arr, e_arr = paired("n_params", n_params, "early_means", early_means, min_points=4)
    f_arr = as_finite_1d("finals", finals)
    if f_arr.size != n_arr.size:
        raise ValueError(f"finals has {f_arr.size} entries for {n_arr.size} runs")
    if np.any(n_arr <= 0):
        raise ValueError("n_params must be positive")
    check_fit_scale("early means", e_arr)
    check_fit_scale("finals", f_arr)
    design = _design(e_arr, n_arr)
    coef = np.linalg.lstsq(design, f_arr, rcond=None)[0]
    rss = float(np.sum((f_arr - design @ coef) ** 2))
    tss = float(np.sum((f_arr - f_arr.mean()) ** 2))

    loo = np.empty_like(f_arr)
    for i in range(f_arr.size):
        keep = n_arr != n_arr[i]
        coef_i = np.linalg.lstsq(design[keep], f_arr[keep], rcond=None)[0]
        loo[i] = design[i] @ coef_i
    errors = loo - f_arr
    return EarlyPrediction(
        coefficients=tuple(float(c) for c in coef),
        r2=1.0 - rss / tss if tss > 0 else float("nan"),
        rss=rss,
        n_runs=int(f_arr.size),
        loo_predictions=loo,
        loo_rmse=float(np.sqrt(np.mean(errors**2))),
        loo_max_abs_rel_error=float(np.max(np.abs(errors / f_arr))),
        n_params=n_arr,
        early_means=e_arr,
        finals=f_arr,
    )


def early_prediction(
    n_params: ArrayLike,
    curves: Sequence[ArrayLike],
    early_fraction: float = 0.1,
    final_fraction: float = 0.1,
) -> EarlyPrediction:
    """Summarise each run's curve (checkpoints in time order) and call ``regress_final``.

    ``early_fraction`` and ``final_fraction`` are fractions of each run's checkpoints.

    >>> curves = [np.r_[np.full(10, e), np.full(10, 0.5 * e + 1)] for e in (1.0, 1.2, 1.5, 1.6)]
    >>> round(early_prediction([1e7, 1e8, 1e9, 1e10], curves).r2, 6)
    1.0
    """
    check_fraction("early_fraction", early_fraction)
    check_fraction("final_fraction", final_fraction)
    n_arr = as_finite_1d("n_params", n_params)
    if len(curves) != n_arr.size:
        raise ValueError(f"{len(curves)} curves for {n_arr.size} model sizes")
    early = [head_mean(c, early_fraction) for c in curves]
    final = [tail_mean(c, final_fraction) for c in curves]
    return regress_final(n_arr, early, final)


@dataclass(frozen=True)
class EarlyComparison:
    """Per run, smallest first: the leave-one-size-out errors of the regression on the early
    mean and the size and of the fit on the size alone (``size_only``, its predictions), and
    the error of the last value seen by ``early_fraction`` of training, each against the run's
    final value. ``improvement`` is the size-only error minus the regression's: positive where
    the early values add to what the size predicts. The sizes of runs with no measurement by
    the cutoff, which cannot be forecast, are in ``no_early_point``."""

    early_fraction: float
    regression: EarlyPrediction
    size_only: np.ndarray = field(repr=False)
    last_seen: np.ndarray = field(repr=False)
    no_early_point: tuple[float, ...] = ()

    @property
    def regression_errors(self) -> np.ndarray:
        return np.abs(self.regression.loo_predictions - self.regression.finals)

    @property
    def size_only_errors(self) -> np.ndarray:
        return np.abs(self.size_only - self.regression.finals)

    @property
    def last_seen_errors(self) -> np.ndarray:
        return np.abs(self.last_seen - self.regression.finals)

    @property
    def early_mean_errors(self) -> np.ndarray:
        """The other naive forecast, "the final value is the early mean" (the regression with
        ``b0 = b2 = 0, b1 = 1``)."""
        return np.abs(self.regression.early_means - self.regression.finals)

    @property
    def improvement(self) -> np.ndarray:
        return self.size_only_errors - self.regression_errors

    @property
    def size_improvement(self) -> np.ndarray:
        """``improvement`` averaged over each size's runs, smallest size first: one difference
        per size, the independent unit (a size's seeds share the fit that left them out)."""
        sizes = self.regression.n_params
        return np.array([self.improvement[sizes == n].mean() for n in np.unique(sizes)])


def against_last_seen(
    curves: Mapping[float, Curve | Mapping[Seed, Curve]],
    early_fraction: float = 0.1,
    final_fraction: float = 0.2,
) -> EarlyComparison:
    """The regression on the early mean and the scale against the fit on the scale alone and
    the last value seen by the cutoff, for ``{n_params: (t, values)}`` with ``t`` sorted, or
    per size its seeds' curves ``{n_params: {seed: (t, values)}}`` (needs 4+ runs measured by
    then).

    Finals that follow the size exactly leave the early values nothing to add:

    >>> t = np.linspace(0, 1, 21)
    >>> curves = {n: (t, np.where(t <= 0.1, 2 + 0.5 * k, 1 + 0.2 * k)) for k, n in
    ...           enumerate([1e7, 1e8, 1e9, 1e10, 1e11])}
    >>> comparison = against_last_seen(curves)
    >>> bool(comparison.regression_errors.max() < 1e-9), comparison.last_seen_errors.round(6)
    (True, array([1. , 1.3, 1.6, 1.9, 2.2]))
    >>> bool(comparison.size_only_errors.max() < 1e-9)
    True
    """
    check_fraction("early_fraction", early_fraction)
    runs = [
        (n, curve) for n, by_seed in as_replicates(curves).items() for curve in by_seed.values()
    ]
    early = [(n, s[t <= early_fraction], (t, s)) for n, (t, s) in runs]
    seen = [(n, values, curve) for n, values, curve in early if values.size]
    regression = regress_final(
        [n for n, _, _ in seen],
        [values.mean() for _, values, _ in seen],
        [final_value(*curve, final_fraction) for _, _, curve in seen],
    )
    return EarlyComparison(
        early_fraction=early_fraction,
        regression=regression,
        size_only=size_only_predictions(regression.n_params, regression.finals),
        last_seen=np.array([values[-1] for _, values, _ in seen]),
        no_early_point=tuple(dict.fromkeys(n for n, values, _ in early if not values.size)),
    )


def size_only_predictions(n_params: np.ndarray, finals: np.ndarray) -> np.ndarray:
    """Each run's final value from ``F = a + b log10 N`` fitted by least squares on the runs
    of the other sizes, as :func:`regress_final` leaves them out.

    >>> size_only_predictions(np.array([1e7, 1e8, 1e9]), np.array([1.0, 0.9, 0.8])).round(6)
    array([1. , 0.9, 0.8])
    """
    design = np.column_stack([np.ones_like(n_params), np.log10(n_params)])
    predictions = np.empty_like(finals)
    for i, n in enumerate(n_params):
        keep = n_params != n
        coef = np.linalg.lstsq(design[keep], finals[keep], rcond=None)[0]
        predictions[i] = design[i] @ coef
    return predictions


def _design(early_means: np.ndarray, n_params: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones_like(early_means), early_means, np.log10(n_params)])
