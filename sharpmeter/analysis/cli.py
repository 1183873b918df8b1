"""``sharpmeter fit``: scaling-law and three-phase fits of logged or simulated curves.

Each run's final value is the mean of its last ``--final-fraction`` of checkpoints (default 10%,
as the paper's Table 1). Every run found is listed first; one left out of the fits says why
(empty, diverged, no finite value, or unfinished unless ``--include-unfinished``). Example (shell):
    sharpmeter fit runs/simulate/curves.jsonl --plot
    sharpmeter fit logs/*.jsonl --quantity hessian_trace --bootstrap 2000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from sharpmeter.analysis.curves import Curves, tail_mean
from sharpmeter.analysis.phases import PARAMETERS, fit_three_phase
from sharpmeter.analysis.runs import RunSelection, load_runs, select_runs
from sharpmeter.analysis.scaling import (
    FitComparison,
    bootstrap_fit,
    compare_fits,
    extrapolation_error,
)
from sharpmeter.sizes import format_size

_MIN_SCALES = 3
_PARAMETER_LABELS = {"s_p": "S_p", "s_f": "S_f", "t_p": "t_p", "lam": "lambda"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``fit`` subcommand to the top-level ``sharpmeter`` parser."""
    parser = subparsers.add_parser(
        "fit",
        help="fit scaling laws and the three-phase model to measured or simulated curves",
        description=(
            "Read records (JSONL/CSV, long rows from the simulator or wide rows from the "
            "training callback), take one curve per model size, and print the log-linear and "
            "power-law fits of the final values with intervals, their AIC comparison, the "
            "extrapolation to the largest size, and the three-phase fit (eq. 1) of each run."
        ),
    )
    parser.add_argument("files", nargs="+", type=Path, help="record files (.jsonl or .csv)")
    parser.add_argument(
        "--quantity",
        default=None,
        help="quantity to fit (default: sharpness for long rows, critical_sharpness for wide)",
    )
    parser.add_argument(
        "--final-fraction",
        type=float,
        default=0.1,
        help="final value = mean of this last fraction of checkpoints (default: 0.1)",
    )
    parser.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument(
        "--include-unfinished",
        action="store_true",
        help="also fit runs that stopped before their planned max_steps (marked unfinished)",
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
        selection = select_runs(load_runs(args.files), args.quantity, args.include_unfinished)
        curves = selection.curves(args.quantity)
        finals = {n: tail_mean(values, args.final_fraction) for n, (_, values) in curves.items()}
        comparison = None
        if len(curves) >= _MIN_SCALES:
            comparison = compare_fits(list(finals), list(finals.values()), args.level)
    except (OSError, ValueError) as error:
        print(f"sharpmeter fit: error: {error}", file=sys.stderr)
        return 2

    quantity = args.quantity or "sharpness"
    marks = _unfinished_marks(selection)
    _print_runs(selection)
    _print_finals(curves, finals, quantity, args.final_fraction, marks)
    if comparison is None:
        print(f"\nscaling fits need at least {_MIN_SCALES} model sizes; got {len(curves)}")
    else:
        _print_scaling(comparison, args.bootstrap)
    _print_phases(curves, args.level, marks)

    if args.plot:
        if comparison is None:
            print("sharpmeter fit: error: --plot needs a scaling fit", file=sys.stderr)
            return 2
        from sharpmeter.analysis.plotting import plot_scaling_fit  # matplotlib only on demand

        print(f"\nwrote {plot_scaling_fit(comparison, args.output, f'final {quantity}')}")
    return 0


def _interval(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _unfinished_marks(selection: RunSelection) -> dict[float, str]:
    """``"  (unfinished: step 60 of 150)"`` for each fitted size whose run stopped early."""
    return {run.n_params: f"  ({run.unfinished})" for run in selection.fitted if run.unfinished}


def _print_runs(selection: RunSelection) -> None:
    print(f"Runs found: {len(selection.entries)}, fitted: {len(selection.fitted)}")
    print(f"  {'N':>8}  {'finite':>6}  {'not finite':>10}  {'steps':<16}  run")
    for entry in selection.entries:
        run = entry.run
        size = "?" if run.n_params is None else format_size(run.n_params)
        state = f"left out: {entry.left_out}" if entry.left_out else "fitted"
        print(
            f"  {size:>8}  {entry.finite:>6}  {entry.not_finite:>10}  {run.progress:<16}  "
            f"{run.label}: {state}"
        )
    print()


def _print_finals(
    curves: Curves, finals: dict[float, float], quantity: str, frac: float, marks: dict[float, str]
) -> None:
    print(f"Final {quantity} (mean of the last {frac:.0%} of checkpoints)")
    print(f"  {'N':>8}  {'points':>6}  {'final':>8}")
    for n, (t, _) in curves.items():
        print(f"  {format_size(n):>8}  {t.size:>6}  {finals[n]:>8.4f}{marks.get(n, '')}")


def _print_scaling(comparison: FitComparison, n_bootstrap: int) -> None:
    ll, pl = comparison.log_linear, comparison.power_law
    print(f"\nScaling fits ({ll.level:.0%} t-intervals; R^2, RSS, AIC, BIC on the original scale)")
    rows = [
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
    if n_bootstrap:
        boot_ll, boot_pl = bootstrap_fit(ll, n_bootstrap), bootstrap_fit(pl, n_bootstrap)
        rows.append(("a / p boot", _interval(boot_ll.slope_ci), _interval(boot_pl.slope_ci)))
        rows.append(
            ("b / ln c boot", _interval(boot_ll.intercept_ci), _interval(boot_pl.intercept_ci))
        )
    for label, left, right in rows:
        print(f"  {label:<14}{left:<34}{right}")
    if comparison.best is None:
        print(f"  best by AIC: undecided ({comparison.undecided})")
    else:
        print(
            f"  best by AIC: {comparison.best} (delta AIC {comparison.delta_aic:.2f}; the other "
            f"is {comparison.relative_likelihood:.3g} times as likely)"
        )
    if ll.n >= 4:
        for form in ("log-linear", "power-law"):
            e = extrapolation_error(ll.n_params, ll.values, form=form, level=ll.level)
            print(
                f"  {form} fitted without {format_size(e.n_target[0])}: predicts "
                f"{e.predicted[0]:.4f} {_interval((e.lower[0], e.upper[0]))}, actual "
                f"{e.actual[0]:.4f}, error {e.rel_error[0]:+.2%}"
            )


def _print_phases(curves: Curves, level: float, marks: dict[float, str]) -> None:
    print(f"\nThree-phase fits, eq. (1) ({level:.0%} t-intervals, independent noise assumed)")
    header = "".join(f"{_PARAMETER_LABELS[p]:>26}" for p in PARAMETERS)
    print(f"  {'N':>8}{header}{'S_p/S_f':>18}{'R^2':>8}")
    for n, (t, values) in curves.items():
        try:
            fit = fit_three_phase(t, values, level)
        except ValueError as error:
            print(f"  {format_size(n):>8}  not fitted: {error}{marks.get(n, '')}")
            continue
        cells = "".join(f"{fit.params[p]:>9.4f} {_interval(fit.ci[p]):>16}" for p in PARAMETERS)
        ratio = f"{fit.peak_to_plateau:.3f}±{fit.peak_to_plateau_se:.3f}"
        flag = "" if fit.converged and np.isfinite(fit.stderr["t_p"]) else "  (not converged)"
        print(f"  {format_size(n):>8}{cells}{ratio:>18}{fit.r2:>8.4f}{flag}{marks.get(n, '')}")
