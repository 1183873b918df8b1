"""``sharpmeter fit``: scaling-law and three-phase fits of logged or simulated curves.

Each run's final value is its mean over the last ``--final-fraction`` of training time (default
10%: on the paper's 200 evenly spaced checkpoints, its last 20, as in Table 1; by time, not by
count, so a log-spaced run is averaged over the same span of training as an evenly spaced
one). Every run found is listed first, with its seed; one left out of the fits says why (empty,
diverged, no finite value, no value in that last fraction, or unfinished unless
``--include-unfinished``). Runs
at one size that differ in seed are replicates: a size's final value is then the mean over its
seeds with their standard error and t-interval, the scaling fits take every run's final value
and are repeated on the size means, and the three-phase parameters are the seed means of each
run's fit with their t-interval over seeds (:mod:`sharpmeter.paper.analysis.replicates`). Example
(shell):
    sharpmeter fit runs/simulate/curves.jsonl --plot
    sharpmeter fit logs/*.jsonl --quantity hessian_trace --bootstrap 2000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from sharpmeter.paper.analysis.curves import (
    SHARPNESS_QUANTITIES,
    check_sharpness_quantity,
    final_value,
)
from sharpmeter.paper.analysis.phases import PARAMETERS, ThreePhaseFit, fit_three_phase_or_reason
from sharpmeter.paper.analysis.replicates import (
    Replicates,
    Seed,
    SeedMean,
    has_replicates,
    per_run,
    scaling_fits_or_reason,
    seed_means,
    seed_text,
)
from sharpmeter.paper.analysis.runs import RunSelection, load_runs, select_runs
from sharpmeter.paper.analysis.scaling import FitComparison, bootstrap_fit, extrapolation_error
from sharpmeter.paper.sizes import format_size

_PARAMETER_LABELS = {"s_p": "S_p", "s_f": "S_f", "t_p": "t_p", "lam": "lambda"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``fit`` subcommand to the top-level ``sharpmeter`` parser."""
    parser = subparsers.add_parser(
        "fit",
        help="fit scaling laws and the three-phase model to measured or simulated curves",
        description=(
            "Read records (JSONL/CSV, long rows from the simulator or wide rows from the "
            "training callback), take the curves per model size (one per seed), and print the "
            "log-linear and power-law fits of the final values with intervals, their AIC "
            "comparison, the extrapolation to the largest size, and the three-phase fit (eq. 1) "
            "of each run."
        ),
    )
    parser.add_argument("files", nargs="+", type=Path, help="record files (.jsonl or .csv)")
    parser.add_argument(
        "--quantity",
        default=None,
        help=(
            f"measure of sharpness to fit, one of {', '.join(SHARPNESS_QUANTITIES)} (default: "
            "sharpness for long rows, critical_sharpness for wide)"
        ),
    )
    parser.add_argument(
        "--final-fraction",
        type=float,
        default=0.1,
        help="final value = mean over this last fraction of training time (default: 0.1)",
    )
    parser.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument(
        "--include-unfinished",
        action="store_true",
        help=(
            "also fit runs not known to have ended normally (metadata finished: false, or "
            "an older file that cannot tell), marked as such"
        ),
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="B",
        help="also print residual-bootstrap intervals from B resamples (default: none)",
    )
    parser.add_argument("--plot", action="store_true", help="save the scaling-law figure")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("sharpness_scaling.png"),
        help="figure path for --plot (default: sharpness_scaling.png)",
    )
    parser.set_defaults(handler=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    """Handler of ``sharpmeter fit``: 0 on success, 2 with a message on bad input."""
    try:
        check_sharpness_quantity(args.quantity)
        selection = select_runs(
            load_runs(args.files), args.quantity, args.include_unfinished, args.final_fraction
        )
        replicates = selection.replicates(args.quantity)
        finals = per_run(replicates, lambda t, s: final_value(t, s, args.final_fraction))
        fitted = scaling_fits_or_reason(finals, args.level)
    except (OSError, ValueError) as error:
        print(f"sharpmeter fit: error: {error}", file=sys.stderr)
        return 2

    quantity = args.quantity or "sharpness"
    marks = _unfinished_marks(selection)
    _print_runs(selection)
    _print_finals(replicates, seed_means(finals, args.level), quantity, args.final_fraction, marks)
    comparison, on_means = (None, None) if isinstance(fitted, str) else fitted
    if comparison is None:
        print(f"\n{fitted}")
    else:
        _print_scaling(comparison, args.bootstrap)
    if on_means is not None:
        _print_on_means(on_means)
    _print_phases(replicates, args.level, marks)

    if args.plot:
        if comparison is None:
            print("sharpmeter fit: error: --plot needs a scaling fit", file=sys.stderr)
            return 2
        from sharpmeter.paper.analysis.plotting import plot_scaling_fit  # matplotlib only on demand

        print(f"\nwrote {plot_scaling_fit(comparison, args.output, f'final {quantity}')}")
    return 0


def _interval(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _unfinished_marks(selection: RunSelection) -> dict[float, str]:
    """``"  (unfinished: step 60 of 150)"`` for each fitted size with a run that stopped early."""
    return {n: f"  ({mark})" for n, mark in selection.unfinished.items()}


def _print_runs(selection: RunSelection) -> None:
    print(f"Runs found: {len(selection.entries)}, fitted: {len(selection.fitted)}")
    print(f"  {'N':>8}  {'values':>6}  {'not used':>8}  {'steps':<16}  run")
    for entry in selection.entries:
        run = entry.run
        size = "?" if run.n_params is None else format_size(run.n_params)
        state = f"left out: {entry.left_out}" if entry.left_out else "fitted"
        seed = "" if run.seed is None else f", {seed_text(run.seed)}"
        print(
            f"  {size:>8}  {entry.used:>6}  {entry.not_used:>8}  {run.progress:<16}  "
            f"{run.label}{seed}: {state}"
        )
    print()


def _print_finals(
    replicates: Replicates,
    finals: dict[float, SeedMean],
    quantity: str,
    frac: float,
    marks: dict[float, str],
) -> None:
    """Each size's final value; with replicates, the mean over its seeds, their standard error,
    how many there are and the t-interval over them."""
    seeded = has_replicates(replicates)
    title = f"Final {quantity} (mean over the last {frac:.0%} of training"
    print(title + ("; over seeds: mean, standard error, t-interval)" if seeded else ")"))
    header = f"  {'N':>8}  {'points':>6}  {'final':>8}"
    level = next(iter(finals.values())).level  # every size's, the command's --level
    print(header + (f"  {'± se':>8}  {'seeds':>5}  {level:.0%} interval" if seeded else ""))
    for n, by_seed in replicates.items():
        points = sum(t.size for t, _ in by_seed.values())
        final = finals[n]
        row = f"  {format_size(n):>8}  {points:>6}  {final.mean:>8.4f}"
        if seeded:
            row += f"  {final.stderr:>8.4f}  {final.n_seeds:>5}  {_interval(final.ci)}"
        print(row + marks.get(n, ""))


def _print_scaling(comparison: FitComparison, n_bootstrap: int) -> None:
    ll, pl = comparison.log_linear, comparison.power_law
    print(f"\nScaling fits ({ll.level:.0%} t-intervals; R^2, RSS, AIC, BIC on the original scale)")
    sizes = np.unique(ll.n_params).size
    if ll.n > sizes:
        print(f"  on every run's final value: {ll.n} runs of {sizes} sizes")
    rows = _fit_rows(comparison)
    if n_bootstrap:
        boot_ll, boot_pl = bootstrap_fit(ll, n_bootstrap), bootstrap_fit(pl, n_bootstrap)
        rows.append(("a / p boot", _interval(boot_ll.slope_ci), _interval(boot_pl.slope_ci)))
        rows.append(
            ("b / ln c boot", _interval(boot_ll.intercept_ci), _interval(boot_pl.intercept_ci))
        )
    _print_fit_rows(comparison, rows)
    if sizes >= 4:
        for form in ("log-linear", "power-law"):
            e = extrapolation_error(ll.n_params, ll.values, form=form, level=ll.level)
            actual = float(np.mean(e.actual))
            seeds = f" (mean of {e.actual.size} seeds)" if e.actual.size > 1 else ""
            print(
                f"  {form} fitted without {format_size(e.n_target[0])}: predicts "
                f"{e.predicted[0]:.4f} {_interval((e.lower[0], e.upper[0]))}, actual "
                f"{actual:.4f}{seeds}, error {(e.predicted[0] - actual) / actual:+.2%}"
            )


def _print_on_means(comparison: FitComparison) -> None:
    """The same fits on the size means, one point per size: the ones the report's scaling
    verdicts use, whose intervals hold their level when the means stray from the law more
    than their seeds explain (a size's seeds share that departure)."""
    print(f"\nThe same fits on the {comparison.log_linear.n} size means (over seeds)")
    _print_fit_rows(comparison, _fit_rows(comparison))


def _fit_rows(comparison: FitComparison) -> list[tuple[str, str, str]]:
    ll, pl = comparison.log_linear, comparison.power_law
    return [
        ("form", "S = a log10 N + b", "S = c N^p"),
        (
            "a / p",
            f"{ll.slope:.4f} {_interval(ll.slope_ci)}",
            f"{pl.exponent:.4f} {_interval(pl.exponent_ci)}",
        ),
        (
            "b / c",
            f"{ll.intercept:.4f} {_interval(ll.intercept_ci)}",
            f"{pl.coefficient:.4f} {_interval(pl.coefficient_ci)}",
        ),
        ("R^2", f"{ll.r2:.4f}", f"{pl.r2:.4f}"),
        ("RSS", f"{ll.rss:.4g}", f"{pl.rss:.4g}"),
        ("AIC", f"{ll.aic:.2f}", f"{pl.aic:.2f}"),
        ("AICc", f"{ll.aicc:.2f}", f"{pl.aicc:.2f}"),
        ("BIC", f"{ll.bic:.2f}", f"{pl.bic:.2f}"),
    ]


def _print_fit_rows(comparison: FitComparison, rows: list[tuple[str, str, str]]) -> None:
    for label, left, right in rows:
        print(f"  {label:<14}{left:<34}{right}")
    if comparison.best is None:
        print(f"  best by AIC: undecided ({comparison.undecided})")
    else:
        print(
            f"  best by AIC: {comparison.best} (delta AIC {comparison.delta_aic:.2f}; the other "
            f"is {comparison.relative_likelihood:.3g} times as likely)"
        )


def _print_phases(replicates: Replicates, level: float, marks: dict[float, str]) -> None:
    """One line per size: a run's fit with its t-intervals, or with several seeds each
    parameter's mean over the seeds' fits with its t-interval over seeds (the seeds, not one
    fit's residuals, say how far a parameter moves)."""
    print(f"\nThree-phase fits, eq. (1) ({level:.0%} t-intervals, independent noise assumed)")
    if has_replicates(replicates):
        print("  with several seeds: mean of each seed's fit, t-interval over seeds")
    header = "".join(f"{_PARAMETER_LABELS[p]:>26}" for p in PARAMETERS)
    print(f"  {'N':>8}{header}{'S_p/S_f':>18}{'R^2':>8}")
    for n, by_seed in replicates.items():
        fits = {
            seed: fit_three_phase_or_reason(t, values, level)
            for seed, (t, values) in by_seed.items()
        }
        line = _phase_line(fits) if len(fits) == 1 else _seed_phase_line(fits, level)
        print(f"  {format_size(n):>8}{line}{marks.get(n, '')}")


def _phase_line(fits: dict[Seed, ThreePhaseFit | str]) -> str:
    """A size's one run: its fit with its t-intervals."""
    [fit] = fits.values()
    if isinstance(fit, str):
        return f"  {fit}"
    cells = "".join(f"{fit.params[p]:>9.4f} {_interval(fit.ci[p]):>16}" for p in PARAMETERS)
    ratio = f"{fit.peak_to_plateau:.3f}±{fit.peak_to_plateau_se:.3f}"
    flag = "" if np.isfinite(fit.stderr["t_p"]) else "  (t_p not identified)"
    return f"{cells}{ratio:>18}{fit.r2:>8.4f}{flag}"


def _seed_phase_line(fits: dict[Seed, ThreePhaseFit | str], level: float) -> str:
    """A size's seeds: each parameter's mean over the fitted seeds with its t-interval."""
    fitted = [fit for fit in fits.values() if not isinstance(fit, str)]
    if not fitted:
        return f"  no seed fitted: {next(iter(fits.values()))}"
    means = {p: SeedMean(tuple(fit.params[p] for fit in fitted), level) for p in PARAMETERS}
    cells = "".join(f"{means[p].mean:>9.4f} {_interval(means[p].ci):>16}" for p in PARAMETERS)
    ratio = SeedMean(tuple(fit.peak_to_plateau for fit in fitted))
    r2 = SeedMean(tuple(fit.r2 for fit in fitted)).mean
    return (
        f"{cells}{f'{ratio.mean:.3f}±{ratio.stderr:.3f}':>18}{r2:>8.4f}"
        f"  ({len(fitted)} of {len(fits)} seeds fitted)"
    )
