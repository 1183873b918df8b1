"""A study report from logged runs: Markdown beside its PNG figures, and one self-contained
HTML file with the same figures embedded.

Every number in it is computed here from the runs' JSONL files (read by
:func:`sharpmeter.paper.analysis.runs.load_runs`, analysed by
:func:`sharpmeter.paper.compare.analyse_curves`); nothing is carried over from training. Every
run found is listed: one left out of the fits (empty, diverged, no finite value, not known to
have ended normally: see :attr:`~sharpmeter.paper.analysis.runs.Run.unfinished`) says why, and
an unfinished run fitted on request is marked in every table.
Runs at one size that differ in seed are replicates: every run is listed with its seed, and each
size's row shows the mean over its seeds ± their standard error (see
:func:`sharpmeter.paper.compare.analyse_curves`).

Example::

    files = write_report(["runs/study"], out="runs/study")
    files.html          # runs/study/report.html, open it in a browser

A run is a folder holding ``sharpness.jsonl`` (what ``SharpnessCallback`` writes into the
Trainer's ``output_dir``), the JSONL file itself, or a study folder with one such folder per
size. The W&B runs found beside a JSONL file are listed with the command that uploads them.

A study with ``schedule_variants`` also trains one size under several learning-rate schedules,
in ``<study>/schedules/<schedule>/``: those runs stay out of the ladder's fits, and the report
decides schedule sensitivity on them in a section of its own (:func:`load_schedules`). They are
found under a study folder given as a path (:func:`find_schedule_runs`), or named with
``schedules=``::

    ladder = sorted(glob("runs/claims/*/seed*"))
    write_report(ladder, out="runs/claims", schedules=["runs/claims/schedules"])
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sharpmeter.measure.schema import RUN_FILE, VALUE_COLUMNS
from sharpmeter.paper.analysis import RobustFinal, final_stderr, final_value, robust_final
from sharpmeter.paper.analysis.phases import PARAMETERS, ThreePhaseFit
from sharpmeter.paper.analysis.plotting import plot_scaling_fit
from sharpmeter.paper.analysis.replicates import Curve, Replicates, Seed, SeedMean
from sharpmeter.paper.analysis.restarts import RESTART_WINDOW, restart_times
from sharpmeter.paper.analysis.runs import (
    Run,
    RunEntry,
    RunSelection,
    load_runs,
    run_entry,
    select_runs,
    setting_differences,
)
from sharpmeter.paper.analysis.scaling import FitComparison
from sharpmeter.paper.analysis.stability import final_stability
from sharpmeter.paper.compare import (
    RESTARTS,
    SPIKE_FROM,
    CurveComparison,
    StudyAnalysis,
    Verdict,
    analyse_curves,
    has_three_phases,
    multiplicity_note,
    run_label,
    schedule_verdict,
)
from sharpmeter.paper.records import Record
from sharpmeter.paper.sizes import format_size

_WANDB_URL = re.compile(r"https://wandb\.ai/\S+/runs/\w+")
SCHEDULES = "schedules"  # a study's folder of schedule runs, one sub-folder per schedule


@dataclass(frozen=True)
class RunFiles:
    """One logged run: its JSONL file and the W&B run folder beside it, if any."""

    jsonl: Path
    wandb_dir: Path | None

    @property
    def name(self) -> str:
        return self.jsonl.parent.name

    def wandb_line(self) -> str:
        """How to look at the W&B run: its URL when it went online, else `wandb sync`."""
        if self.wandb_dir is None:
            return "none"
        return _wandb_url(self.wandb_dir) or f"`wandb sync {self.wandb_dir}`"


def find_runs(paths: Iterable[str | Path]) -> list[RunFiles]:
    """JSONL files, run folders, or study folders (one run folder per size, or per size and
    seed: ``<size>/seed<k>``; a folder holding both is refused) -> runs. A study's ``schedules/``
    runs are not part of its ladder and are not collected (:func:`find_schedule_runs` finds
    them)."""
    runs = []
    for path in map(Path, paths):
        if path.is_file():
            files = [path]
        elif (path / RUN_FILE).is_file():
            files = [path / RUN_FILE]
        else:
            files = _study_runs(path)
        if not files:
            raise ValueError(f"no {RUN_FILE} at {str(path)!r} or in its sub-folders")
        runs += [RunFiles(f, _latest_wandb_run(f.parent)) for f in files]
    return runs


def _study_runs(folder: Path) -> list[Path]:
    """A study folder's run files: one per size, or one per size and seed. Both at once are
    two studies written into one folder (one without seeds, one with), which no report may
    pool or pick from unsaid: refused, naming them."""
    per_size = sorted(folder.glob(f"*/{RUN_FILE}"))
    per_seed = sorted(folder.glob(f"*/seed*/{RUN_FILE}"))
    if per_size and per_seed:
        named = [f.parent.relative_to(folder).as_posix() for f in (*per_size, *per_seed)]
        raise ValueError(
            f"{folder} holds runs of two studies, one run per size and one per seed "
            f"({', '.join(named)}): name the run folders of one"
        )
    return per_size or per_seed


def find_schedule_runs(paths: Iterable[str | Path]) -> list[RunFiles]:
    """The schedule runs of the study folders among ``paths``: ``<study>/schedules/<name>/``
    (what a study with ``schedule_variants`` trains), by name. Run folders and JSONL files
    have none."""
    runs = []
    for path in map(Path, paths):
        if path.is_dir() and not (path / RUN_FILE).is_file():
            files = sorted((path / SCHEDULES).glob(f"*/{RUN_FILE}"))
            runs += [RunFiles(f, _latest_wandb_run(f.parent)) for f in files]
    return runs


def _latest_wandb_run(folder: Path) -> Path | None:
    """The newest W&B run beside a JSONL file: an attempt that was restarted from scratch
    leaves its old run folder behind. Names carry the start time: ``[offline-]run-DATE-ID``."""
    runs = sorted(folder.glob("wandb/*run-*"), key=lambda path: path.name.split("run-")[-1])
    return runs[-1] if runs else None


def _wandb_url(folder: Path) -> str | None:
    log = folder / "logs" / "debug.log"
    match = _WANDB_URL.search(log.read_text(errors="replace")) if log.is_file() else None
    return match.group(0) if match else None


def load_analysis(
    paths: Sequence[str | Path],
    quantity: str = "critical_sharpness",
    final_fraction: float = 0.2,
    include_unfinished: bool = False,
) -> tuple[list[RunFiles], list[Record], StudyAnalysis]:
    """The run files under ``paths``, the rows of the runs fitted, and the analysis of
    ``quantity`` over them (its ``runs`` list every run found, fitted or not, and why).

    Runs that stopped before their planned ``max_steps`` are left out of the fits unless
    ``include_unfinished``. Runs at one size that differ in seed are analysed as replicates. The
    probe loss, the learning rate and the other measures' values
    (:data:`~sharpmeter.measure.schema.VALUE_COLUMNS`) go into the verdicts when the fitted runs
    log them.
    """
    files = find_runs(paths)
    selection = select_runs(
        load_runs(f.jsonl for f in files), quantity, include_unfinished, final_fraction
    )
    others = {
        name: _logged_curves(selection, name, final_fraction)
        for name in VALUE_COLUMNS
        if name != quantity
    }
    analysis = analyse_curves(
        selection.replicates(quantity),
        final_fraction,
        _logged_curves(selection, "loss", final_fraction),
        selection.entries,
        learning_rates=_logged_curves(selection, "lr"),
        other_measures={name: curves for name, curves in others.items() if curves is not None},
        quantity=quantity,
        heldout_losses=selection.heldout_losses(),
    )
    return files, selection.rows(), analysis


def _logged_curves(
    selection: RunSelection, quantity: str, final_fraction: float | None = None
) -> Replicates | None:
    """The fitted runs' curves of ``quantity`` (those with a final value, given
    ``final_fraction``), None when none of them has one."""
    try:
        return selection.replicates(quantity, final_fraction)
    except ValueError:
        return None


@dataclass(frozen=True)
class ScheduleAnalysis:
    """One size trained under several learning-rate schedules, outside the ladder: each run by
    its schedule (the name of its folder, ``schedules/<schedule>/``) with why it is left out
    of the comparison (:func:`~sharpmeter.paper.analysis.runs.select_runs`'s reasons), and the
    :func:`~sharpmeter.paper.compare.schedule_verdict` on the curves of the others."""

    files: tuple[RunFiles, ...]
    entries: dict[str, RunEntry]
    quantity: str
    verdict: Verdict

    @property
    def compared(self) -> dict[str, Run]:
        """The runs the verdict compares, by schedule."""
        return {name: entry.run for name, entry in self.entries.items() if entry.left_out is None}

    @property
    def restarts(self) -> np.ndarray:
        """The times of the restarts run's restarts (empty unless that run is compared and
        logs its rates)."""
        lr = _restarts_lr(self.entries) if RESTARTS in self.compared else None
        return restart_times(*lr) if lr is not None else np.empty(0)


def load_schedules(
    files: Sequence[RunFiles],
    quantity: str = "critical_sharpness",
    include_unfinished: bool = False,
    final_fraction: float = 0.2,
) -> ScheduleAnalysis:
    """The schedule runs in ``files``, one per file, each named by its folder, and the verdict
    on those that can be compared (the ladder's rules: not empty, not diverged, a finite value
    of ``quantity`` and one in its last ``final_fraction`` of training, finished unless
    ``include_unfinished``).

    Raises ``ValueError`` for a file holding several runs, or two schedules of one name."""
    entries: dict[str, RunEntry] = {}
    for files_of_run in files:
        runs = load_runs([files_of_run.jsonl])
        if len(runs) != 1:
            raise ValueError(
                f"{files_of_run.jsonl}: a schedule run's file holds one run, found {len(runs)}"
            )
        if files_of_run.name in entries:
            raise ValueError(
                f"two schedule runs named {files_of_run.name!r}: one folder per schedule"
            )
        entries[files_of_run.name] = run_entry(
            runs[0], quantity, include_unfinished, final_fraction
        )
    compared = {
        name: entry.run.curve(quantity) for name, entry in entries.items() if entry.left_out is None
    }
    verdict = schedule_verdict(compared, _restarts_lr(entries))
    return ScheduleAnalysis(tuple(files), entries, quantity, verdict)


def _restarts_lr(entries: Mapping[str, RunEntry]) -> Curve | None:
    """The learning rate the restarts run logged, None without that run or a logged rate."""
    entry = entries.get(RESTARTS)
    if entry is None:
        return None
    t, lr = entry.run.curve("lr")
    return (t, lr) if t.size else None


class ReportError(ValueError):
    """The runs cannot be reported (none left to fit, a record that cannot be read): raised by
    :func:`write_report`, so that a caller that trained them can tell this from its own errors."""


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    html: Path
    figures: tuple[Path, ...]


def write_report(
    paths: Sequence[str | Path],
    out: str | Path,
    quantity: str = "critical_sharpness",
    final_fraction: float = 0.2,
    title: str = "Sharpness scaling study",
    include_unfinished: bool = False,
    schedules: Sequence[str | Path] | None = None,
) -> ReportFiles:
    """Analyse the runs under ``paths`` and write ``report.md``, ``report.html`` and the
    figures ``curves.png`` and (with 3+ sizes) ``scaling.png`` into ``out``; unfinished runs
    are fitted only with ``include_unfinished`` (see :func:`load_analysis`).

    ``schedules``: one size's runs under several learning-rate schedules, as run folders, JSONL
    files, or the folder holding one run folder per schedule (a study's ``schedules/``): they
    get a section of their own, with ``schedules.png``. None finds them under the study folders
    among ``paths`` (:func:`find_schedule_runs`); ``[]``: none.

    Raises :class:`ReportError` (a ``ValueError``) when the runs cannot be analysed."""
    try:
        runs, _, analysis = load_analysis(paths, quantity, final_fraction, include_unfinished)
        found = find_schedule_runs(paths) if schedules is None else find_runs(schedules)
        schedule_runs = (
            load_schedules(found, quantity, include_unfinished, final_fraction) if found else None
        )
    except ValueError as error:
        raise ReportError(str(error)) from error
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stability = _stability_lines(analysis) if quantity == "critical_sharpness" else None
    figures = [plot_curves(analysis, out / "curves.png", quantity, stability)]
    if analysis.scaling is not None:
        figures.append(plot_scaling_fit(analysis.scaling, out / "scaling.png", f"final {quantity}"))
    schedule_figure = None
    if schedule_runs is not None and schedule_runs.compared:
        schedule_figure = plot_schedules(schedule_runs, out / "schedules.png")
        figures.append(schedule_figure)
    blocks = report_blocks(
        analysis, runs, quantity, final_fraction, title, figures, schedule_runs, schedule_figure
    )
    markdown = out / "report.md"
    markdown.write_text(render_markdown(blocks, relative_to=out))
    page = out / "report.html"
    page.write_text(render_html(blocks, title))
    return ReportFiles(markdown, page, tuple(figures))


# ---- content -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


Block = str | Table | Figure | list  # str: a paragraph or "## heading"; list: bullet items


def report_blocks(
    analysis: StudyAnalysis,
    runs: Sequence[RunFiles],
    quantity: str,
    final_fraction: float,
    title: str,
    figures: Sequence[Path],
    schedules: ScheduleAnalysis | None = None,
    schedule_figure: Path | None = None,
) -> list[Block]:
    measurements = sum(len(entry.run.rows) for entry in analysis.runs)
    fitted = len(analysis.runs) - len(analysis.left_out)
    blocks: list[Block] = [
        f"# {title}",
        f"Quantity `{quantity}`; the final value of a run is the mean over its last "
        f"{final_fraction:.0%} of training (± the standard error of that mean as if the "
        "measurements were independent: neighbours are correlated, so it is a lower bound). "
        "The robust final is the 20% trimmed mean of the same span (one spike cannot move it) "
        "with a 95% moving-block bootstrap interval that widens for correlated measurements, "
        "and the median. A step's fraction of training is the step over the run's planned "
        "max_steps (a run without one, a CSV export say: its last logged step, which stretches "
        "a run that stopped early over the whole axis; the runs table shows which). "
        f"{len(analysis.runs)} runs ({fitted} fitted), {measurements} logged measurements.",
        *compare_blocks(analysis, None if schedules is None else schedules.verdict),
        Figure(
            figures[0],
            "Measured curves with their three-phase fits (dotted) and, when the rows carry a "
            "learning rate, each size's 2 / lr (dashed, its colour), where its next step would "
            "raise the probe loss "
            "(left); the same curves "
            "divided by their final value, beside the paper's simulator at the same sizes "
            "(right, dashed)." + _unfitted_note(analysis),
        ),
        "## Runs",
        _runs_table(analysis, final_fraction),
        "## Three-phase fits (eq. 1)",
        _phase_table(analysis),
    ]
    if analysis.scaling is not None:
        blocks += ["## Scaling of the final value", _scaling_table(analysis)]
        if analysis.scaling_on_means is not None:
            blocks.append(
                "With several seeds per size, the fits on the size means decide the verdicts: "
                "one point per size, whose scatter about the law carries both the seed noise "
                "and what each size does that no seed averages away. The fits on every run's "
                "final value take a size's seeds as independent points although they share "
                "its departure from the law: their intervals are too narrow when the means "
                "stray from it more than their seeds explain."
            )
        if analysis.scaling.undecided is not None:
            blocks.append(f"AIC cannot rank the two forms: {analysis.scaling.undecided}.")
        blocks.append(Figure(figures[1], "Final value against parameters, both fits."))
    entries = list(analysis.runs)
    if schedules is not None:
        blocks += schedule_blocks(schedules, final_fraction, schedule_figure)
        runs, entries = [*runs, *schedules.files], entries + list(schedules.entries.values())
    blocks += ["## Files", _files_list(runs, entries)]
    return blocks


def _unfitted_note(analysis: StudyAnalysis) -> str:
    """Which runs the figure draws without an eq. (1) fit: a failed fit (one that did not
    converge, too) is no fit, and a curve drawn for it would pass for one."""
    unfitted = [
        run_label(n, seed, fits)
        for n, fits in analysis.phase_fits.items()
        for seed, fit in fits.items()
        if isinstance(fit, str)
    ]
    if not unfitted:
        return ""
    return (
        f" No dotted line for {', '.join(unfitted)}: eq. (1) has no fit there (the "
        "three-phase table says why)."
    )


def compare_blocks(analysis: StudyAnalysis, schedule: Verdict | None = None) -> list[Block]:
    """The verdicts, which runs they rest on, and the measured-against-simulated table;
    ``schedule``, the schedule-sensitivity verdict shown further down, counts in the note on
    multiple comparisons."""
    # The schedule claim joins the count: it is one more claim of the paper decided on this
    # study's runs, so one more chance of a decision made by chance. It has no p-value (a
    # threshold on a ratio of jumps, as the AIC and edge-of-stability rules are thresholds),
    # so Holm's correction, which ranks p-values, leaves it out as it leaves those out.
    verdicts = [*analysis.verdicts, *([] if schedule is None else [schedule])]
    note = multiplicity_note(verdicts)
    if schedule is not None:
        note += " The count includes the schedule-sensitivity verdict below."
    return [
        "## Verdicts on the paper's claims",
        [verdict.line() for verdict in analysis.verdicts],
        note,
        *_fitted_runs_note(analysis),
        *_seeds_note(analysis),
        "## Measured against the simulator (common training-fraction axis)",
        _comparison_table(analysis),
        "The simulator is calibrated on 10M-7B parameter language models, so its levels are "
        "extrapolated below 10M and belong to the paper's runs: the final values stand side by "
        "side for reference, and the shapes (each curve divided by its final value) are what "
        "is compared.",
        *_not_comparable_note(analysis),
    ]


def _not_comparable_note(analysis: StudyAnalysis) -> list[Block]:
    """The sizes where the simulator's curve has no rise-decay-plateau to compare with, each
    with why (the reason depends on the size alone: any seed's comparison says it)."""
    reasons = {
        n: comparison.not_comparable
        for n, by_seed in analysis.comparisons.items()
        for comparison in by_seed.values()
        if comparison.not_comparable is not None
    }
    if not reasons:
        return []
    listed = "; ".join(f"{_size_cell(analysis, n)}: {reason}" for n, reason in reasons.items())
    return [
        f"No shape comparison at {len(reasons)} of {len(analysis.comparisons)} sizes, where "
        "the paper's fits extrapolated give the simulator's curve no rise-decay-plateau "
        f"(its peak and the shape statistics are n/a, and it is not drawn): {listed}."
    ]


def _fitted_runs_note(analysis: StudyAnalysis) -> list[Block]:
    """Which runs found the fits leave out and why, and which unfinished ones they include."""
    if not analysis.runs:  # curves given directly: no run to account for
        return []
    fitted = len(analysis.runs) - len(analysis.left_out)
    note = f"Fitted: {fitted} of the {len(analysis.runs)} runs found."
    if analysis.left_out:
        reasons = [f"`{entry.run.name}` ({entry.left_out})" for entry in analysis.left_out]
        note += " Left out: " + "; ".join(reasons) + "."
    if analysis.unfinished:
        marks = [f"{n:,.0f} ({mark})" for n, mark in sorted(analysis.unfinished.items())]
        note += " Included as asked although unfinished: " + "; ".join(marks) + "."
    fitted_runs = [entry.run for entry in analysis.runs if entry.left_out is None]
    for difference in setting_differences(fitted_runs):
        note += f" The runs fitted together differ in {difference}."
    return [note]


def _seeds_note(analysis: StudyAnalysis) -> list[Block]:
    """How the seeds of a size enter the numbers, when a size has several."""
    if not analysis.replicated:
        return []
    counts = sorted({len(by_seed) for by_seed in analysis.replicates.values()})
    return [
        f"Seeds per size: {', '.join(map(str, counts))}. A size's value is the mean of its "
        "seeds' values ± the standard error over seeds (s / sqrt(k)); its three-phase "
        "parameters are the seed means of each run's own fit; the scaling verdicts are "
        "decided on the fits to the size means, one point per size."
    ]


def _size_cell(analysis: StudyAnalysis, n: float) -> str:
    """A fitted size, marked when its run stopped before its planned end."""
    mark = analysis.unfinished.get(n)
    return f"{n:,.0f}" + (f" ({mark})" if mark else "")


def _runs_table(analysis: StudyAnalysis, final_fraction: float) -> Table:
    """Every run found: the fitted ones with their numbers, the others with why not."""
    # a seed column once a run records one: files without seeds keep their table
    seeds = any(entry.run.seed is not None for entry in analysis.runs)
    header = (
        "parameters",
        "measurements",
        "final",
        "robust final",
        "peak",
        "peak at t",
        "not used",
        "run",
        *(("seed",) if seeds else ()),
        "steps",
        "in fits",
    )
    entries = sorted(analysis.runs, key=_size_order)
    rows = tuple(_run_row(analysis, entry, final_fraction, seeds) for entry in entries)
    return Table(header, rows)


def _size_order(entry: RunEntry) -> tuple:
    n, seed = entry.run.n_params, entry.run.seed
    return (n is None, n or 0.0, seed is None, seed or 0, entry.run.name)


def _run_row(
    analysis: StudyAnalysis, entry: RunEntry, final_fraction: float, seeds: bool
) -> tuple[str, ...]:
    run = entry.run
    seed = (("?" if run.seed is None else str(run.seed)),) if seeds else ()
    described = (str(entry.not_used), f"`{run.name}`", *seed, run.progress)
    if entry.left_out is not None:
        size = "unknown" if run.n_params is None else f"{run.n_params:,.0f}"
        return (size, str(entry.used), "n/a", "n/a", "n/a", "n/a", *described, entry.left_out)
    t, s = analysis.replicates[run.n_params][run.seed]
    stderr = final_stderr(t, s, final_fraction)
    plus_minus = f" ± {stderr:.2g}" if math.isfinite(stderr) else " (one point)"
    return (
        _size_cell(analysis, run.n_params),
        str(s.size),
        f"{final_value(t, s, final_fraction):.4g}{plus_minus}",
        _robust_cell(robust_final(t, s, final_fraction)),
        f"{s.max():.4g}",
        f"{t[np.argmax(s)]:.2f}",
        *described,
        "yes",
    )


def _robust_cell(robust: RobustFinal) -> str:
    """``1.02e+03 [981, 1.06e+03] (median 1.01e+03)``: the trimmed mean, its interval, the
    median; the trimmed mean alone when the tail is too short for an interval."""
    lo, hi = robust.ci
    interval = f" [{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) and math.isfinite(hi) else ""
    return f"{robust.trimmed_mean:.4g}{interval} (median {robust.median:.4g})"


def _seeds_header(analysis: StudyAnalysis) -> tuple[str, ...]:
    return ("seeds",) if analysis.replicated else ()


def _seeds_cell(analysis: StudyAnalysis, n: float) -> tuple[str, ...]:
    return (str(len(analysis.replicates[n])),) if analysis.replicated else ()


def _mean_of(results: Iterable, attribute: str) -> SeedMean:
    """The seed mean of ``attribute`` of each seed's result."""
    return SeedMean(tuple(getattr(result, attribute) for result in results))


def _seed_cell(mean: SeedMean, spec: str) -> str:
    """``1.02 ± 0.013``: the mean over seeds and its standard error; the value alone for one
    seed."""
    spread = f" ± {mean.stderr:.2g}" if mean.n_seeds > 1 else ""
    return f"{mean.mean:{spec}}{spread}"


def _comparison_table(analysis: StudyAnalysis) -> Table:
    rows = tuple(
        _comparison_row(analysis, n, list(by_seed.values()))
        for n, by_seed in analysis.comparisons.items()
    )
    header = (
        "parameters",
        *_seeds_header(analysis),
        "final (measured / simulated)",
        "peak/final (measured / simulated)",
        "peak at t (measured / simulated)",
        "shape RMSE",
        "shape correlation",
    )
    return Table(header, rows)


def _comparison_row(
    analysis: StudyAnalysis, n: float, runs: list[CurveComparison]
) -> tuple[str, ...]:
    """A size's measured values (mean ± standard error over its seeds) beside the simulator's,
    which has no seed to vary: any run's simulated values are the size's."""
    simulated = runs[0]
    shaped = simulated.not_comparable is None  # else: n/a, with why below the table

    def measured(attribute: str, spec: str) -> str:
        return _seed_cell(_mean_of(runs, attribute), spec)

    def beside(value: float, spec: str) -> str:
        return f"{value:{spec}}" if shaped else "n/a"

    return (
        _size_cell(analysis, n),
        *_seeds_cell(analysis, n),
        f"{measured('measured_final', '.4g')} / {simulated.simulated_final:.4g}",
        measured("measured_peak_ratio", ".3g")
        + " / "
        + beside(simulated.simulated_peak_ratio, ".3g"),
        measured("measured_peak_t", ".2f") + " / " + beside(simulated.simulated_peak_t, ".2f"),
        measured("shape_rmse", ".3g") if shaped else "n/a",
        measured("shape_correlation", ".3f") if shaped else "n/a",
    )


def _phase_table(analysis: StudyAnalysis) -> Table:
    rows = []
    for n, fits in analysis.phase_fits.items():
        size = (_size_cell(analysis, n), *_seeds_cell(analysis, n))
        cells = _phase_cells(fits) if len(fits) == 1 else _seed_phase_cells(fits)
        found = [
            has_three_phases(fit, analysis.replicates[n][seed][0]) for seed, fit in fits.items()
        ]
        if len(fits) == 1:
            answer = "yes" if found[0] else "no"
        else:
            failed = sum(isinstance(fit, str) for fit in fits.values())
            answer = f"{sum(found)} of {len(fits)}" + (f" ({failed} failed)" if failed else "")
        rows.append((*size, *cells, answer))
    header = (
        "parameters",
        *_seeds_header(analysis),
        "S_p",
        "S_f",
        "t_p",
        "lambda",
        "R^2",
        "three phases",
    )
    return Table(header, tuple(rows))


def _phase_cells(fits: dict[Seed, ThreePhaseFit | str]) -> tuple[str, ...]:
    """One run's fit: each parameter ± its standard error from the fit."""
    [fit] = fits.values()
    if isinstance(fit, str):
        return (fit, "", "", "", "")
    cells = [_with_stderr(getattr(fit, p), fit.stderr[p]) for p in PARAMETERS]
    return (*cells, f"{fit.r2:.3f}")


def _seed_phase_cells(fits: dict[Seed, ThreePhaseFit | str]) -> tuple[str, ...]:
    """Several seeds' fits: each parameter's mean over the fitted seeds ± its standard error
    over them (the seeds, not one fit's residuals, say how far it moves)."""
    fitted = [fit for fit in fits.values() if not isinstance(fit, str)]
    if not fitted:
        return (f"no seed fitted: {next(iter(fits.values()))}", "", "", "", "")
    cells = [_seed_cell(_mean_of(fitted, p), ".4g") for p in PARAMETERS]
    return (*cells, _seed_cell(_mean_of(fitted, "r2"), ".3f"))


def _with_stderr(value: float, stderr: float) -> str:
    # A fit pinned at a bound of its parameters has a singular covariance: no error to show.
    shown = f"{stderr:.2g}" if math.isfinite(stderr) and stderr > 0 else "n/a"
    return f"{value:.4g} ± {shown}"


def _scaling_table(analysis: StudyAnalysis) -> Table:
    """Both forms; with replicates, fitted on every run's final value and on the size means."""
    scaling, on_means = analysis.scaling, analysis.scaling_on_means
    if on_means is None:
        rows = _scaling_rows(scaling)
    else:
        sizes = on_means.log_linear.n
        rows = _scaling_rows(scaling, f", all {scaling.log_linear.n} runs")
        rows += _scaling_rows(on_means, f", {sizes} size means")
    header = (
        "form",
        "slope / exponent",
        f"{scaling.log_linear.level:.0%} interval",
        "R^2",
        "AIC",
        "BIC",
    )
    return Table(header, tuple(rows))


def _scaling_rows(comparison: FitComparison, points: str = "") -> list[tuple[str, ...]]:
    rows = []
    for name, fit in (
        ("log-linear S = a log10 N + b", comparison.log_linear),
        ("power law S = c N^k", comparison.power_law),
    ):
        lo, hi = fit.slope_ci
        rows.append(
            (
                name + points,
                f"{fit.slope:.4g}",
                f"[{lo:.3g}, {hi:.3g}]",
                f"{fit.r2:.4f}",
                f"{fit.aic:.2f}",
                f"{fit.bic:.2f}",
            )
        )
    return rows


def schedule_blocks(
    schedules: ScheduleAnalysis, final_fraction: float, figure: Path | None
) -> list[Block]:
    """The schedule-sensitivity section: the verdict, the runs it compares, their curves."""
    blocks: list[Block] = [
        "## Schedule sensitivity",
        "One size trained once more under each learning-rate schedule (each run named by its "
        "folder, outside the ladder's fits): does cosine with restarts make sharpness spike "
        "where cosine and linear decay smoothly? At each restart (where the logged learning "
        f"rate jumps up) the largest rise and fall of ln S within {RESTART_WINDOW} measurements, "
        "from the median of the measurements before, set against the same statistics away "
        f"from the restarts past t = {SPIKE_FROM:g} (the rise of training left out) and "
        "against the other schedules at the same time.",
        [schedules.verdict.line()],
        _schedule_table(schedules, final_fraction),
    ]
    if figure is not None:
        lr = ", and its 2 / lr (dashed, same colour) where the rows carry a learning rate,"
        lr = lr if schedules.quantity == "critical_sharpness" else ""
        blocks.append(
            Figure(
                figure,
                f"Measured {schedules.quantity} of each schedule's run{lr} against the fraction "
                f"of training; dotted: the restarts; shaded: t < {SPIKE_FROM:g}, the rise, "
                "left out of the noise's distribution.",
            )
        )
    return blocks


def _schedule_table(schedules: ScheduleAnalysis, final_fraction: float) -> Table:
    header = (
        "schedule",
        "parameters",
        "measurements",
        "final",
        "S lr / 2 (final)",
        "run",
        "steps",
        "compared",
    )
    rows = []
    for name, entry in schedules.entries.items():
        run = entry.run
        size = "unknown" if run.n_params is None else f"{run.n_params:,.0f}"
        final, ratio = "n/a", "n/a"
        if entry.left_out is None:
            t, s = run.curve(schedules.quantity)
            final = f"{final_value(t, s, final_fraction):.4g}"
            ratio = _final_ratio_cell(t, s, run.curve("lr"), final_fraction)
        answer = entry.left_out or "yes"
        rows.append(
            (name, size, str(entry.used), final, ratio, f"`{run.name}`", run.progress, answer)
        )
    return Table(header, tuple(rows))


def _final_ratio_cell(t: np.ndarray, s: np.ndarray, lr: Curve, final_fraction: float) -> str:
    """The stability ratio over the run's last ``final_fraction``, robustly (as the
    edge-of-stability verdict takes it), or why there is none."""
    try:
        return _robust_cell(final_stability(t, s, *lr, final_fraction))
    except ValueError:  # no point with both a sharpness and a positive learning rate
        return "no lr logged"


def _files_list(runs: Sequence[RunFiles], entries: Sequence[RunEntry]) -> list[str]:
    rows = [row for entry in entries for row in entry.run.rows]
    failed = sum(1 for row in rows if row.get("status") not in (None, "ok"))
    items = [f"`{run.jsonl}` ({run.name}); W&B: {run.wandb_line()}" for run in runs]
    items.append(f"measurements with a status other than ok: {failed}")
    return items


# ---- figures -------------------------------------------------------------------------------


def _stability_lines(analysis: StudyAnalysis) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Each size's ``2 / lr`` (from its first fitted run: a size's seeds share a schedule), in
    the order of ``analysis.comparisons``: sizes may train at their own rates, as the paper's
    do, and one size's line drawn for all puts the others' edge in the wrong place."""
    first: dict[float, Run] = {}
    for entry in analysis.runs:
        if entry.left_out is None:
            first.setdefault(entry.run.n_params, entry.run)
    return [stability_line(first[n]) if n in first else None for n in analysis.comparisons]


def stability_line(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    """``2 / lr`` along one run (a study trains every size on one schedule), on its planned
    training axis: where critical sharpness meets it, the next step raises the probe loss.
    None when no positive learning rate was logged (measured without an optimizer)."""
    t, lr = run.curve("lr")
    keep = lr > 0
    if not keep.any():
        return None
    return t[keep], 2 / lr[keep]


def plot_curves(
    analysis: StudyAnalysis,
    path: Path,
    quantity: str,
    stability: Sequence[tuple[np.ndarray, np.ndarray] | None] | None = None,
) -> Path:
    """Measured curves with their three-phase fits (and each size's ``2 / lr``, in the order
    of ``analysis.comparisons``, when given), and normalised shapes beside the simulator's."""
    from matplotlib.figure import Figure as MplFigure

    figure = MplFigure(figsize=(11, 4), layout="constrained")
    measured, shapes = figure.subplots(1, 2)
    colours = _colours(len(analysis.comparisons))
    # a size's seeds share its colour, its one legend entry and its one simulated curve
    for colour, (n, by_seed) in zip(colours, analysis.comparisons.items(), strict=True):
        for index, (seed, comparison) in enumerate(by_seed.items()):
            t, s = analysis.replicates[n][seed]
            measured.plot(t, s, color=colour, label=None if index else format_size(n))
            fit = analysis.phase_fits[n][seed]
            if not isinstance(fit, str):
                measured.plot(t, fit.predict(t), color=colour, linestyle=":", linewidth=1)
            shapes.plot(comparison.t, comparison.measured, color=colour)
            if not index and comparison.not_comparable is None:
                shapes.plot(comparison.t, comparison.simulated, color=colour, linestyle="--")
    measured.set(
        title=f"measured {quantity} (dotted: eq. 1 fit)",
        xlabel="fraction of training",
        ylabel=quantity,
    )
    shapes.set(
        title="S / S_final: measured (solid), simulator (dashed)",
        xlabel="fraction of training",
        ylabel="S / S_final",
    )
    _value_scale(measured)
    _value_scale(shapes)
    if stability is not None:
        _plot_stability_lines(measured, colours, stability)
    measured.legend(title="parameters", fontsize=8)
    for axes in (measured, shapes):
        _plain_log_labels(axes)
    figure.savefig(path, dpi=120)
    return path


def plot_schedules(schedules: ScheduleAnalysis, path: Path) -> Path:
    """Each compared schedule's curve against the fraction of training, with its ``2 / lr``
    (dashed) when the quantity is critical sharpness and the rows carry a learning rate."""
    from matplotlib.figure import Figure as MplFigure

    figure = MplFigure(figsize=(7, 4), layout="constrained")
    axes = figure.subplots()
    axes.set(
        title=f"{schedules.quantity} by learning-rate schedule",
        xlabel="fraction of training",
        ylabel=schedules.quantity,
        xlim=(0, 1),
    )
    axes.axvspan(0, SPIKE_FROM, color="0.93", zorder=0)
    runs = schedules.compared
    colours = _colours(len(runs))
    for colour, (name, run) in zip(colours, runs.items(), strict=True):
        axes.plot(*run.curve(schedules.quantity), color=colour, label=name)
    _value_scale(axes)
    if schedules.quantity == "critical_sharpness":
        _plot_stability_lines(axes, colours, [stability_line(run) for run in runs.values()])
    restarts = schedules.restarts
    for restart in restarts:
        axes.axvline(restart, color="0.5", linestyle=":", linewidth=1)
    if restarts.size:
        axes.plot([], [], color="0.5", linestyle=":", linewidth=1, label="restart")
    axes.legend(title="schedule", fontsize=8)
    _plain_log_labels(axes)
    figure.savefig(path, dpi=120)
    return path


def _value_scale(axes) -> None:
    """A log axis for the values plotted so far, or a symmetric log axis when one of them is
    not positive (a Hessian trace on a training batch can be negative): a log axis would drop
    those points without a word."""
    values = np.concatenate([line.get_ydata() for line in axes.get_lines()] or [np.ones(1)])
    values = values[np.isfinite(values)]
    if values.size == 0 or (values > 0).all():
        axes.set_yscale("log")
        return
    nonzero = np.abs(values[values != 0])
    axes.set_yscale("symlog", linthresh=float(np.median(nonzero)) / 10 if nonzero.size else 1.0)


def _plain_log_labels(axes) -> None:
    """Plain numbers on a log axis, not 2 x 10^0."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes.yaxis.set_major_formatter(plain)
    if axes.get_yscale() != "log":
        return
    low, high = axes.get_ylim()
    # minor labels only when the axis spans less than a decade; else they pile up
    axes.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())


def _plot_stability_lines(
    axes: Any, colours: Sequence, lines: Sequence[tuple[np.ndarray, np.ndarray] | None]
) -> None:
    """Each curve's ``2 / lr`` dashed in its colour, with one legend entry for them all."""
    if all(line is None for line in lines):
        return
    low, high = axes.get_ylim()
    for colour, line in zip(colours, lines, strict=True):
        if line is not None:
            axes.plot(*line, color=colour, linestyle="--", linewidth=1)
    axes.plot([], [], color="grey", linestyle="--", linewidth=1, label="2 / lr")
    axes.set_ylim(low, 3 * high)  # 2 / lr runs off as a schedule decays: keep S in view


def _colours(count: int) -> list:
    from matplotlib import colormaps

    return list(colormaps["viridis"](np.linspace(0, 0.9, count)))


# ---- rendering -----------------------------------------------------------------------------


def render_markdown(blocks: Sequence[Block], relative_to: Path) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Table):
            parts.append(_markdown_table(block))
        elif isinstance(block, Figure):
            link = (
                block.path.relative_to(relative_to)
                if block.path.is_relative_to(relative_to)
                else block.path
            )
            parts.append(f"![{block.path.stem}]({link})\n\n*{block.caption}*")
        elif isinstance(block, list):
            parts.append("\n".join(f"- {item}" for item in block))
        else:
            parts.append(block)
    return "\n\n".join(parts) + "\n"


def _markdown_table(table: Table) -> str:
    lines = ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines)


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
    "text-align:right}th{background:#f4f4f4}img{max-width:100%}code{background:#f4f4f4}"
)


def render_html(blocks: Sequence[Block], title: str) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{_STYLE}</style></head><body>"
    ]
    for block in blocks:
        if isinstance(block, Table):
            head = "".join(f"<th>{_inline(cell)}</th>" for cell in block.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row) + "</tr>"
                for row in block.rows
            )
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif isinstance(block, Figure):
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            parts.append(
                f"<figure><img src='data:image/png;base64,{data}' "
                f"alt='{html.escape(block.caption)}'><figcaption>"
                f"{_inline(block.caption)}</figcaption></figure>"
            )
        elif isinstance(block, list):
            parts.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block) + "</ul>")
        elif block.startswith("#"):
            level = len(block) - len(block.lstrip("#"))
            parts.append(f"<h{level}>{_inline(block[level:].strip())}</h{level}>")
        else:
            parts.append(f"<p>{_inline(block)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _inline(text: str) -> str:
    """The two Markdown marks the report uses, ``**bold**`` and ```code```, as HTML."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return re.sub(r"(https://\S+)", r"<a href='\1'>\1</a>", text)
