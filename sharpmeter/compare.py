"""Measured sharpness curves against the paper's simulator, and a verdict on each of its claims.

Levels are not comparable: the simulator is calibrated on 10M-7B language models, a measured run
is whatever its model, data and optimizer make it. Shapes are. Each curve is put on a common
axis, the fraction of training ``t = step / last step``, and divided by its final value
``S_final``, the mean over the last ``final_fraction`` of training time (``t >= 1 - f``: the
same span whatever the schedule's spacing); the simulated curve is the paper's noise-free
eq. (1) at the same parameter count. Per size this gives the shape RMSE and correlation on a
common grid, and, from the raw points, where each curve peaks and its peak-to-final ratio.

The verdicts test the paper's claims on the measured curves alone:

1. three phases (rise, decay, plateau): eq. (1) fits with ``S_p > S_f > 0``, at least two
   measurements before the peak ``t_p < 1`` (a rise seen) and a decay at least half done by
   the end, ``lambda (1 - t_p) >= ln 2``;
2. final sharpness falls with scale: sign of the log-linear slope, decided when its interval
   excludes 0;
3. the log-linear law is preferred over the power law: decided when the AIC difference is at
   least 2 (below that the two cannot be told apart);
4. larger models peak higher relative to their plateau: Spearman's rho of peak/final against
   N, with an exact permutation p-value (the t approximation is far off with a few sizes);
5. flatter is better: final sharpness correlates positively with the final probe loss
   (Pearson, decided when its Fisher-z interval excludes 0; needs 4+ sizes).

Example::

    curves = curves_from_records(read_records("runs/study/small/sharpness.jsonl"))
    for c in compare_with_simulator(curves):
        print(c.n_params, c.shape_rmse, c.measured_peak_t, c.simulated_peak_t)
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from sharpmeter.analysis import (
    FitComparison,
    ThreePhaseFit,
    compare_fits,
    fit_three_phase,
    pearson,
    spearman,
)
from sharpmeter.analysis.curves import Curves, final_value
from sharpmeter.analysis.runs import RunEntry
from sharpmeter.simulator import simulate_run

GRID_POINTS = 101
MIN_SIZES_FOR_SCALING = 3
MIN_SIZES_FOR_CORRELATION = 4  # a Fisher-z interval needs n - 3 > 0
MIN_POINTS_BEFORE_PEAK = 2
DECIDING_DELTA_AIC = 2.0
SIGNIFICANCE = 0.05
MAX_EXACT_SIZES = 8  # 8! orderings enumerate in a blink; beyond, the t approximation is fine


@dataclass(frozen=True)
class CurveComparison:
    """One size's measured and simulated curves, normalised by their final values, on ``t``."""

    n_params: float
    t: np.ndarray = field(repr=False)
    measured: np.ndarray = field(repr=False)
    simulated: np.ndarray = field(repr=False)
    measured_final: float
    simulated_final: float
    measured_peak_t: float
    simulated_peak_t: float
    measured_peak_ratio: float
    simulated_peak_ratio: float
    shape_rmse: float
    shape_correlation: float


def compare_curve(
    n_params: float, t: np.ndarray, s: np.ndarray, final_fraction: float = 0.2
) -> CurveComparison:
    """Put a measured curve and the simulator's at ``n_params`` on one normalised grid.

    The grid spans the measured range of ``t`` (a run is usually first measured after step 0);
    peaks come from the raw points, which interpolation onto the grid would smooth away.
    """
    grid = np.linspace(t[0], t[-1], GRID_POINTS)
    measured_final = final_value(t, s, final_fraction)
    measured = np.interp(grid, t, s) / measured_final
    with warnings.catch_warnings():
        # below 10M parameters the simulator extrapolates its calibration; it warns each time
        warnings.simplefilter("ignore", RuntimeWarning)
        run = simulate_run(n_params, noise=False, oscillation=False)
    trend = run.sharpness_trend
    simulated_final = final_value(run.t, trend, final_fraction)
    simulated = np.interp(grid, run.t, trend) / simulated_final
    return CurveComparison(
        n_params=n_params,
        t=grid,
        measured=measured,
        simulated=simulated,
        measured_final=measured_final,
        simulated_final=simulated_final,
        measured_peak_t=float(t[np.argmax(s)]),
        simulated_peak_t=float(run.t[np.argmax(trend)]),
        measured_peak_ratio=float(s.max() / measured_final),
        simulated_peak_ratio=float(trend.max() / simulated_final),
        shape_rmse=float(np.sqrt(np.mean((measured - simulated) ** 2))),
        shape_correlation=_correlation(measured, simulated),
    )


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r; NaN when either curve is flat (no shape to correlate)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def compare_with_simulator(curves: Curves, final_fraction: float = 0.2) -> list[CurveComparison]:
    """:func:`compare_curve` for every size, smallest first."""
    return [compare_curve(n, *curves[n], final_fraction) for n in sorted(curves)]


@dataclass(frozen=True)
class Verdict:
    """A claim of the paper and what the measurements say: ``holds`` is None when they cannot
    decide it (too few sizes, a fit that failed)."""

    claim: str
    holds: bool | None
    evidence: str

    def line(self) -> str:
        answer = {True: "yes", False: "no", None: "undecided"}[self.holds]
        return f"{self.claim}: **{answer}** ({self.evidence})"


@dataclass(frozen=True)
class StudyAnalysis:
    """Everything a report shows, computed from the curves alone; ``runs`` lists every run
    found with why it is not in the fits, when the curves came from files (see
    :func:`sharpmeter.analysis.runs.select_runs`)."""

    curves: Curves = field(repr=False)
    finals: dict[float, float]
    phase_fits: dict[float, ThreePhaseFit | str] = field(repr=False)
    scaling: FitComparison | None
    comparisons: list[CurveComparison] = field(repr=False)
    verdicts: list[Verdict]
    runs: tuple[RunEntry, ...] = field(default=(), repr=False)

    @property
    def unfinished(self) -> dict[float, str]:
        """The fitted sizes whose run stopped before its planned end (fitted when asked for),
        with how far it got: ``unfinished: step 60 of 150``."""
        return {
            entry.run.n_params: entry.run.unfinished
            for entry in self.runs
            if entry.left_out is None and entry.run.unfinished
        }

    @property
    def left_out(self) -> list[RunEntry]:
        """The runs found but not fitted, each with why."""
        return [entry for entry in self.runs if entry.left_out is not None]


def analyse_curves(
    curves: Curves,
    final_fraction: float = 0.2,
    losses: Curves | None = None,
    runs: Sequence[RunEntry] = (),
) -> StudyAnalysis:
    """Fits, simulator comparison and verdicts for one curve per size (``losses``: the probe
    loss curves of the same runs, for the flatter-is-better claim; ``runs``: every run found,
    fitted or not, to be listed beside the results)."""
    sizes = sorted(curves)
    finals = {n: final_value(*curves[n], final_fraction) for n in sizes}
    phase_fits = {n: _three_phase_or_reason(*curves[n]) for n in sizes}
    scaling = _scaling_or_reason(finals)
    comparisons = compare_with_simulator(curves, final_fraction)
    verdicts = [
        _three_phases_verdict(phase_fits, curves),
        *_scaling_verdicts(scaling),
        _peak_verdict(comparisons),
        _loss_verdict(finals, losses, final_fraction),
    ]
    return StudyAnalysis(
        curves,
        finals,
        phase_fits,
        scaling if isinstance(scaling, FitComparison) else None,
        comparisons,
        verdicts,
        tuple(runs),
    )


def _scaling_or_reason(finals: Mapping[float, float]) -> FitComparison | str:
    if len(finals) < MIN_SIZES_FOR_SCALING:
        return f"needs at least {MIN_SIZES_FOR_SCALING} sizes"
    try:
        return compare_fits(list(finals), list(finals.values()))
    except ValueError as error:  # a final value that is not finite, or not positive
        return f"no scaling fit: {error}"


def _three_phase_or_reason(t: np.ndarray, s: np.ndarray) -> ThreePhaseFit | str:
    try:
        return fit_three_phase(t, s)
    except (ValueError, RuntimeError) as error:
        return f"no fit: {error}"


def has_three_phases(fit: ThreePhaseFit | str, t: np.ndarray) -> bool:
    """A peak above the plateau with a rise seen before it and half the decay after it."""
    if not isinstance(fit, ThreePhaseFit):
        return False
    rise_seen = np.sum(t < fit.t_p) >= MIN_POINTS_BEFORE_PEAK
    decay_seen = fit.lam * (1 - fit.t_p) >= math.log(2)
    return fit.s_p > fit.s_f > 0 and fit.t_p < 1 and rise_seen and decay_seen


def _three_phases_verdict(phase_fits: Mapping[float, ThreePhaseFit | str], curves: Curves):
    found = sum(has_three_phases(fit, curves[n][0]) for n, fit in phase_fits.items())
    failed = sum(isinstance(fit, str) for fit in phase_fits.values())
    if found == len(phase_fits):
        holds = True
    elif found + failed == len(phase_fits):
        holds = None  # no run said no; the failed fits cannot say yes
    else:
        holds = False
    return Verdict(
        "Three phases (rise, decay, plateau) in every run",
        holds,
        f"eq. (1) fits with S_p > S_f > 0, a rise and half the decay seen in {found} of "
        f"{len(phase_fits)} runs" + (f"; {failed} fits failed" if failed else ""),
    )


def _scaling_verdicts(scaling: FitComparison | str) -> list[Verdict]:
    falls, preferred = (
        "Final sharpness falls with scale",
        "Log-linear law preferred over the power law",
    )
    if isinstance(scaling, str):
        return [Verdict(falls, None, scaling), Verdict(preferred, None, scaling)]
    fit = scaling.log_linear
    lo, hi = fit.slope_ci
    # an infinite or NaN interval excludes nothing
    decided = math.isfinite(lo) and math.isfinite(hi) and (hi < 0 or lo > 0)
    slope = Verdict(
        falls,
        (fit.slope < 0) if decided else None,
        f"log-linear slope {fit.slope:.4g} per decade, "
        f"{fit.level:.0%} interval [{lo:.3g}, {hi:.3g}], R^2 {fit.r2:.3f}",
    )
    if scaling.best is None:
        return [slope, Verdict(preferred, None, f"AIC cannot rank the fits: {scaling.undecided}")]
    return [
        slope,
        Verdict(
            preferred,
            (scaling.best == fit.form) if scaling.delta_aic >= DECIDING_DELTA_AIC else None,
            f"AIC {fit.aic:.2f} vs {scaling.power_law.aic:.2f}, delta {scaling.delta_aic:.2f}"
            f" (decided at >= {DECIDING_DELTA_AIC:g})",
        ),
    ]


def _peak_verdict(comparisons: list[CurveComparison]) -> Verdict:
    claim = "Larger models peak higher relative to their plateau"
    if len(comparisons) < MIN_SIZES_FOR_SCALING:
        return Verdict(claim, None, f"needs at least {MIN_SIZES_FOR_SCALING} sizes")
    n = [c.n_params for c in comparisons]
    ratios = [c.measured_peak_ratio for c in comparisons]
    if np.ptp(ratios) == 0:
        return Verdict(claim, None, f"peak/final is {ratios[0]:.3g} at every size")
    correlation = spearman(n, ratios)
    rho = correlation.r
    exact = len(ratios) <= MAX_EXACT_SIZES
    p_value = exact_spearman_p(len(ratios), rho) if exact else correlation.p_value
    return Verdict(
        claim,
        (rho > 0) if p_value < SIGNIFICANCE else None,
        f"Spearman rho {rho:.3f} ({'exact ' if exact else ''}p = {p_value:.3g}) of peak/final "
        f"against N; "
        f"peak/final from {min(ratios):.3g} to {max(ratios):.3g}",
    )


def exact_spearman_p(n: int, rho: float) -> float:
    """Two-sided permutation p-value of Spearman's rho over ``n`` untied pairs: the share of
    the n! orderings whose ``|rho|`` is at least the observed one.

    >>> exact_spearman_p(3, 1.0)   # 2 of the 6 orderings are as extreme
    0.3333333333333333
    """
    order = np.arange(n, dtype=float)
    permutations = np.array(list(itertools.permutations(order)))
    centred = permutations - order.mean()
    rhos = centred @ (order - order.mean()) / np.sum((order - order.mean()) ** 2)
    return float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))


def _loss_verdict(
    finals: Mapping[float, float], losses: Curves | None, final_fraction: float
) -> Verdict:
    claim = "Flatter is better: final sharpness rises with final loss across sizes"
    sizes = [n for n in finals if losses is not None and n in losses]
    if len(sizes) < MIN_SIZES_FOR_CORRELATION:
        return Verdict(
            claim, None, f"needs the probe loss of at least {MIN_SIZES_FOR_CORRELATION} sizes"
        )
    final_loss = [final_value(*losses[n], final_fraction) for n in sizes]
    r = pearson([finals[n] for n in sizes], final_loss)
    decided = r.ci[0] > 0 or r.ci[1] < 0
    return Verdict(
        claim,
        (r.r > 0) if decided else None,
        f"Pearson r {r.r:.3f}, {r.level:.0%} interval [{r.ci[0]:.3f}, {r.ci[1]:.3f}]",
    )
