"""Hugging Face ``Trainer`` integration: a thin callback around :class:`SharpnessMeter`.

The callback measures at ``on_step_end`` (the step is done: parameters updated, optimizer state
advanced, and ``param_groups[..]["lr"]`` is the next step's rate), so critical sharpness is
taken along the update the *next* step would make. Rows go

* to ``<output_dir>/sharpness.jsonl`` (main process only, always);
* through ``Trainer.log`` under ``sharpness/...`` when the callback is bound to the trainer
  (:meth:`SharpnessCallback.attach`), so they reach every ``report_to`` integration (W&B shows
  them as ``train/sharpness/...`` on the Trainer's own step axis) and ``state.log_history``;
* otherwise into ``state.log_history`` and, when a W&B run is active, straight into it.

The console gets one short line per measurement (none with ``disable_tqdm``); the full row is
in the JSONL file and the loggers.

The probe batch is fixed for the run: the one you pass, or ``probe_size`` examples drawn from
the training set with a private generator and a private copy of the collator, every RNG forked
(the training sampler, the global RNG streams and a seeded collator's own generator are never
advanced, so the trajectory is the one you would get without the callback). From a streaming
(iterable) dataset the probe is the first ``probe_size`` examples of a private iterator.
Options are checked when the callback is made, without building anything; the probe's loss and
the optimizer when training begins. Warm starts and the schedule position travel in the
checkpoint's ``trainer_state.json`` and are restored on resume, wherever the checkpoint lies;
the JSONL curve then goes on without duplicate steps.

Example::

    trainer = Trainer(model=model, args=args, train_dataset=train)
    SharpnessCallback.attach(trainer, schedule=Schedule(every=25))
    trainer.train()
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from sharpmeter.distributed import local_shard
from sharpmeter.estimators._operator import check_positive_int
from sharpmeter.loss import move_to, split_probe
from sharpmeter.meter import SharpnessMeter, check_options
from sharpmeter.rng import fork_rng
from sharpmeter.sinks import JsonlSink, numeric_items, run_metadata

PREFIX = "sharpness/"
# The meter's warm start and schedule position, kept in TrainerState.stateful_callbacks so that
# every checkpoint's trainer_state.json carries them. Not a callback class name: the Trainer's
# restore_callback_states_from_checkpoint would otherwise rebuild the callback without its probe.
STATE_KEY = "sharpmeter"
# The console line: these columns, when the row has them, with their quality.
SUMMARY = (
    ("critical_sharpness", None, "critical"),
    ("hessian_trace", "hessian_trace_stderr", "trace"),
    ("lambda_max", None, "lambda_max"),
    ("preconditioned_lambda_max", None, "precond"),
    ("directional_sharpness", None, "directional"),
)


class SharpnessCallback(TrainerCallback):
    """Measure sharpness during ``Trainer.train()``.

    Args:
        probe_batch: a fixed batch (already collated) or ``None`` to draw one from the
            training set at the start of training.
        probe_size: examples in a drawn probe batch.
        probe_seed: seed of the private generator that draws it.
        jsonl_path: where rows go (default ``<output_dir>/sharpness.jsonl``).
        run_name: the ``run`` field of every row (default: ``args.run_name`` or the output
            folder's name).
        **meter_options: :class:`SharpnessMeter` arguments (``measures``, ``schedule``,
            ``loss_fn``, ``dropout``, ...). ``max_grad_norm`` defaults to the Trainer's.

    Raises:
        ValueError: at once for a misspelled or bad option; when training begins for a probe
            whose forward gives no loss, or an optimizer a measure cannot follow.
    """

    def __init__(
        self,
        probe_batch: Any = None,
        *,
        probe_size: int = 8,
        probe_seed: int = 0,
        jsonl_path: str | None = None,
        run_name: str | None = None,
        **meter_options: Any,
    ) -> None:
        check_positive_int("probe_size", probe_size)
        check_positive_int("probe_seed", probe_seed, minimum=0)
        if probe_batch is not None:
            split_probe(probe_batch)
        # Checked without a model: building one would draw from the RNG the Trainer just seeded.
        check_options(meter_options)
        self.probe_batch = probe_batch
        self.probe_size = probe_size
        self.probe_seed = probe_seed
        self.jsonl_path = jsonl_path
        self.run_name = run_name
        self.meter_options = meter_options
        self.meter: SharpnessMeter | None = None
        self.sink: JsonlSink | None = None
        self.trainer: Trainer | None = None

    @classmethod
    def attach(cls, trainer: Trainer, probe_batch: Any = None, **options: Any):
        """Create a callback, bind it to ``trainer`` (so rows go through ``Trainer.log``) and
        add it. Returns the callback."""
        callback = cls(probe_batch, **options)
        callback.trainer = trainer
        trainer.add_callback(callback)
        return callback

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model=None,
        optimizer=None,
        train_dataloader=None,
        **kwargs,
    ):
        batch = self.probe_batch
        if batch is None:
            batch = self._draw_probe(train_dataloader)
        # Every rank holds the same global probe; each measures its shard (sums over ranks).
        batch = local_shard(move_to(batch, next(model.parameters()).device))
        options = {
            "max_grad_norm": args.max_grad_norm or None,
            "progress": state.is_world_process_zero and not args.disable_tqdm,
            **self.meter_options,
        }
        self.meter = SharpnessMeter(model, batch, **options)
        if optimizer is not None:
            self.meter.check_optimizer(optimizer)
        saved = state.stateful_callbacks.get(STATE_KEY)
        if state.global_step > 0 and saved:
            self.meter.load_state_dict(saved)
        self._publish_state(state)
        if state.is_world_process_zero:
            path = self.jsonl_path or Path(args.output_dir) / "sharpness.jsonl"
            run = self.run_name or args.run_name or Path(args.output_dir).name
            # max_steps: the planned length, so analysis can tell an unfinished run.
            metadata = run_metadata(
                model,
                run=run,
                seed=args.seed,
                probe_seed=self.probe_seed,
                max_steps=state.max_steps,
            )
            resume = state.global_step if state.global_step > 0 else None
            self.sink = JsonlSink(path, metadata, resume_step=resume)

    def _draw_probe(self, dataloader) -> Any:
        """``probe_size`` examples collated by a copy of the training collator, every RNG
        forked: training draws the numbers it would have drawn without us."""
        if dataloader is None:
            raise ValueError("no probe_batch given and no train dataloader to draw one from")
        try:
            collate = copy.deepcopy(dataloader.collate_fn)
        except Exception as error:
            raise ValueError(
                f"cannot copy the training collator to draw a probe without advancing its "
                f"random state ({type(error).__name__}: {error}): pass probe_batch="
            ) from error
        with fork_rng():
            return collate(self._probe_examples(dataloader.dataset))

    def _probe_examples(self, dataset) -> list[Any]:
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            # A stream has no indices: its first examples, from an iterator of our own.
            examples = list(itertools.islice(iter(dataset), self.probe_size))
            if not examples:
                raise ValueError(
                    "the training stream gave no example for the probe: pass probe_batch="
                )
            return examples
        generator = torch.Generator().manual_seed(self.probe_seed)
        count = min(self.probe_size, len(dataset))
        indices = torch.randperm(len(dataset), generator=generator)[:count].tolist()
        return [dataset[i] for i in indices]

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer=None,
        **kwargs,
    ):
        if self.meter is None:
            return control
        if self.meter.is_due(state.global_step):
            row = self.meter.measure(state.global_step, optimizer=optimizer)
            if self.sink is not None:
                self.sink.write(row)
            self._log(numeric_items(row, PREFIX), state, control)
            if state.is_world_process_zero and not args.disable_tqdm:
                tqdm.write(summary_line(row))
        # Before the Trainer saves a checkpoint of this step, which follows on_step_end.
        self._publish_state(state)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.sink is not None:
            self.sink.close()
        return control

    def _publish_state(self, state: TrainerState) -> None:
        state.stateful_callbacks[STATE_KEY] = self.meter.state_dict()

    def _log(self, logs: dict[str, float], state: TrainerState, control: TrainerControl) -> None:
        if self.trainer is not None:
            self._log_through_trainer(logs, control)
            return
        state.log_history.append({**logs, "step": state.global_step})
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is not None and state.is_world_process_zero:
            train_logs = {f"train/{k}": v for k, v in logs.items() if math.isfinite(v)}
            wandb.run.log({**train_logs, "train/global_step": state.global_step})

    def _log_through_trainer(self, logs: dict[str, float], control: TrainerControl) -> None:
        """``Trainer.log`` (history, every ``report_to`` logger) without the console printers,
        which would print the whole row: :func:`summary_line` is printed instead."""
        handler = self.trainer.callback_handler
        callbacks = handler.callbacks
        # Trainer.log resets control.should_log, which would drop the Trainer's own loss log
        # due at this step.
        should_log = control.should_log
        handler.callbacks = [
            c for c in callbacks if not isinstance(c, (PrinterCallback, ProgressCallback))
        ]
        try:
            self.trainer.log(logs)
        finally:
            handler.callbacks = callbacks
            control.should_log = should_log


def summary_line(row: dict[str, Any]) -> str:
    """One short console line for a row: the values measured, their quality, the status."""
    parts = []
    for column, error, label in SUMMARY:
        value = row.get(column)
        if not isinstance(value, float) or math.isnan(value):
            continue
        spread = row.get(error) if error else None
        parts.append(f"{label} {value:.4g}" + (f" ± {spread:.2g}" if spread else ""))
    seconds = row.get("wall_seconds", math.nan)
    return (
        f"sharpness step {row['step']}: "
        + (", ".join(parts) or "no value")
        + f" [{row.get('status')}, {seconds:.1f} s]"
    )
