"""A multi-scale study: train a ladder of sizes alike, then report (``sharpmeter study CONFIG``).

Every size sees the same corpus, data order, initialisation seed, schedule and measurements;
only the shape of the model changes. Each size trains into ``<output_dir>/<size>``; a size that
already finished is not trained again, so an interrupted study resumes where it stopped;
options that cannot change the numbers (logging, checkpoints: see ``_NOT_SHAPING`` in
:mod:`sharpmeter.harness.train`) may differ on the rerun. A study owns its ``output_dir`` while
it runs: a second one started there is refused in one line (:mod:`sharpmeter.harness.runlock`).
The report (:mod:`sharpmeter.paper.report`) is computed from the logged JSONL files alone.

Example::

    sharpmeter study configs/study_cpu.yaml                    # the README's main job
    sharpmeter study configs/study_cpu.yaml --sizes tiny small medium --max_steps 100
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from transformers import TrainingArguments

from sharpmeter.harness.config import (
    STUDY_ARGUMENTS,
    DataArguments,
    ModelArguments,
    SharpnessArguments,
    StudyArguments,
    parse_config,
)
from sharpmeter.harness.runlock import rank_zero_lock
from sharpmeter.harness.train import is_finished, load_data, run_config, train_gpt
from sharpmeter.measure.measures import measure_of
from sharpmeter.paper.report import ReportFiles, write_report

MIN_MEASUREMENTS = 10


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
    """A parsed study config: the ladder and the run settings every size shares."""

    study: StudyArguments
    model: ModelArguments
    data: DataArguments
    sharpness: SharpnessArguments
    training: TrainingArguments

    def size_arguments(self, size: str) -> RunArguments:
        """The run of one size of the ladder, in ``<output_dir>/<size>``."""
        output_dir = str(Path(self.training.output_dir) / size)
        training = dataclasses.replace(self.training, output_dir=output_dir, run_name=size)
        model = dataclasses.replace(self.model, size=size)
        return RunArguments(model, self.data, self.sharpness, training)


def parse_study(argv: Sequence[str]) -> StudyConfig:
    """``[CONFIG.yaml] [--name value ...]`` -> :class:`StudyConfig`; every check that can fail
    before training fails here, including a finished size trained with other settings."""
    config = StudyConfig(*parse_config(argv, STUDY_ARGUMENTS, required=("output_dir", "max_steps")))
    if config.model.size is not None:
        raise ValueError("a study names its model sizes in 'sizes', not 'size'")
    quantity, measures = config.study.quantity, config.sharpness.measures
    needed = measure_of(quantity)
    if needed is not None and needed not in measures:
        raise ValueError(
            f"quantity {quantity!r} needs the {needed!r} measure; measures: {measures}"
        )
    schedule, steps = config.sharpness.schedule(), config.training.max_steps
    count = sum(schedule.is_due(step) for step in range(1, steps + 1))
    if count < MIN_MEASUREMENTS:
        raise ValueError(
            f"max_steps = {steps} leaves {count} measurements on the schedule; a curve needs "
            f"at least {MIN_MEASUREMENTS}"
        )
    for size in config.study.sizes:
        config.size_arguments(size).finished()
    return config


def run_study(config: StudyConfig) -> ReportFiles | None:
    """Train the sizes of a parsed study config that are not finished, then write the report
    into its ``output_dir``. Returns None on ranks other than 0.

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
    sizes = config.study.sizes
    for index, size in enumerate(sizes, start=1):
        arguments = config.size_arguments(size)
        output_dir = arguments.training.output_dir
        finished = arguments.finished()
        if main_process:
            action = "already trained in" if finished else "training into"
            print(f"[{index}/{len(sizes)}] {size}: {action} {output_dir}")
        if not finished:
            train_gpt(*arguments, dataset=dataset)
    if not main_process:
        return None
    root = Path(config.training.output_dir)
    return write_report(
        [root / size for size in sizes],
        out=root,
        quantity=config.study.quantity,
        final_fraction=config.study.final_fraction,
    )
