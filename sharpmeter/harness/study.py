"""A multi-scale study: train a ladder of sizes alike, then report (``sharpmeter study CONFIG``).

Every size sees the same corpus, data order, initialisation seed, schedule and measurements;
only the shape of the model changes. Each size trains into ``<output_dir>/<size>``; a run that
already finished is not trained again, so an interrupted study resumes where it stopped;
options that cannot change the numbers (logging, checkpoints: see ``_NOT_SHAPING`` in
:mod:`sharpmeter.harness.train`) may differ on the rerun. A study owns its ``output_dir`` while
it runs: a second one started there is refused in one line (:mod:`sharpmeter.harness.runlock`).
The report (:mod:`sharpmeter.paper.report`) is computed from the logged JSONL files alone.
``resume_from_checkpoint: true`` resumes each unfinished run from the last checkpoint in its own
folder (a path is refused: every run would start from that one run's weights).

With ``seeds: [0, 1, 2]`` each size trains once per seed, into ``<output_dir>/<size>/seed<k>``,
and the report takes the runs of one size as replicates. A replicate is another initialisation
on the same data: ``seed`` becomes the seed's, ``data_seed`` stays the config's (its ``seed``
when it sets none), so seed-to-seed spread measures what the starting point alone does. The
ladder trains seed by seed, so a study stopped early holds whole ladders.

With ``schedule_variants`` one size of the ladder (``schedule_size``) trains once more per
learning-rate schedule, into ``<output_dir>/schedules/<schedule>``, on the first seed; these
runs stay out of the ladder's fits (one size cannot make a scaling law), and the report decides
schedule sensitivity on them in a section of its own.

Example::

    sharpmeter study configs/study_cpu.yaml                    # the README's main job
    sharpmeter study configs/study_cpu.yaml --sizes tiny small medium --max_steps 100
    sharpmeter study configs/claims_cpu.yaml                   # 3 seeds, 6 sizes, 3 schedules
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from transformers import TrainingArguments

from sharpmeter.harness.config import (
    RESTARTS,
    STUDY_ARGUMENTS,
    DataArguments,
    ModelArguments,
    SharpnessArguments,
    StudyArguments,
    parse_config,
)
from sharpmeter.harness.runlock import rank_zero_lock
from sharpmeter.harness.train import RESUME_LAST, is_finished, load_data, run_config, train_gpt
from sharpmeter.measure.measures import measure_of
from sharpmeter.measure.meter import ROW_COLUMNS
from sharpmeter.measure.schema import MEASURE_COLUMNS, VALUE_COLUMNS
from sharpmeter.paper.analysis.curves import check_sharpness_quantity
from sharpmeter.paper.report import ReportFiles, write_report

MIN_MEASUREMENTS = 10
# The numeric columns of a row; of them a study reports a measure of sharpness.
LOGGED_COLUMNS = sorted({*ROW_COLUMNS, *(c for cols in MEASURE_COLUMNS.values() for c in cols)})


class RunArguments(NamedTuple):
    """The arguments of one run, in the order :func:`~sharpmeter.harness.train.train_gpt`
    takes them."""

    model: ModelArguments
    data: DataArguments
    sharpness: SharpnessArguments
    training: TrainingArguments

    def finished(self) -> bool:
        """Whether this run already finished (ValueError: finished with other settings)."""
        return is_finished(self.training.output_dir, run_config(*self))


@dataclass(frozen=True)
class StudyConfig:
    """A parsed study config: the ladder and the run settings every run shares."""

    study: StudyArguments
    model: ModelArguments
    data: DataArguments
    sharpness: SharpnessArguments
    training: TrainingArguments

    def ladder(self) -> list[RunArguments]:
        """Every run of the ladder, seed by seed: each size once per seed of ``seeds``, or
        once with the config's ``seed`` when ``seeds`` is empty."""
        seeds = self.study.seeds or [None]
        return [self.size_arguments(size, seed) for seed in seeds for size in self.study.sizes]

    def size_arguments(self, size: str, seed: int | None = None) -> RunArguments:
        """The run of one size of the ladder: in ``<output_dir>/<size>`` with the config's
        ``seed`` (None), else in ``<output_dir>/<size>/seed<seed>`` with that seed."""
        folder = size if seed is None else f"{size}/seed{seed}"
        return self._run(size, folder, **self._seeded(seed))

    def schedule_runs(self) -> list[RunArguments]:
        """One run of ``schedule_size`` per schedule variant, on the ladder's first seed, in
        ``<output_dir>/schedules/<schedule>``. Cosine with restarts takes ``restart_cycles``
        cycles; every other variant its transformers defaults."""
        first_seed = self.study.seeds[0] if self.study.seeds else None
        return [
            self._run(
                self.study.schedule_size,
                f"schedules/{schedule}",
                lr_scheduler_type=schedule,
                lr_scheduler_kwargs=(
                    {"num_cycles": self.study.restart_cycles} if schedule == RESTARTS else {}
                ),
                **self._seeded(first_seed),
            )
            for schedule in self.study.schedule_variants
        ]

    def runs(self) -> list[RunArguments]:
        """Every run the study trains: the ladder, then the schedule variants."""
        return self.ladder() + self.schedule_runs()

    def _run(self, size: str, folder: str, **training_changes: Any) -> RunArguments:
        """A run of ``size`` in ``<output_dir>/<folder>``, named after that folder."""
        output_dir = str(Path(self.training.output_dir) / folder)
        training = dataclasses.replace(
            self.training, output_dir=output_dir, run_name=folder, **training_changes
        )
        model = dataclasses.replace(self.model, size=size)
        return RunArguments(model, self.data, self.sharpness, training)

    def _seeded(self, seed: int | None) -> dict[str, int]:
        """The training changes of a replicate: its initialisation ``seed``, and the data order
        pinned, since ``data_seed`` unset would follow ``seed`` (None: the config as it is)."""
        if seed is None:
            return {}
        data_seed = self.training.data_seed
        return {"seed": seed, "data_seed": self.training.seed if data_seed is None else data_seed}


def parse_study(argv: Sequence[str]) -> StudyConfig:
    """``[CONFIG.yaml] [--name value ...]`` -> :class:`StudyConfig`; every check that can fail
    before training fails here, including a finished run trained with other settings."""
    config = StudyConfig(*parse_config(argv, STUDY_ARGUMENTS, required=("output_dir", "max_steps")))
    if config.model.size is not None:
        raise ValueError("a study names its model sizes in 'sizes', not 'size'")
    _check_resume(config.training.resume_from_checkpoint)
    quantity, measures = config.study.quantity, config.sharpness.measures
    _check_quantity(quantity)
    needed = measure_of(quantity)
    if needed is not None and needed not in measures:
        raise ValueError(
            f"quantity {quantity!r} needs the {needed!r} measure; measures: {measures}"
        )
    # The reported quantity's curve is the one that must be long enough (default: critical).
    measure = needed or measures[0]
    schedule, steps = config.sharpness.schedule_of(measure), config.training.max_steps
    count = sum(schedule.is_due(step) for step in range(1, steps + 1))
    if count < MIN_MEASUREMENTS:
        raise ValueError(
            f"max_steps = {steps} leaves {count} {measure} measurements on its schedule; a "
            f"curve needs at least {MIN_MEASUREMENTS}"
        )
    for arguments in config.runs():
        arguments.finished()
    return config


def _check_resume(given: str | None) -> None:
    """A study resumes each run from its own checkpoints: one checkpoint path given to every
    run would start the others from that run's weights (replicates that are not)."""
    if given is not None and given.strip().lower() != RESUME_LAST:
        raise ValueError(
            f"resume_from_checkpoint {given!r}: a study resumes each of its runs from its own "
            f"checkpoints; give {RESUME_LAST!r} (each unfinished run resumes from the last "
            "checkpoint in its folder, or starts from scratch), not a path"
        )


def _check_quantity(quantity: str) -> None:
    """The reported quantity must be a measure of sharpness the meter logs: the report refuses
    any other (the loss, the learning rate), and finds a typo, only after every size has
    trained."""
    if quantity in LOGGED_COLUMNS:
        check_sharpness_quantity(quantity)
        return
    close = difflib.get_close_matches(quantity, VALUE_COLUMNS, n=3)
    hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"one of {VALUE_COLUMNS}"
    raise ValueError(f"quantity {quantity!r} is not a column the meter logs: {hint}")


def run_study(config: StudyConfig) -> ReportFiles | None:
    """Train the runs of a parsed study config that are not finished, then write the report
    of its ladder and its schedule runs into its ``output_dir``. Returns None on ranks other
    than 0.

    The study owns its ``output_dir`` from start to end (:mod:`sharpmeter.harness.runlock`): a
    second study (or run) started on it meanwhile raises
    :class:`~sharpmeter.harness.runlock.RunLockedError`, on every rank, before the corpus is
    read."""
    with rank_zero_lock(config.training.output_dir, config.training.process_index):
        return _run_owned_study(config)


def _run_owned_study(config: StudyConfig) -> ReportFiles | None:
    """:func:`run_study` once its output folder is this study's alone."""
    main_process = config.training.process_index == 0
    dataset = load_data(config.data, config.model.block_size, config.training)
    runs = config.runs()
    for index, arguments in enumerate(runs, start=1):
        training = arguments.training
        finished = arguments.finished()
        if main_process:
            action = "already trained in" if finished else "training into"
            print(f"[{index}/{len(runs)}] {training.run_name}: {action} {training.output_dir}")
        if not finished:
            train_gpt(*arguments, dataset=dataset)
    if not main_process:
        return None
    return write_report(
        [arguments.training.output_dir for arguments in config.ladder()],
        out=config.training.output_dir,
        quantity=config.study.quantity,
        final_fraction=config.study.final_fraction,
        schedules=[arguments.training.output_dir for arguments in config.schedule_runs()],
    )
