"""``sharpmeter simulate``: write the paper's synthetic curves, tables and Figure 1.

Example (shell):
    sharpmeter simulate --out runs/simulate --plot
    sharpmeter simulate --scales 10M,125M,70B --checkpoints 400 --seed 7 --format csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sharpmeter.paper.records import write_records
from sharpmeter.paper.sizes import parse_size

from .presets import PRESETS
from .study import simulate_study


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` subcommand to the top-level ``sharpmeter`` parser."""
    parser = subparsers.add_parser(
        "simulate",
        help="simulate the paper's sharpness, loss and gradient-norm curves and its tables",
        description=(
            "Simulate one run per model size and write curves.{jsonl,csv} (long rows: source, "
            "n_params, step, fraction, quantity, value), tables.md (Tables 1-3) and, with "
            "--plot, figure1.png. The defaults reproduce the paper's study."
        ),
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument(
        "--scales",
        type=_scales,
        default=None,
        help="comma-separated sizes, e.g. 10M,125M,70B (default: the preset's six)",
    )
    parser.add_argument(
        "--checkpoints", type=int, default=None, help="checkpoints per run (default: 200)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: 42)")
    parser.add_argument("--no-noise", action="store_true", help="drop every noise term")
    parser.add_argument(
        "--no-oscillation", action="store_true", help="drop the edge-of-stability oscillation"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/simulate"), help="output directory")
    parser.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="curve file")
    parser.add_argument("--plot", action="store_true", help="also write figure1.png")
    parser.set_defaults(handler=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    """Handler of ``sharpmeter simulate``: returns 0, or 2 with a one-line message on bad input
    (an ``--out`` that cannot be a folder included)."""
    try:
        study = simulate_study(
            args.scales,
            n_checkpoints=args.checkpoints,
            seed=args.seed,
            noise=not args.no_noise,
            oscillation=not args.no_oscillation,
            preset=args.preset,
        )
    except ValueError as error:
        print(f"sharpmeter simulate: error: {error}", file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file there, a read-only or virtual file system
        reason = error.strerror or str(error)
        print(
            f"sharpmeter simulate: error: --out {args.out} cannot be made a folder ({reason})",
            file=sys.stderr,
        )
        return 2
    curves = args.out / f"curves.{args.format}"
    write_records(curves, study.to_records())
    tables = args.out / "tables.md"
    tables.write_text(study.to_markdown(), encoding="utf-8")
    written = [curves, tables]
    if args.plot:
        from .plot import plot_sharpness_curves  # matplotlib only when a figure is asked for

        written.append(args.out / "figure1.png")
        plot_sharpness_curves(study.runs, written[-1])
    print(study.to_markdown())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _scales(text: str) -> list[float]:
    try:
        return [parse_size(part) for part in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
