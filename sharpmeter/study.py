"""A multi-scale study: train a ladder of sizes alike, then report (``sharpmeter study CONFIG``).

Every size sees the same corpus, data order, initialisation seed, schedule and measurements;
only the shape of the model changes. Each size trains into ``<output_dir>/<size>``; a size that
already finished is not trained again, so an interrupted study resumes where it stopped. The
report (:mod:`sharpmeter.report`) is computed from the logged JSONL files alone.

Example::

    sharpmeter study configs/study_cpu.yaml                    # the README's main job
    sharpmeter study configs/study_cpu.yaml --sizes tiny small medium --max_steps 100
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from sharpmeter.config import STUDY_ARGUMENTS, parse_config
from sharpmeter.report import ReportFiles, write_report
from sharpmeter.train import is_finished, load_data, train_gpt

MIN_MEASUREMENTS = 10


def parse_study(argv: Sequence[str]) -> tuple:
    """``[CONFIG.yaml] [--name value ...]`` -> (study, model, data, sharpness, training)
    arguments; every check that can fail before training fails here."""
    config = parse_config(argv, STUDY_ARGUMENTS, required=("output_dir", "max_steps"))
    sharpness_args, training_args = config[3], config[4]
    if training_args.max_steps < MIN_MEASUREMENTS * sharpness_args.every:
        raise ValueError(
            f"max_steps = {training_args.max_steps} allows fewer than {MIN_MEASUREMENTS} "
            f"measurements every {sharpness_args.every} steps"
        )
    return config


def run_study(config: tuple) -> ReportFiles | None:
    """Train the sizes of a parsed study config that are not finished, then write the report
    into its ``output_dir``. Returns None on ranks other than 0."""
    study, model_args, data_args, sharpness_args, training_args = config
    root = Path(training_args.output_dir)
    dataset = load_data(data_args, model_args.block_size, training_args)
    for index, size in enumerate(study.sizes, start=1):
        run_args = dataclasses.replace(training_args, output_dir=str(root / size), run_name=size)
        if is_finished(run_args.output_dir, run_args.max_steps):
            print(f"[{index}/{len(study.sizes)}] {size}: already trained in {run_args.output_dir}")
            continue
        print(f"[{index}/{len(study.sizes)}] {size}: training into {run_args.output_dir}")
        size_args = dataclasses.replace(model_args, size=size)
        train_gpt(size_args, data_args, sharpness_args, run_args, dataset=dataset)
    if training_args.process_index != 0:
        return None  # one process writes the report
    return write_report(
        [root / size for size in study.sizes],
        out=root,
        quantity=study.quantity,
        final_fraction=study.final_fraction,
    )
