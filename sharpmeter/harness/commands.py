"""``sharpmeter study``, ``sharpmeter compare`` and ``sharpmeter report``.

Example (shell):
    sharpmeter study configs/study_cpu.yaml --max_steps 300       # train the ladder, report
    sharpmeter compare runs/study                                  # measured vs simulated
    sharpmeter report runs/study/small runs/study/large --out runs/pair
    sharpmeter report runs/claims                                  # ladder and schedules/
    sharpmeter report runs/claims/*/seed* --schedules runs/claims/schedules --out runs/claims
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sharpmeter.measure.schema import RUN_FILE

RUNS_HELP = f"run folders (holding {RUN_FILE}), JSONL files, or a study folder"
SCHEDULES_HELP = (
    "one size's runs under several learning-rate schedules, for the schedule-sensitivity "
    "section: run folders (each named after its schedule), or the folder holding one per "
    "schedule (a study's schedules/); default: the schedules/ of a study folder among the runs"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    study = subparsers.add_parser(
        "study",
        help="train a ladder of GPT-2 sizes with the sharpness callback, then report",
        description=(
            "Train every size of a study config (YAML; any key can be overridden as "
            "--key value) into <output_dir>/<size> (<size>/seed<k> with several seeds), "
            "skipping runs already trained, then "
            "write report.md, report.html and figures into output_dir."
        ),
    )
    study.add_argument("config", help="study config, e.g. configs/study_cpu.yaml")
    study.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value ...")
    study.set_defaults(handler=run_study_command)

    for name, handler, text in (
        ("compare", run_compare, "measured curves against the simulator, verdicts per claim"),
        ("report", run_report, "Markdown + HTML report with figures from logged runs"),
    ):
        parser = subparsers.add_parser(name, help=text, description=text)
        parser.add_argument("runs", nargs="+", type=Path, help=RUNS_HELP)
        parser.add_argument("--quantity", default="critical_sharpness")
        parser.add_argument(
            "--final-fraction", type=float, default=0.2, help="last share averaged as final"
        )
        parser.add_argument("--out", type=Path, default=None, help="folder for files")
        parser.add_argument(
            "--include-unfinished",
            action="store_true",
            help=(
                "also fit runs not known to have ended normally (metadata finished: false, or "
                "an older file that cannot tell), marked as such"
            ),
        )
        if name == "report":
            parser.add_argument("--schedules", nargs="+", type=Path, help=SCHEDULES_HELP)
        parser.set_defaults(handler=handler)


def run_study_command(args: argparse.Namespace) -> int:
    from sharpmeter.harness.data import CorpusError
    from sharpmeter.harness.runlock import RunLockedError
    from sharpmeter.harness.study import parse_study, run_study
    from sharpmeter.harness.train import DoneMarkerError
    from sharpmeter.paper.report import ReportError

    try:
        config = parse_study([args.config, *args.overrides])
    except ValueError as error:  # a bad config: one line, before any training
        raise SystemExit(f"sharpmeter study: error: {error}") from None
    try:
        files = run_study(config)
    # The corpus is read, and the output folder taken, before any training: one line too; so
    # is a run that trained but could not be marked, which the message says how to recover.
    except (CorpusError, RunLockedError, DoneMarkerError) as error:
        raise SystemExit(f"sharpmeter study: error: {error}") from None
    except ReportError as error:  # e.g. every size diverged: the trained runs are not lost
        out = config.training.output_dir
        raise SystemExit(
            f"sharpmeter study: error: the runs are trained and kept in {out}, but cannot be "
            f"reported: {error}; `sharpmeter report {out}` reports them again (with "
            "--include-unfinished, another --quantity, ...)"
        ) from None
    if files is not None:
        print(files.markdown.read_text())
        print(f"report: {files.html}\n        {files.markdown}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from sharpmeter.paper.report import compare_blocks, load_analysis, plot_curves, render_markdown

    try:
        _, _, analysis = load_analysis(
            args.runs, args.quantity, args.final_fraction, args.include_unfinished
        )
    except ValueError as error:  # no runs there, no such quantity in them
        raise SystemExit(f"sharpmeter compare: error: {error}") from None
    print(render_markdown(compare_blocks(analysis), relative_to=Path.cwd()))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"figure: {plot_curves(analysis, args.out / 'compare.png', args.quantity)}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from sharpmeter.paper.report import write_report

    out = args.out or _default_out(args.runs)
    try:
        files = write_report(
            args.runs,
            out,
            args.quantity,
            args.final_fraction,
            include_unfinished=args.include_unfinished,
            schedules=args.schedules,
        )
    except ValueError as error:
        raise SystemExit(f"sharpmeter report: error: {error}") from None
    print(f"report: {files.html}\n        {files.markdown}")
    return 0


def _default_out(runs: list[Path]) -> Path:
    first = runs[0]
    return first.parent if first.is_file() else first
