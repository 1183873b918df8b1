"""Measured sharpness curves against the paper's simulator, and a verdict on each of its claims.

Levels are not comparable: the simulator is calibrated on 10M-7B language models, a measured run
is whatever its model, data and optimizer make it. Shapes are. Each curve is put on a common
axis, the fraction of training ``t = step / max_steps`` (the run's planned length, read by
:func:`~sharpmeter.paper.analysis.runs.load_runs`; its last step when unknown), and divided by
its final value ``S_final``, the mean over the last ``final_fraction`` of training time
(``t >= 1 - f``: the same span whatever the schedule's spacing); the simulated curve is the
paper's noise-free eq. (1) at the same parameter count. Per size this gives the shape RMSE and
correlation on a common grid, and, from the raw points, where each curve peaks and its
peak-to-final ratio.

The verdicts test the paper's claims on the measured curves alone:

1. three phases (rise, decay, plateau): eq. (1) fits with ``S_p > S_f > 0``, at least two
   measurements before the peak ``t_p < 1`` (a rise seen) and a decay at least half done by
   the end, ``lambda (1 - t_p) >= ln 2``, and explains the curve better than its mean (the F
   test against the mean at 0.05 and BIC both prefer it: :func:`beats_flat`);
2. final sharpness falls with scale: sign of the log-linear slope, decided when its interval
   excludes 0, fitted on one point per size (the size means over seeds, with replicates);
3. the log-linear law is preferred over the power law: decided when the AIC difference is at
   least 2 (below that the two cannot be told apart), on the same points; no test at 5%: on
   simulated studies it picked the wrong form in up to 35% with 3 sizes, 17% with 6 and 12%
   with 10 (:data:`AIC_WRONG_FORM_RATE`), which the verdict and the note on multiple
   comparisons say;
4. larger models peak higher relative to their plateau: Spearman's rho of peak/final against
   N, with an exact permutation p-value (the t approximation is far off with a few sizes),
   every run's peak taken at the same times (a run measured more often would otherwise peak
   higher by its count alone: :func:`common_grid_peak_ratios`);
5. flatter is better: final sharpness correlates positively with the final probe loss
   (Pearson, decided when its Fisher-z interval excludes 0; needs 4+ sizes);
6. early prediction: the regression ``F = b0 + b1 E + b2 log10 N`` on the mean of the first 10%
   of training (:func:`~sharpmeter.paper.analysis.prediction.against_last_seen`), each size
   predicted from the others, errs less than the model it nests, ``F = a + b log10 N``, left
   out the same way (so the early values are credited only with what they add to the size):
   decided when the sign-test interval of the per-size error reductions excludes 0 (6+ sizes
   at 95%, see :mod:`sharpmeter.paper.analysis.inference`; the regression itself needs 4+);
7. the edge of stability: ``S lr / 2`` over the last ``final_fraction`` of each run, its 20%
   trimmed mean with a moving-block bootstrap interval
   (:func:`~sharpmeter.paper.analysis.robust.robust_final`): yes when every run's interval lies
   inside [1/2, 2], no when one lies outside it (:mod:`sharpmeter.paper.analysis.stability` says
   why that band); needs the runs' learning rates;
8. the same story across measures: claims 1, 2 and 4 answered on each measure's curves
   (critical sharpness, Hessian trace, top eigenvalue, ...): no when two measures decide one of
   them differently, yes when none do and two measures decide at least one alike.

Several claims tested on one study decide some by chance: :func:`multiplicity_note` says how
many to expect and which decisions with a p-value survive Holm's correction.

One claim is about one size under several learning-rate schedules, runs outside the ladder:
:func:`schedule_verdict` asks whether cosine with restarts brings spikes at its restarts (read
from the logged learning rate) beyond the curve's own noise and the other schedules at the same
time.

With several seeds per size (replicates, :mod:`sharpmeter.paper.analysis.replicates`) each claim
takes them where they matter; :func:`analyse_curves` says how.

Example (reading runs as ``sharpmeter report`` does: each measurement once, unfinished runs
left out)::

    selection = select_runs(load_runs(["runs/study/small/sharpness.jsonl"]))
    curves = selection.replicates("critical_sharpness")
    for n, by_seed in compare_with_simulator(curves).items():
        for c in by_seed.values():
            print(n, c.shape_rmse, c.measured_peak_t, c.simulated_peak_t)
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from sharpmeter.paper.analysis import (
    FitComparison,
    ThreePhaseFit,
    fit_three_phase_or_reason,
    pearson,
    spearman,
)
from sharpmeter.paper.analysis.curves import check_sharpness_quantity, final_value
from sharpmeter.paper.analysis.inference import SignInterval, holm, min_pairs, sign_interval
from sharpmeter.paper.analysis.prediction import against_last_seen
from sharpmeter.paper.analysis.replicates import (
    MIN_SIZES_FOR_SCALING,
    Curve,
    Curves,
    Replicates,
    ScalingFits,
    Seed,
    SeedMean,
    as_replicates,
    has_replicates,
    per_run,
    scaling_fits_or_reason,
    seed_means,
    seed_text,
)
from sharpmeter.paper.analysis.restarts import (
    RESTART_WINDOW,
    START,
    RestartResponse,
    restart_response,
    restart_times,
)
from sharpmeter.paper.analysis.robust import RobustFinal
from sharpmeter.paper.analysis.runs import RunEntry, RunSelection
from sharpmeter.paper.analysis.scaling import ScalingFit
from sharpmeter.paper.analysis.stability import EDGE_BAND, at_edge, final_stability
from sharpmeter.paper.simulator import simulate_run
from sharpmeter.paper.simulator.model import no_shape_reason
from sharpmeter.paper.sizes import format_size

GRID_POINTS = 101
MIN_SIZES_FOR_CORRELATION = 4  # a Fisher-z interval needs n - 3 > 0
MIN_POINTS_BEFORE_PEAK = 2
DECIDING_DELTA_AIC = 2.0
# How often delta AIC >= DECIDING_DELTA_AIC picked the wrong form, by number of sizes: the most
# over a power-law and a log-linear truth (S falling 1.3 -> 0.65 or -> 1.0 over 3 decades) with
# 0.3-20% noise, 1000 studies each (it peaks where the noise about equals the two forms'
# difference). AIC is no test at a level: with a few sizes it errs far more often than 5%.
AIC_WRONG_FORM_RATE = {3: 0.35, 4: 0.21, 6: 0.17, 8: 0.15, 10: 0.12}
SIGNIFICANCE = 0.05
MAX_EXACT_SIZES = 8  # 8! orderings enumerate in a blink; beyond, the t approximation is fine
EARLY_FRACTION = 0.1  # the paper predicts the final value from the first 10% of training
RESTARTS = "cosine_with_restarts"  # transformers' name of the schedule
SPIKE_FROM = START  # past the rise: the paper's decay and plateau phases (its checkpoints 40-200)
SPIKE_RATIO = 2.0  # a "massive" spike: sharpness doubles beyond its noise and the other schedules

ANSWERS = {True: "yes", False: "no", None: "undecided"}
THREE_PHASES = "Three phases (rise, decay, plateau) in every run"
FALLS = "Final sharpness falls with scale"
PEAK = "Larger models peak higher relative to their plateau"
# the claims about a direction, which any measure of sharpness can answer: their short names
DIRECTION_CLAIMS = {THREE_PHASES: "three phases", FALLS: "falls", PEAK: "peak grows"}


@dataclass(frozen=True)
class CurveComparison:
    """One size's measured and simulated curves, normalised by their final values, on ``t``.

    ``not_comparable`` says why the simulator's curve at this size is no rise-decay-plateau
    (eqs. (2)-(3) extrapolated below ~2e5 parameters put the peak under the plateau): its
    peak, peak ratio and the shape RMSE and correlation are then NaN, not a comparison with
    the paper's shape; None when the shapes compare.
    """

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
    not_comparable: str | None = None


def compare_curve(
    n_params: float, t: np.ndarray, s: np.ndarray, final_fraction: float = 0.2
) -> CurveComparison:
    """Put a measured curve and the simulator's at ``n_params`` on one normalised grid.

    The grid spans the measured range of ``t`` (a run is usually first measured after step 0);
    peaks come from the raw points, which interpolation onto the grid would smooth away. Where
    the simulator's curve has no rise-decay-plateau (``not_comparable``), its peak and the
    shape statistics are NaN: a correlation with a dip says nothing of the paper's shape.
    """
    grid = np.linspace(t[0], t[-1], GRID_POINTS)
    measured_final = final_value(t, s, final_fraction)
    measured = np.interp(grid, t, s) / measured_final
    with warnings.catch_warnings():
        # its warning of a curve without the shape is `no_shape_reason`, kept in the result
        warnings.simplefilter("ignore", RuntimeWarning)
        run = simulate_run(n_params, noise=False, oscillation=False)
    trend = run.sharpness_trend
    simulated_final = final_value(run.t, trend, final_fraction)
    simulated = np.interp(grid, run.t, trend) / simulated_final
    reason = no_shape_reason(n_params)
    return CurveComparison(
        n_params=n_params,
        t=grid,
        measured=measured,
        simulated=simulated,
        measured_final=measured_final,
        simulated_final=simulated_final,
        measured_peak_t=float(t[np.argmax(s)]),
        simulated_peak_t=_if_shaped(float(run.t[np.argmax(trend)]), reason),
        measured_peak_ratio=float(s.max() / measured_final),
        simulated_peak_ratio=_if_shaped(float(trend.max() / simulated_final), reason),
        shape_rmse=_if_shaped(float(np.sqrt(np.mean((measured - simulated) ** 2))), reason),
        shape_correlation=_if_shaped(_correlation(measured, simulated), reason),
        not_comparable=reason,
    )


def _if_shaped(value: float, no_shape: str | None) -> float:
    """``value``, or NaN where the simulator's curve has no shape to compare (``no_shape``)."""
    return value if no_shape is None else math.nan


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r; NaN when either curve is flat (no shape to correlate)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def compare_with_simulator(
    curves: Curves | Replicates, final_fraction: float = 0.2
) -> dict[float, dict[Seed, CurveComparison]]:
    """:func:`compare_curve` for every run, by size (smallest first) and seed."""
    return {
        n: {seed: compare_curve(n, t, s, final_fraction) for seed, (t, s) in by_seed.items()}
        for n, by_seed in as_replicates(curves).items()
    }


@dataclass(frozen=True)
class Verdict:
    """A claim of the paper and what the measurements say: ``holds`` is None when they cannot
    decide it (too few sizes, a fit that failed)."""

    claim: str
    holds: bool | None
    evidence: str
    p_value: float | None = None  # of the test that decides it, when there is one
    # how often its rule decides wrongly by chance, measured, where it is no test at the level
    wrong_rate: float | None = None

    def line(self) -> str:
        return f"{self.claim}: **{ANSWERS[self.holds]}** ({self.evidence})"


@dataclass(frozen=True)
class StudyAnalysis:
    """Everything a report shows, computed from the curves alone; ``runs`` lists every run
    found with why it is not in the fits, when the curves came from files (see
    :func:`sharpmeter.paper.analysis.runs.select_runs`).

    Per run, by size and seed: ``replicates`` (the curves), ``phase_fits``, ``comparisons``.
    Per size: ``final_means`` (over its seeds). ``scaling`` is fitted on every run's final
    value, ``scaling_on_means`` on the sizes' means (None without replicates), which then
    decides the scaling verdicts.
    """

    replicates: Replicates = field(repr=False)
    final_means: dict[float, SeedMean]
    phase_fits: dict[float, dict[Seed, ThreePhaseFit | str]] = field(repr=False)
    scaling: FitComparison | None
    scaling_on_means: FitComparison | None
    comparisons: dict[float, dict[Seed, CurveComparison]] = field(repr=False)
    verdicts: list[Verdict]
    runs: tuple[RunEntry, ...] = field(default=(), repr=False)

    @property
    def finals(self) -> dict[float, float]:
        """Each size's final value, the mean over its seeds."""
        return {n: mean.mean for n, mean in self.final_means.items()}

    @property
    def replicated(self) -> bool:
        """Whether a size has several seeds."""
        return has_replicates(self.replicates)

    @property
    def curves(self) -> Curves:
        """One curve per size; raises ``ValueError`` when a size has several seeds (see
        ``replicates``)."""
        if self.replicated:
            raise ValueError("several seeds per size: take their curves from `replicates`")
        return {n: curve for n, by_seed in self.replicates.items() for curve in by_seed.values()}

    @property
    def unfinished(self) -> dict[float, str]:
        """The fitted sizes with a run that stopped before its planned end (see
        :attr:`~sharpmeter.paper.analysis.runs.RunSelection.unfinished`)."""
        return RunSelection(self.runs).unfinished

    @property
    def left_out(self) -> list[RunEntry]:
        """The runs found but not fitted, each with why."""
        return [entry for entry in self.runs if entry.left_out is not None]

    @property
    def multiplicity(self) -> str:
        """How many decisions chance alone would make among the verdicts, and which survive
        Holm's correction (:func:`multiplicity_note`)."""
        return multiplicity_note(self.verdicts)


def analyse_curves(
    curves: Curves | Replicates,
    final_fraction: float = 0.2,
    losses: Curves | Replicates | None = None,
    runs: Sequence[RunEntry] = (),
    *,
    learning_rates: Curves | Replicates | None = None,
    other_measures: Mapping[str, Curves | Replicates] | None = None,
    quantity: str = "sharpness",
    heldout_losses: Mapping[float, Mapping[Any, float]] | None = None,
) -> StudyAnalysis:
    """Fits, simulator comparison and verdicts for one curve per size, or per size its seeds'
    curves ``{n_params: {seed: (t, values)}}`` (``losses``: the probe loss curves of the same
    runs, for the flatter-is-better claim; ``runs``: every run found, fitted or not, to be
    listed beside the results; ``learning_rates``: the runs' ``lr``, for the edge of
    stability; ``other_measures``: the curves of other measures of the same runs by name, for
    the same story across measures, where ``quantity`` names the one in ``curves``;
    ``heldout_losses``: ``{n_params: {seed: loss}}`` of blocks held out of training, which
    flatter-is-better then takes instead of the probe loss, a training batch).

    With several seeds per size, the seeds count where they carry information:

    * a size's final value is the mean of its seeds' final values, ± the standard error over
      seeds (``final_means``);
    * the claims that the final value falls with scale and which form fits better are decided
      on the fits to the size means, one point per size with ``K - 2`` degrees of freedom: a
      size's seeds share its departure from the law, so taking them as independent points
      would decide far more often than the level says when the sizes stray from the line more
      than their seeds explain; the fits on every run's final value are shown beside them;
    * eq. (1) is fitted to each run on its own, not to a size's pooled points: the claim is
      about every run, a pooled fit would blur peaks that fall at different t into one too low
      and wide, and its residuals, correlated within a seed, would understate its intervals;
      a size's parameters are then the seed means of its runs' fits;
    * the peak over the final value is each run's own, averaged over the size's seeds before
      the sizes are ranked (the maximum of pooled noisy points is biased upwards), its peak
      taken at the same times in every run (:func:`common_grid_peak_ratios`);
    * flatter is better correlates the size means of sharpness and loss: the sizes, not the
      seeds, are the independent draws of the law;
    * early prediction regresses every run, leaves all the seeds of a size out together, and
      averages the error reductions over each size's seeds for the sign test;
    * the edge of stability asks every run.

    Raises ``ValueError`` when ``quantity`` is no measure of sharpness (the verdicts are about
    sharpness: :func:`~sharpmeter.paper.analysis.curves.check_sharpness_quantity`).
    """
    check_sharpness_quantity(quantity)
    replicates = as_replicates(curves)
    run_finals = per_run(replicates, lambda t, s: final_value(t, s, final_fraction))
    final_means = seed_means(run_finals)
    phase_fits = per_run(replicates, fit_three_phase_or_reason)
    fitted = scaling_fits_or_reason(run_finals)
    scaling, on_means = (None, None) if isinstance(fitted, str) else fitted
    comparisons = compare_with_simulator(replicates, final_fraction)
    verdicts = [
        _three_phases_verdict(phase_fits, replicates),
        *_scaling_verdicts(fitted),
        peak_verdict(replicates, final_fraction),
        _loss_verdict(final_means, _replicates_or_none(losses), final_fraction, heldout_losses),
        _early_verdict(replicates, final_fraction),
        _stability_verdict(
            replicates, _replicates_or_none(learning_rates), final_fraction, quantity
        ),
    ]
    stories = {quantity: direction_answers(verdicts)}
    sizes = {quantity: len(replicates)}
    for name, other in (other_measures or {}).items():
        stories[name] = direction_answers(analyse_curves(other, final_fraction).verdicts)
        sizes[name] = len(other)
    verdicts.append(_measures_verdict(stories, sizes))
    return StudyAnalysis(
        replicates,
        final_means,
        phase_fits,
        scaling,
        on_means,
        comparisons,
        verdicts,
        tuple(runs),
    )


def _replicates_or_none(curves: Curves | Replicates | None) -> Replicates | None:
    return None if curves is None else as_replicates(curves)


def has_three_phases(fit: ThreePhaseFit | str, t: np.ndarray) -> bool:
    """A peak above the plateau with a rise seen before it and half the decay after it, in a
    fit that explains the curve better than its mean (:func:`beats_flat`)."""
    if not isinstance(fit, ThreePhaseFit):
        return False
    rise_seen = np.sum(t < fit.t_p) >= MIN_POINTS_BEFORE_PEAK
    decay_seen = fit.lam * (1 - fit.t_p) >= math.log(2)
    shaped = fit.s_p > fit.s_f > 0 and fit.t_p < 1 and rise_seen and decay_seen
    return shaped and beats_flat(fit)


def beats_flat(fit: ThreePhaseFit) -> bool:
    """Whether eq. (1) explains the curve better than a flat line at its mean: the F test of
    the fit against the mean at ``SIGNIFICANCE`` and BIC both prefer the fit.

    Eq. (1) has four parameters to bend to noise: on a flat curve with 5% noise the shape
    conditions alone pass in ~43% of runs of 30 points. The F test alone is too lenient for
    long curves (the fit searches ``t_p`` and ``lambda``, which a flat curve does not have:
    9-12% of flat curves of 100-1000 points pass at 0.05), BIC alone for short ones (8-14% at
    8-10 points); together, with the shape conditions, flat noise passes in at most ~4% of
    runs from 8 to 1000 points (Monte Carlo, 300 curves each).
    """
    return fit.flat_p_value < SIGNIFICANCE and fit.flat_delta_bic < 0


def _three_phases_verdict(
    phase_fits: Mapping[float, Mapping[Seed, ThreePhaseFit | str]], replicates: Replicates
) -> Verdict:
    fits = [
        (fit, replicates[n][seed][0])
        for n, by_seed in phase_fits.items()
        for seed, fit in by_seed.items()
    ]
    found = sum(has_three_phases(fit, t) for fit, t in fits)
    reasons = [fit for fit, _ in fits if isinstance(fit, str)]  # "no fit: why"
    failed = len(reasons)
    if found == len(fits):
        holds = True
    elif found + failed == len(fits):
        holds = None  # no run said no; the failed fits cannot say yes
    else:
        holds = False
    return Verdict(
        THREE_PHASES,
        holds,
        f"eq. (1) fits better than a flat line (F test p < {SIGNIFICANCE:g} and BIC) with "
        f"S_p > S_f > 0, a rise and half the decay seen in {found} of {len(fits)} runs"
        + (f"; {failed} fits failed, the first with {reasons[0]}" if failed else ""),
    )


def _scaling_verdicts(
    fitted: ScalingFits | str,
) -> list[Verdict]:
    """The slope's sign and the preferred law, decided on one point per size: the fit on every
    run's final value when each size has one run, else the fit on the size means.

    A size's seeds share its departure from the law (what its architecture or data do, which no
    seed averages away), so they are not independent points about the line: the fit on every
    run would test the slope against the seed noise alone, with ``n - 2`` degrees of freedom
    where the sizes give ``K - 2``, and decide far more often than its level when the means
    stray from the line more than their seeds explain. The fit on the means has the right error
    rate either way (its residuals carry both sources); the one on every run is shown beside it.
    """
    falls, preferred = FALLS, "Log-linear law preferred over the power law"
    if isinstance(fitted, str):
        return [Verdict(falls, None, fitted), Verdict(preferred, None, fitted)]
    every_run, on_means = fitted
    scaling = every_run if on_means is None else on_means
    fit = scaling.log_linear
    lo, hi = fit.slope_ci
    # an infinite or NaN interval excludes nothing
    decided = math.isfinite(lo) and math.isfinite(hi) and (hi < 0 or lo > 0)
    slope = Verdict(
        falls,
        (fit.slope < 0) if decided else None,
        f"log-linear slope {fit.slope:.4g} per decade, "
        f"{fit.level:.0%} interval [{lo:.3g}, {hi:.3g}], R^2 {fit.r2:.3f}"
        + _points_text(every_run.log_linear, on_means),
        _slope_p_value(fit),
    )
    if scaling.best is None:
        return [slope, Verdict(preferred, None, f"AIC cannot rank the fits: {scaling.undecided}")]
    means = "" if on_means is None else f" on the {fit.n} size means"
    wrong = aic_wrong_form_rate(fit.n)
    return [
        slope,
        Verdict(
            preferred,
            (scaling.best == fit.form) if scaling.delta_aic >= DECIDING_DELTA_AIC else None,
            f"AIC{means} {fit.aic:.2f} vs {scaling.power_law.aic:.2f}, delta "
            f"{scaling.delta_aic:.2f} (decided at >= {DECIDING_DELTA_AIC:g}, no test at "
            f"{SIGNIFICANCE:g}: on {fit.n} sizes it picked the wrong form in up to {wrong:.0%} "
            "of simulated studies)",
            wrong_rate=wrong,
        ),
    ]


def aic_wrong_form_rate(sizes: int) -> float:
    """How often delta AIC >= 2 picks the wrong form on ``sizes`` sizes (at least 3): the
    measured rate (:data:`AIC_WRONG_FORM_RATE`) at the largest count measured up to ``sizes``,
    an upper bound where the rate falls with more sizes; past 10 sizes, unmeasured, that of 10.

    >>> aic_wrong_form_rate(3), aic_wrong_form_rate(5), aic_wrong_form_rate(40)
    (0.35, 0.21, 0.12)
    """
    return AIC_WRONG_FORM_RATE[max(k for k in AIC_WRONG_FORM_RATE if k <= sizes)]


def _points_text(every_run: ScalingFit, on_means: FitComparison | None) -> str:
    """Which fit decides: with replicates, the size means', and the fit on every run beside it."""
    if on_means is None:
        return ""
    lo, hi = every_run.slope_ci
    return (
        f", on the {on_means.log_linear.n} size means over seeds (one point per size: a "
        f"size's seeds share its departure from the law); the fit on all {every_run.n} runs, "
        f"not used, gives [{lo:.3g}, {hi:.3g}]"
    )


def _slope_p_value(fit: ScalingFit) -> float | None:
    """Two-sided t-test of a zero slope, the test its interval inverts (None when the fit has
    no finite standard error: an exact fit or an overflow)."""
    if not fit.slope_se > 0:
        return None
    p_value = float(2 * stats.t.sf(abs(fit.slope) / fit.slope_se, fit.n - 2))
    return p_value if math.isfinite(p_value) else None


def peak_verdict(replicates: Replicates, final_fraction: float = 0.2) -> Verdict:
    """Whether larger models peak higher over their final value: Spearman's rho of each size's
    peak/final (its seeds' mean) against N, with the exact p-value up to
    :data:`MAX_EXACT_SIZES` sizes; every run's peak is taken at the same times
    (:func:`common_grid_peak_ratios`)."""
    claim = PEAK
    if len(replicates) < MIN_SIZES_FOR_SCALING:
        return Verdict(claim, None, f"needs at least {MIN_SIZES_FOR_SCALING} sizes")
    try:
        by_size, times = common_grid_peak_ratios(replicates, final_fraction)
    except ValueError as error:  # runs that share no stretch of training
        return Verdict(claim, None, str(error))
    n = list(by_size)
    ratios = [mean.mean for mean in by_size.values()]
    averaged = "(each run's, averaged over seeds) " if has_replicates(replicates) else ""
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
        f"{averaged}against N; "
        f"peak/final from {min(ratios):.3g} to {max(ratios):.3g}, every run's peak over its "
        f"points nearest the {times} times of the sparsest run",
        p_value,
    )


def common_grid_peak_ratios(
    replicates: Replicates, final_fraction: float = 0.2
) -> tuple[dict[float, SeedMean], int]:
    """Each size's peak over final value (its seeds' mean), every run's peak taken at the same
    times, and how many: the times of the run with the fewest points in the span that every
    run covers, each run's peak the largest of its points nearest those times.

    The maximum of more noisy points is larger (by about ``sigma sqrt(2 ln n)``), so each run's
    own maximum made a size measured more often peak higher by its count alone: with 6 sizes
    measured 20 to 640 times and no trend, "larger models peak higher" was decided in 22-26%
    of studies at the 5% level (Monte Carlo, ``tests/test_compare.py``). The final value is the
    run's own (:func:`final_value`): more points only make a mean less noisy, not larger.
    Raises ``ValueError`` when some run has no point in the span every run covers.
    """
    curves = [curve for by_seed in replicates.values() for curve in by_seed.values()]
    start = max(float(t[0]) for t, _ in curves)
    end = min(float(t[-1]) for t, _ in curves)
    spans = [t[(t >= start) & (t <= end)] for t, _ in curves]
    grid = min(spans, key=len)
    if grid.size == 0:
        raise ValueError(
            "no common times to take the peaks at: the runs share no stretch of training (the "
            f"latest first measurement at t = {start:.3g}, the earliest last at t = {end:.3g})"
        )
    ratios = {
        n: SeedMean(
            tuple(
                float(s[_nearest(t, grid)].max()) / final_value(t, s, final_fraction)
                for t, s in by_seed.values()
            )
        )
        for n, by_seed in replicates.items()
    }
    return ratios, int(grid.size)


def _nearest(t: np.ndarray, times: np.ndarray) -> np.ndarray:
    """The index of the point of ``t`` (sorted) nearest each of ``times``."""
    right = np.searchsorted(t, times).clip(0, t.size - 1)
    left = (right - 1).clip(0)
    return np.where(times - t[left] <= t[right] - times, left, right)


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
    finals: Mapping[float, SeedMean],
    losses: Replicates | None,
    final_fraction: float,
    heldout: Mapping[float, Mapping[Any, float]] | None = None,
) -> Verdict:
    """Final sharpness against the final loss, size means over seeds: the held-out loss where
    every size has one (generalization), else the probe loss over the final fraction."""
    claim = "Flatter is better: final sharpness rises with final loss across sizes"
    if heldout is not None and sum(n in heldout for n in finals) >= MIN_SIZES_FOR_CORRELATION:
        sizes = [n for n in finals if n in heldout]
        final_loss = [SeedMean(tuple(heldout[n].values())).mean for n in sizes]
        which, several = "held-out loss", any(len(heldout[n]) > 1 for n in sizes)
    else:
        sizes = [n for n in finals if losses is not None and n in losses]
        if len(sizes) < MIN_SIZES_FOR_CORRELATION:
            return Verdict(
                claim, None, f"needs the probe loss of at least {MIN_SIZES_FOR_CORRELATION} sizes"
            )
        final_loss = [
            SeedMean(
                tuple(final_value(*curve, final_fraction) for curve in losses[n].values())
            ).mean
            for n in sizes
        ]
        which, several = "probe loss (a training batch)", has_replicates(losses)
    try:
        r = pearson([finals[n].mean for n in sizes], final_loss)
    except ValueError as error:  # a series equal at every size: no correlation to speak of
        return Verdict(claim, None, f"no correlation with the final {which}: {error}")
    decided = r.ci[0] > 0 or r.ci[1] < 0
    means = " of the size means over seeds" if several else ""
    return Verdict(
        claim,
        (r.r > 0) if decided else None,
        f"Pearson r {r.r:.3f}{means} with the final {which}, {r.level:.0%} interval "
        f"[{r.ci[0]:.3f}, {r.ci[1]:.3f}]",
        r.p_value,
    )


def _early_verdict(replicates: Replicates, final_fraction: float) -> Verdict:
    claim = (
        f"The first {EARLY_FRACTION:.0%} of training predicts the final value beyond what "
        "the model size does"
    )
    averaged = " (averaged over seeds)" if has_replicates(replicates) else ""
    try:
        comparison = against_last_seen(replicates, EARLY_FRACTION, final_fraction)
        interval = sign_interval(comparison.size_improvement, 1 - SIGNIFICANCE)
    except ValueError as error:  # fewer than 4 sizes measured by the cutoff; an overflow
        return Verdict(claim, None, f"no early regression across sizes: {error}")
    evidence = (
        f"leave-one-size-out RMSE {_rms(comparison.regression_errors):.3g} of the regression "
        f"on the early mean and log10 N, against {_rms(comparison.size_only_errors):.3g} for "
        f"log10 N alone ({_rms(comparison.last_seen_errors):.3g} for the last value seen at "
        f"t <= {EARLY_FRACTION:g}, {_rms(comparison.early_mean_errors):.3g} for the early "
        f"mean); smaller error than log10 N alone in {interval.positive} of {interval.n} "
        f"sizes{averaged}, {_sign_text(interval)}"
    )
    if comparison.no_early_point:
        evidence += "; not measured by then: " + ", ".join(
            map(format_size, comparison.no_early_point)
        )
    holds = (interval.median > 0) if interval.excludes_zero else None
    return Verdict(claim, holds, evidence, interval.p_value)


def _rms(errors: np.ndarray) -> float:
    return float(np.sqrt(np.mean(errors**2)))


def _sign_text(interval: SignInterval) -> str:
    lo, hi = interval.ci
    if not math.isfinite(lo):
        level = 1 - SIGNIFICANCE
        return f"too few for a sign-test interval at {level:.0%} (needs {min_pairs(level)} sizes)"
    return (
        f"{interval.coverage:.1%} sign-test interval of the reduction [{lo:.3g}, {hi:.3g}] "
        f"(p = {interval.p_value:.3g})"
    )


def _stability_verdict(
    replicates: Replicates,
    learning_rates: Replicates | None,
    final_fraction: float,
    quantity: str,
) -> Verdict:
    low, high = EDGE_BAND
    claim = f"Sharpness settles at the edge of stability: S lr / 2 within [{low:g}, {high:g}]"
    if learning_rates is None:
        return Verdict(claim, None, "needs the runs' learning rates (rows' `lr`)")
    finals = {
        run_label(n, seed, by_seed): _final_ratio(
            curve, learning_rates.get(n, {}).get(seed), final_fraction
        )
        for n, by_seed in replicates.items()
        for seed, curve in by_seed.items()
    }
    answers = [at_edge(f.ci) if isinstance(f, RobustFinal) else None for f in finals.values()]
    if any(answer is False for answer in answers):
        holds = False
    else:
        holds = True if all(answers) else None
    described = [f"{name} {_ratio_text(final)}" for name, final in finals.items()]
    return Verdict(
        claim,
        holds,
        f"S = {quantity}; over the last {final_fraction:.0%} of each run, the trimmed mean "
        f"[{1 - SIGNIFICANCE:.0%} interval] of S lr / 2: " + ", ".join(described),
    )


def run_label(n_params: float, seed: Seed, by_seed: Mapping[Seed, object]) -> str:
    """``10M``, or ``10M seed 3`` when the size has several seeds."""
    name = format_size(n_params)
    return f"{name} {seed_text(seed)}" if len(by_seed) > 1 else name


def _final_ratio(curve: Curve, lr: Curve | None, final_fraction: float) -> RobustFinal | str:
    """The run's final stability ratio, or why it has none."""
    if lr is None:
        return "no lr logged"
    try:
        return final_stability(*curve, *lr, final_fraction)
    except ValueError:  # no point with both a sharpness and a positive learning rate
        return "no positive lr beside S"


def _ratio_text(final: RobustFinal | str) -> str:
    if isinstance(final, str):
        return f"({final})"
    lo, hi = final.ci
    interval = f" [{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) else " (too few points)"
    return f"{final.trimmed_mean:.3g}{interval}"


def direction_answers(verdicts: Sequence[Verdict]) -> dict[str, bool | None]:
    """The answers to the claims about a direction, by claim."""
    return {v.claim: v.holds for v in verdicts if v.claim in DIRECTION_CLAIMS}


def _measures_verdict(
    stories: Mapping[str, Mapping[str, bool | None]], sizes: Mapping[str, int]
) -> Verdict:
    """Whether the measures' answers agree; a measure with a final value at fewer sizes than
    the first (another schedule, failed measurements) says on how many it answers."""
    claim = "The same story across measures: " + ", ".join(DIRECTION_CLAIMS.values()) + " agree"
    most = max(sizes.values())
    told = "; ".join(
        f"{measure}{f' ({sizes[measure]} of {most} sizes)' if sizes[measure] < most else ''}: "
        + ", ".join(f"{DIRECTION_CLAIMS[c]} {ANSWERS[holds]}" for c, holds in answers.items())
        for measure, answers in stories.items()
    )
    if len(stories) < 2:
        return Verdict(claim, None, f"needs a second measure of the same runs; {told}")
    decided = {
        c: {answers[c] for answers in stories.values() if answers[c] is not None}
        for c in DIRECTION_CLAIMS
    }
    split = [DIRECTION_CLAIMS[c] for c, said in decided.items() if len(said) > 1]
    if split:
        return Verdict(claim, False, f"measures disagree on {', '.join(split)}; {told}")
    twice = [
        DIRECTION_CLAIMS[c]
        for c in DIRECTION_CLAIMS
        if sum(answers[c] is not None for answers in stories.values()) >= 2
    ]
    if not twice:
        return Verdict(claim, None, f"no claim decided by two measures; {told}")
    return Verdict(claim, True, f"agree on {', '.join(twice)}; {told}")


def schedule_verdict(curves_by_schedule: Mapping[str, Curve], restarts_lr: Curve | None) -> Verdict:
    """Schedule sensitivity: one size trained under several learning-rate schedules (transformers'
    names), and whether cosine with restarts makes sharpness spike at its restarts where the
    others decay smoothly.

    The restarts are read from ``restarts_lr``, the restarts run's logged learning rate
    (:func:`~sharpmeter.paper.analysis.restarts.restart_times`); each restart's rise of
    ``ln S`` within ``RESTART_WINDOW`` measurements is ranked among the same curves' rises away
    from the restarts past ``SPIKE_FROM`` (p-values combined by Fisher's method) and, as an
    excess, set beside the noise's median rise and the other schedules' rise at the same time
    (:func:`~sharpmeter.paper.analysis.restarts.restart_response`). Yes when the combined
    p-value is below ``SIGNIFICANCE`` and the restarts' median excess is at least ``SPIKE_RATIO``
    times (its p-value is the verdict's); no when the excess is smaller (a spike between
    restarts is noise here, not a yes); undecided for a large excess that noise could make,
    and without a restarts curve, another schedule's, a learning rate that rises again, or
    enough measurements. The evidence says how sharpness fell at the restarts, too.

    Example::

        curves = {"cosine": (t, s1), "linear": (t, s2), RESTARTS: (t, s3)}
        verdict = schedule_verdict(curves, restarts_lr=(t, lr3))
        verdict.line()  # "Cosine with restarts makes sharpness spike ...: **yes** (...)"
    """
    claim = "Cosine with restarts makes sharpness spike where cosine and linear decay smoothly"
    if RESTARTS not in curves_by_schedule or len(curves_by_schedule) < 2:
        given = ", ".join(sorted(curves_by_schedule)) or "none"
        return Verdict(claim, None, f"needs a {RESTARTS} curve and another schedule's; got {given}")
    if restarts_lr is None:
        return Verdict(claim, None, f"{RESTARTS} logs no learning rate: its restarts are unknown")
    times = restart_times(*restarts_lr)
    if times.size == 0:
        return Verdict(claim, None, f"the learning rate of {RESTARTS} never rises again")
    try:
        response = restart_response(curves_by_schedule, RESTARTS, times)
    except ValueError as error:
        return Verdict(claim, None, str(error))
    if response.spike_factor < SPIKE_RATIO:  # decided by the size of the rise, not a test
        return Verdict(claim, False, _restarts_evidence(response))
    holds = True if response.p_rise < SIGNIFICANCE else None
    return Verdict(claim, holds, _restarts_evidence(response), response.p_rise)


def _restarts_evidence(response: RestartResponse) -> str:
    at = ", ".join(f"{shift.t:.2f}" for shift in response.shifts)
    rises = ", ".join(_factors(shift.rise, shift.control_rise) for shift in response.shifts)
    falls = ", ".join(_factors(-shift.fall, -shift.control_fall) for shift in response.shifts)
    return (
        f"restarts at t = {at}; within {RESTART_WINDOW} measurements S rose x{rises} and fell "
        f"to x{falls} (other schedules at the same time in brackets); away from the restarts "
        f"past t = {SPIKE_FROM:g} the median rise is x{math.exp(response.null_rise):.3g} and fall "
        f"x{math.exp(-response.null_fall):.3g} ({response.null_size} positions); beyond both the "
        f"restarts raise S x{response.spike_factor:.3g} (p = {response.p_rise:.2g}; a spike from "
        f"x{SPIKE_RATIO:g}) and lower it to x{response.collapse_factor:.3g} "
        f"(p = {response.p_fall:.2g})"
    )


def _factors(log_shift: float, log_control: float) -> str:
    control = f" ({math.exp(log_control):.3g})" if math.isfinite(log_control) else ""
    return f"{math.exp(log_shift):.3g}{control}"


def multiplicity_note(verdicts: Sequence[Verdict], level: float = SIGNIFICANCE) -> str:
    """How many of the verdicts are decided, how many false decisions chance alone would make
    among as many tests at ``level`` (a verdict whose rule is no such test counts at its
    measured ``wrong_rate``), and which decisions with a p-value survive Holm's correction at
    family-wise ``level`` (:func:`~sharpmeter.paper.analysis.inference.holm`).

    >>> tests = [("A", True, 0.001), ("B", False, 0.03), ("C", None, 0.2)]
    >>> note = multiplicity_note([Verdict(claim, holds, "", p) for claim, holds, p in tests])
    >>> note[: note.index(";")]
    '2 of 3 verdicts decided on one study'
    >>> note[note.index("Holm") :]
    "Holm's correction over the 3 verdicts with a p-value keeps A (p = 0.001); not B (p = 0.03)."
    """
    decided = sum(v.holds is not None for v in verdicts)
    rated = [v for v in verdicts if v.wrong_rate is not None]
    expected = level * (len(verdicts) - len(rated)) + sum(v.wrong_rate for v in rated)
    rates = "".join(
        f" ({v.claim}: a wrong decision in up to {v.wrong_rate:.0%} of studies, measured)"
        for v in rated
    )
    note = (
        f"{decided} of {len(verdicts)} verdicts decided on one study; with {len(verdicts)} "
        f"tests at level {level:g}{rates}, about {expected:.2g} false decisions are "
        "expected by chance alone."
    )
    tested = [v for v in verdicts if v.p_value is not None]
    kept = holm([v.p_value for v in tested], level)
    decisions = [(v, k) for v, k in zip(tested, kept, strict=True) if v.holds is not None]
    if not decisions:
        return note
    survivors = [_with_p(v) for v, k in decisions if k]
    fallen = [_with_p(v) for v, k in decisions if not k]
    return (
        f"{note} Holm's correction over the {len(tested)} verdicts with a p-value keeps "
        f"{'; '.join(survivors) or 'none'}" + (f"; not {'; '.join(fallen)}." if fallen else ".")
    )


def _with_p(verdict: Verdict) -> str:
    return f"{verdict.claim} (p = {verdict.p_value:.2g})"
