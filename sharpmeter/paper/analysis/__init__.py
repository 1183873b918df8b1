"""Analyses of sharpness across scales and along training (pure numpy/scipy).

* ``scaling``: log-linear and power-law fits, AIC/BIC comparison, intervals, extrapolation;
* ``phases``: the paper's three-phase model (eq. (1)), its fit and a model-free segmentation;
* ``prediction``: final sharpness from the early mean and the scale, and against the last value
  seen by the early cutoff;
* ``correlation``: Pearson / Spearman with intervals, across scales and within runs;
* ``pacbayes``: the paper's bound ``sqrt((S ln N + ln(m/delta)) / m)``;
* ``curves``: logged rows -> per-run curves; head and tail means (over checkpoints) and the
  final value (over the last share of training time);
* ``robust``: a final value one spike cannot move (median, trimmed mean) with a moving-block
  bootstrap interval that widens for correlated measurements;
* ``stability``: the edge of stability, sharpness against ``2 / lr``;
* ``restarts``: learning-rate restarts read from the logged rate, and how sharpness rises and
  falls at them against the same curves away from them and the other schedules;
* ``inference``: a sign-test interval for few paired differences, Holm's correction;
* ``runs``: record files -> every run in them, each step once (the last write kept), on its
  planned training axis, and which runs a fit uses (with why the others are left out);
* ``replicates``: several seeds per size: a size's mean over its seeds with their standard
  error, and the scaling fits on every run beside those on the size means.

>>> from sharpmeter.paper.analysis import fit_log_linear
>>> round(fit_log_linear([1e7, 1e8, 1e9], [1.3, 1.2, 1.1]).slope, 6)
-0.1
"""

from sharpmeter.paper.analysis.correlation import (
    Correlation,
    effective_sample_size,
    pearson,
    spearman,
    within_run_correlations,
)
from sharpmeter.paper.analysis.curves import (
    curves_from_records,
    final_stderr,
    final_value,
    head_mean,
    tail_mean,
)
from sharpmeter.paper.analysis.inference import SignInterval, holm, sign_interval
from sharpmeter.paper.analysis.pacbayes import (
    PacBayesTerms,
    bound_accuracy_correlation,
    pac_bayes_bound,
    pac_bayes_terms,
)
from sharpmeter.paper.analysis.phases import (
    PhaseSegmentation,
    ThreePhaseFit,
    detect_phases,
    fit_three_phase,
    fit_three_phase_or_reason,
    peak_to_plateau_ratio,
    phase_means,
    three_phase_curve,
)
from sharpmeter.paper.analysis.prediction import (
    EarlyComparison,
    EarlyPrediction,
    against_last_seen,
    early_prediction,
    regress_final,
)
from sharpmeter.paper.analysis.replicates import SeedMean, as_replicates, scaling_fits
from sharpmeter.paper.analysis.robust import RobustFinal, robust_final
from sharpmeter.paper.analysis.runs import Run, RunEntry, RunSelection, load_runs, select_runs
from sharpmeter.paper.analysis.scaling import (
    BootstrapIntervals,
    Extrapolation,
    FitComparison,
    LogLinearFit,
    PowerLawFit,
    ScalingFit,
    bootstrap_fit,
    compare_fits,
    extrapolation_error,
    fit_log_linear,
    fit_power_law,
    information_criteria,
)
from sharpmeter.paper.analysis.stability import EDGE_BAND, at_edge, final_stability, stability_ratio

__all__ = [
    "EDGE_BAND",
    "BootstrapIntervals",
    "Correlation",
    "EarlyComparison",
    "EarlyPrediction",
    "Extrapolation",
    "FitComparison",
    "LogLinearFit",
    "PacBayesTerms",
    "PhaseSegmentation",
    "PowerLawFit",
    "RobustFinal",
    "Run",
    "RunEntry",
    "RunSelection",
    "ScalingFit",
    "SeedMean",
    "SignInterval",
    "ThreePhaseFit",
    "against_last_seen",
    "as_replicates",
    "at_edge",
    "bootstrap_fit",
    "bound_accuracy_correlation",
    "compare_fits",
    "curves_from_records",
    "detect_phases",
    "early_prediction",
    "effective_sample_size",
    "extrapolation_error",
    "final_stability",
    "final_stderr",
    "final_value",
    "fit_log_linear",
    "fit_power_law",
    "fit_three_phase",
    "fit_three_phase_or_reason",
    "head_mean",
    "holm",
    "information_criteria",
    "load_runs",
    "pac_bayes_bound",
    "pac_bayes_terms",
    "peak_to_plateau_ratio",
    "pearson",
    "phase_means",
    "regress_final",
    "robust_final",
    "scaling_fits",
    "select_runs",
    "sign_interval",
    "spearman",
    "stability_ratio",
    "tail_mean",
    "three_phase_curve",
    "within_run_correlations",
]
