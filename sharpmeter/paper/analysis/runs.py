"""Runs as ``fit``, ``compare`` and ``report`` see them: every run in the record files, each
measurement once, with its planned length and why it is or is not fitted.

All three read runs with :func:`load_runs` and choose what to fit with :func:`select_runs`, so
they agree on:

* a step logged twice (a resumed run that logged it again, a file appended twice) keeps its last
  write, with a :class:`~sharpmeter.paper.records.RecordWarning` naming the file and the lines: a
  repeated tail would otherwise shrink a standard error, a conflicting row move a final value,
  both unseen;
* a step's fraction of training is ``step / max_steps``, the run's planned length from the
  ``<name>.meta.json`` beside its file (older files lack it: then the last logged step, and the
  run says so), so a run killed at step 60 of 150 ends at ``t = 0.4`` instead of being stretched
  over the whole axis;
* every run found is listed, and one left out of the fits says why: an empty file, a diverged
  probe loss, no finite value, or (unless asked for) a run that did not end normally: its
  metadata's ``finished`` is false (it crashed or was killed), or, in an older file without
  that record, its steps cannot show that it finished (see :attr:`Run.unfinished`);
* a run's seed is the ``seed`` of its rows, else of its metadata (what the training callback
  records): runs at one size that differ in seed are replicates, two at one size with the same
  seed or none are refused, naming them
  (:func:`~sharpmeter.paper.analysis.replicates.group_replicates`).

Example::

    selection = select_runs(load_runs(["runs/a/sharpness.jsonl", "runs/b/sharpness.jsonl"]))
    for entry in selection.entries:
        print(entry.run.name, entry.run.seed, entry.run.progress, entry.left_out or "fitted")
    replicates = selection.replicates("critical_sharpness")  # {n_params: {seed: (t, values)}}
"""

from __future__ import annotations

import json
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sharpmeter.measure.schema import DONE_FILE, FINISHED_KEY, HELDOUT_FILE, META_SUFFIX, NONFINITE
from sharpmeter.paper.analysis.curves import (
    finite_number,
    is_long,
    logged_value,
    logs_quantity,
    no_final_reason,
    quantity_name,
    row_problem,
    run_curve,
    run_key,
    run_name,
    seed_of,
)
from sharpmeter.paper.analysis.replicates import Replicates, group_replicates, seed_text
from sharpmeter.paper.records import Record, RecordWarning, read_numbered_records

_REPEATS_SHOWN = 5


@dataclass(frozen=True)
class Run:
    """One run's rows, one per measurement (the last written of a repeated step), and its plan.

    ``planned_steps`` is ``max_steps`` from the metadata beside the file (None for files
    written before it was recorded, and for simulated curves, which carry their own fraction);
    ``finished`` is the metadata's record of a normal end (None for files written before it
    was recorded); ``finished_marker`` says that ``sharpmeter train`` saw the training end;
    ``seed`` is the rows' ``seed``, else the metadata's (None when neither has one);
    ``heldout_loss`` the loss of the blocks the harness held out of training, at its end
    (:data:`~sharpmeter.measure.schema.HELDOUT_FILE`; None without one).
    """

    source: Path
    name: str
    n_params: float | None
    rows: tuple[Record, ...] = field(repr=False)
    planned_steps: int | None = None
    finished_marker: bool = False
    seed: int | None = None
    finished: bool | None = None
    heldout_loss: float | None = None
    dtype: str | None = None
    model_class: str | None = None

    @property
    def probes(self) -> frozenset[str]:
        """The probe definitions its rows were measured on (``fixed``, ``train``; none for
        rows that do not say, as simulated ones)."""
        return frozenset(str(row["probe"]) for row in self.rows if row.get("probe") is not None)

    @property
    def label(self) -> str:
        """The run and its file: unique among the runs found, but for the seeds of one run
        that a file holds side by side (its rows carry their ``seed``)."""
        return f"{self.name} ({self.source})"

    @property
    def steps(self) -> list[float]:
        """The steps the run logged, in order, each once."""
        return sorted({step for row in self.rows if (step := _step(row)) is not None})

    @property
    def last_step(self) -> float | None:
        steps = self.steps
        return steps[-1] if steps else None

    @property
    def progress(self) -> str:
        """How far the run got, and against what: ``60 of 150``, or the last step alone when
        the plan is unknown (the fraction of training is then ``step / last step``)."""
        last = self.last_step
        if last is None:
            return "no step logged"
        if self.planned_steps is None:
            return f"{_step_text(last)} (no planned max_steps: t = step / last step)"
        return f"{_step_text(last)} of {self.planned_steps}"

    @property
    def unfinished(self) -> str | None:
        """Why the run may not have reached its end, else None.

        The writer's record decides: ``unfinished: step 60 of 150`` when the metadata says
        ``"finished": false`` (the run crashed or was killed before its normal end). An older
        file without that record is finished when the GPT harness's done marker lies beside it,
        or when a next measurement at the spacing of its last two would have fallen past
        ``max_steps`` (every 10 steps of 155 ends at 150); otherwise its steps cannot tell a
        kill from a schedule that ends early (log-spaced, or a time budget that skipped the
        last measurements), and it is ``finished? unknown (older file): step 60 of 150``. An
        older file without ``max_steps`` has nothing to be measured against: None.
        """
        last = self.last_step
        if self.finished or last is None:
            return None
        if self.finished is False:
            return f"unfinished: {self._stopped_at(last)}"
        if self.planned_steps is None or self.finished_marker or _past_end(self):
            return None
        return f"finished? unknown (older file): {self._stopped_at(last)}"

    def _stopped_at(self, last: float) -> str:
        """``step 60 of 150``, or ``step 60`` when the plan is unknown."""
        plan = "" if self.planned_steps is None else f" of {self.planned_steps}"
        return f"step {_step_text(last)}{plan}"

    @property
    def diverged_from(self) -> float | None:
        """The first step of the run's closing rows whose probe loss was not finite (the
        meter's ``nonfinite`` status): training diverged there, no later value is its end."""
        first = None
        for row in sorted(self.rows, key=lambda row: _step(row) or 0.0, reverse=True):
            if row.get("status") != NONFINITE:
                break
            first = _step(row)
        return first

    def curve(self, quantity: str | None) -> tuple[np.ndarray, np.ndarray]:
        """``(t, values)`` of ``quantity`` on the run's planned training axis."""
        return run_curve(self.rows, quantity, self.planned_steps)

    def count_values(self, quantity: str | None) -> tuple[int, int]:
        """``(used, not used)`` values of ``quantity`` among the rows that measured it: used
        when finite with its measure's status ``ok``; a failed measurement (null in JSON, NaN
        or Infinity in CSV) or one whose status is not ``ok`` (an unconverged eigenvalue) is
        not used. Rows whose schedule did not call for the measure (``not_due``) count in
        neither."""
        logged = [logged_value(row, quantity) for row in self.rows if logs_quantity(row, quantity)]
        finite = sum(value is not None for value in logged)
        return finite, len(logged) - finite


def _past_end(run: Run) -> bool:
    """Whether a next measurement at the spacing of the run's last two falls past its plan."""
    steps = run.steps
    spacing = steps[-1] - steps[-2] if len(steps) > 1 else 0.0
    return steps[-1] + spacing > run.planned_steps


def load_runs(files: Iterable[str | Path]) -> list[Run]:
    """Every run in the record files, in file order: a file holds one run per size and ``run``
    name; an empty file is a run with no rows, so that it is listed too.

    Raises ``ValueError`` naming ``file:line`` for a row that is not a JSON object or has no
    size or step (a torn last line is dropped with a warning, see
    :func:`sharpmeter.paper.records.read_numbered_records`), and naming the metadata file when that
    cannot be read.
    """
    return [run for path in map(Path, files) for run in _runs_in_file(path)]


def _runs_in_file(path: Path) -> list[Run]:
    metadata = read_metadata(path)
    planned = _planned_steps(metadata, path)
    seed = _metadata_seed(metadata, path)
    finished = _finished(metadata, path)
    marker = (path.parent / DONE_FILE).is_file()
    heldout = _heldout_loss(path.parent / HELDOUT_FILE)
    described = {key: _text_or_none(metadata.get(key)) for key in ("dtype", "model_class")}
    grouped: dict[Any, list[tuple[int, Record]]] = defaultdict(list)
    for line, row in read_numbered_records(path):
        problem = row_problem(row)
        if problem is not None:
            raise ValueError(f"{path}:{line}: the row {problem}")
        grouped[run_key(row)].append((line, row))
    if not grouped:
        name = str(metadata.get("run") or path.parent.name)
        n_params = finite_number(metadata.get("n_params"))
        return [
            Run(path, name, n_params, (), planned, marker, seed, finished, heldout, **described)
        ]
    return [
        Run(
            source=path,
            name=run_name(n_params, run),
            n_params=n_params,
            rows=last_write_wins(path, numbered),
            planned_steps=planned,
            finished_marker=marker,
            seed=seed if row_seed is None else row_seed,
            finished=finished,
            heldout_loss=heldout,
            **described,
        )
        for (n_params, run, row_seed), numbered in grouped.items()
    ]


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _heldout_loss(path: Path) -> float | None:
    """The held-out loss a run folder records, None without one; a file that cannot be read
    raises naming it."""
    if not path.is_file():
        return None
    try:
        return finite_number(json.loads(path.read_text())["loss"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: cannot read the held-out loss ({error})") from error


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``<name>.meta.json`` beside a record file, ``{}`` when there is none."""
    meta_path = _meta_path(Path(path))
    if not meta_path.is_file():
        return {}
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(
            f"{meta_path}: cannot read the run's metadata ({error}); restore or remove it "
            "(without it, each step is taken over the run's last logged step)"
        ) from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{meta_path}: expected a JSON object")
    return metadata


def _meta_path(path: Path) -> Path:
    return path.with_name(path.stem + META_SUFFIX)


def _planned_steps(metadata: dict[str, Any], path: Path) -> int | None:
    planned = metadata.get("max_steps")
    if planned is None:
        return None
    if isinstance(planned, bool) or not isinstance(planned, int) or planned <= 0:
        raise ValueError(
            f"{_meta_path(path)}: max_steps must be a positive integer, got {planned!r}"
        )
    return planned


def _finished(metadata: dict[str, Any], path: Path) -> bool | None:
    """The metadata's record of a normal end; None in files written before it was kept."""
    finished = metadata.get(FINISHED_KEY)
    if finished is not None and not isinstance(finished, bool):
        raise ValueError(f"{_meta_path(path)}: finished must be true or false, got {finished!r}")
    return finished


def _metadata_seed(metadata: dict[str, Any], path: Path) -> int | None:
    try:
        return seed_of(metadata.get("seed"))
    except ValueError as error:
        raise ValueError(f"{_meta_path(path)}: {error}") from None


def last_write_wins(path: Path, numbered: Sequence[tuple[int, Record]]) -> tuple[Record, ...]:
    """One row per measurement, in file order: of a step logged more than once, the last
    written (a resumed run logs again what it measured after its checkpoint). Warns with the
    file and the lines of every repeat, so a conflict is never resolved unseen."""
    lines: dict[tuple, list[int]] = defaultdict(list)
    kept: dict[tuple, tuple[int, Record]] = {}
    for line, row in numbered:
        key = _measurement(row)
        lines[key].append(line)
        kept[key] = (line, row)
    repeats = [_repeat_text(key, found) for key, found in lines.items() if len(found) > 1]
    if repeats:
        shown = ", ".join(repeats[:_REPEATS_SHOWN])
        more = len(repeats) - _REPEATS_SHOWN
        warnings.warn(
            f"{path}: {len(repeats)} measurements logged more than once, the last write kept: "
            + shown
            + (f" and {more} more" if more > 0 else ""),
            RecordWarning,
            stacklevel=2,
        )
    return tuple(row for _, row in sorted(kept.values(), key=lambda kept_row: kept_row[0]))


def _measurement(row: Record) -> tuple:
    """What a row measured: where in training (its step, else its fraction) and, for a long
    row, which quantity."""
    step = _step(row)
    where = ("step", step) if step is not None else ("fraction", finite_number(row["fraction"]))
    return (*where, row.get("quantity") if is_long(row) else None)


def _repeat_text(key: tuple, lines: list[int]) -> str:
    """``step 40 on lines 5 and 12 (kept line 12)``."""
    axis, position, quantity = key
    what = f"{axis} {_step_text(position)}" + (f" of {quantity}" if quantity else "")
    listed = ", ".join(map(str, lines[:-1])) + f" and {lines[-1]}"
    return f"{what} on lines {listed} (kept line {lines[-1]})"


def _step(row: Record) -> float | None:
    return finite_number(row.get("step"))


def _step_text(step: float) -> str:
    return f"{step:.0f}" if float(step).is_integer() else f"{step:g}"


@dataclass(frozen=True)
class RunEntry:
    """A run found, what it logged of the quantity, and why it is not fitted (None: fitted)."""

    run: Run
    used: int
    not_used: int
    left_out: str | None


@dataclass(frozen=True)
class RunSelection:
    """Every run found, each with why it is or is not in the fits."""

    entries: tuple[RunEntry, ...]

    @property
    def fitted(self) -> list[Run]:
        return [entry.run for entry in self.entries if entry.left_out is None]

    def replicates(self, quantity: str | None, final_fraction: float | None = None) -> Replicates:
        """The fitted runs' curves of ``quantity`` by size and seed: runs at one size must
        differ in seed, else they are refused by name; none with a finite value raises. Given
        ``final_fraction``, only the runs with a value in that last fraction of training (a
        final value): for a quantity other than the one selected for, which another schedule
        may have measured only early."""
        curves = [(run.n_params, run.seed, run.label, run.curve(quantity)) for run in self.fitted]
        if final_fraction is not None:
            curves = [c for c in curves if no_final_reason(c[3][0], final_fraction) is None]
        return group_replicates(curves, quantity)

    def heldout_losses(self) -> dict[float, dict[int | None, float]] | None:
        """The fitted runs' held-out losses by size and seed; None unless every fitted run
        records one (a mix would compare sizes on different losses)."""
        losses: dict[float, dict[int | None, float]] = defaultdict(dict)
        for run in self.fitted:
            if run.heldout_loss is None:
                return None
            losses[run.n_params][run.seed] = run.heldout_loss
        return dict(losses)

    def rows(self) -> list[Record]:
        """The rows of the fitted runs, each measurement once."""
        return [row for run in self.fitted for row in run.rows]

    @property
    def unfinished(self) -> dict[float, str]:
        """The fitted sizes with a run not known to have ended normally (fitted when asked
        for), with how far it got: ``unfinished: step 60 of 150`` (or ``finished? unknown
        (older file): ...``, see :attr:`Run.unfinished`), and which seed it was when the size
        has several runs."""
        runs_at = Counter(run.n_params for run in self.fitted)
        marks: dict[float, list[str]] = defaultdict(list)
        for run in self.fitted:
            if run.unfinished:
                seed = f" ({seed_text(run.seed)})" if runs_at[run.n_params] > 1 else ""
                marks[run.n_params].append(run.unfinished + seed)
        return {n: "; ".join(found) for n, found in marks.items()}


def select_runs(
    runs: Sequence[Run],
    quantity: str | None = None,
    include_unfinished: bool = False,
    final_fraction: float | None = None,
) -> RunSelection:
    """Which runs a fit of ``quantity`` uses, and why each other one is left out.

    Left out: an empty file, a run whose probe loss diverged (its last values describe no end of
    training), one with no finite value of ``quantity`` (with status ``ok``), one not known to
    have ended normally (:attr:`Run.unfinished`) unless ``include_unfinished`` (it then stays
    marked), and, given ``final_fraction``, one with no such value in that last fraction of
    training, which has no final value (its last values failed, its schedule measured only
    early, or it stopped early). Raises ``ValueError`` listing every run and its reason when
    none is left to fit.
    """
    entries = tuple(run_entry(run, quantity, include_unfinished, final_fraction) for run in runs)
    selection = RunSelection(entries)
    check_one_definition(selection.fitted)
    warn_stretched_runs(selection.fitted)
    if not selection.fitted:
        runs_by_reason: dict[str, list[str]] = defaultdict(list)
        for entry in entries:
            runs_by_reason[str(entry.left_out)].append(entry.run.name)
        reasons = "".join(f"; {why}: {', '.join(names)}" for why, names in runs_by_reason.items())
        raise ValueError(f"no run to fit {quantity or 'the default quantity'}{reasons}")
    return selection


def warn_stretched_runs(runs: Sequence[Run]) -> None:
    """Warn (:class:`~sharpmeter.paper.records.RecordWarning`) when runs with no planned length
    (a CSV exported from W&B or pandas, an older file: no ``max_steps`` in metadata beside
    them) end at different steps: each is put on ``t = step / its last step``, so one killed at
    step 150 of 300 is stretched over the whole axis and fitted as if it had finished, and only
    a planned length can tell it from a run meant to be shorter."""
    unplanned = {
        run.label: run.last_step
        for run in runs
        if run.planned_steps is None and run.last_step is not None and _steps_only(run)
    }
    if len(set(unplanned.values())) < 2:
        return
    longest = max(unplanned.values())
    shorter = [
        f"{label} at {_step_text(last)}" for label, last in unplanned.items() if last < longest
    ]
    warnings.warn(
        f"runs with no planned max_steps end at different steps ({'; '.join(shorter)}; others at "
        f"{_step_text(longest)}): each is taken over its own last step, so a run that stopped "
        "early is fitted as finished; give each its .meta.json with max_steps, or leave out the "
        "runs that did not finish",
        RecordWarning,
        stacklevel=3,
    )


def _steps_only(run: Run) -> bool:
    """Whether the run's rows place themselves by step alone (a simulated curve carries its own
    fraction of training)."""
    return any(row.get("fraction") is None for row in run.rows)


def check_one_definition(runs: Sequence[Run]) -> None:
    """Refuse runs measured on different probe definitions (a fixed probe's values and a
    training batch's differ in what they measure, and no fit across them means anything), and
    warn (:class:`~sharpmeter.paper.records.RecordWarning`) when their dtypes or model classes
    differ: a study may mean it, but a size's value then moves with more than its size.
    Runs that do not record one are not compared on it."""
    probes = _runs_by(runs, lambda run: ", ".join(sorted(run.probes)) or None)
    if len(probes) > 1:
        raise ValueError(
            "runs measured on different probes cannot be fitted together (their values measure "
            f"different things): {_listed(probes)}; pass the runs of one probe"
        )
    for difference in setting_differences(runs):
        warnings.warn(
            f"the runs fitted together differ in {difference}", RecordWarning, stacklevel=3
        )


def setting_differences(runs: Sequence[Run]) -> list[str]:
    """``dtype: float32: a, b; bfloat16: c`` for each recorded setting (dtype, model class) in
    which ``runs`` differ."""
    differences = []
    for what in ("dtype", "model_class"):
        found = _runs_by(runs, lambda run, what=what: getattr(run, what))
        if len(found) > 1:
            differences.append(f"{what}: {_listed(found)}")
    return differences


def _runs_by(runs: Sequence[Run], key) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for run in runs:
        if (value := key(run)) is not None:
            grouped[value].append(run.label)
    return grouped


def _listed(grouped: dict[str, list[str]]) -> str:
    return "; ".join(f"{value}: {', '.join(labels)}" for value, labels in grouped.items())


def run_entry(
    run: Run,
    quantity: str | None,
    include_unfinished: bool = False,
    final_fraction: float | None = None,
) -> RunEntry:
    """One run's entry in :func:`select_runs`: what it logged of ``quantity``, and why it is
    left out of a fit (None: fitted)."""
    used, not_used = run.count_values(quantity)
    if not run.rows:
        left_out = "empty file"
    elif run.diverged_from is not None:
        left_out = f"diverged: probe loss not finite from step {_step_text(run.diverged_from)}"
    elif used == 0:
        left_out = f"no finite {quantity_name(run.rows[0], quantity)}"
    elif run.unfinished and not include_unfinished:
        left_out = run.unfinished
    elif final_fraction is not None and (
        no_final := no_final_reason(run.curve(quantity)[0], final_fraction)
    ):
        name = quantity_name(run.rows[0], quantity)
        left_out = f"no final {name}: {no_final}" + (
            f" ({run.unfinished})" if run.unfinished else ""
        )
    else:
        left_out = None
    return RunEntry(run, used, not_used, left_out)
