"""Hugging Face ``Trainer`` integration: a thin callback around :class:`SharpnessMeter`.

The callback measures at ``on_step_end`` (the step is done: parameters updated, optimizer state
advanced, and ``param_groups[..]["lr"]`` is the next step's rate), so critical sharpness is
taken along the update the *next* step would make. Rows go

* to ``<output_dir>/sharpness.jsonl`` (main process only, always);
* through ``Trainer.log`` under ``sharpness/...`` when the callback is bound to the trainer
  (:meth:`SharpnessCallback.attach`), so they reach every ``report_to`` integration (W&B shows
  them as ``train/sharpness/...`` on the Trainer's own step axis) and ``state.log_history``;
* otherwise into ``state.log_history`` and, when a W&B run is active, straight into it.

The probe batch is fixed for the run: the one you pass, or ``probe_size`` examples drawn from
the training set with a private generator (the training sampler and the global RNG are never
touched, so the trajectory is the one you would get without the callback). Warm starts and the
schedule position are saved in checkpoints and restored on resume; the JSONL curve then goes on
without duplicate steps.

Example::

    trainer = Trainer(model=model, args=args, train_dataset=train)
    SharpnessCallback.attach(trainer, schedule=Schedule(every=25))
    trainer.train()
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from sharpmeter.distributed import local_shard
from sharpmeter.loss import move_to
from sharpmeter.meter import SharpnessMeter
from sharpmeter.sinks import JsonlSink, numeric_items, run_metadata

PREFIX = "sharpness/"
STATE_FILE = "sharpmeter_state.json"


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
        if probe_batch is None and (not isinstance(probe_size, int) or probe_size <= 0):
            raise ValueError(f"probe_size must be a positive integer, got {probe_size!r}")
        self.probe_batch = probe_batch
        self.probe_size = probe_size
        self.probe_seed = probe_seed
        self.jsonl_path = jsonl_path
        self.run_name = run_name
        self.meter_options = meter_options
        self.meter: SharpnessMeter | None = None
        self.sink: JsonlSink | None = None
        self.trainer: Trainer | None = None
        if probe_batch is not None:
            # Fail at construction on bad options (unknown measure, no labels, bad schedule). The
            # model is not known yet: ``params`` belong to it and are checked at train begin.
            SharpnessMeter(torch.nn.Linear(1, 1), probe_batch, **{**meter_options, "params": None})

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
        if state.global_step > 0:
            self._restore(args, state)
        if state.is_world_process_zero:
            path = self.jsonl_path or Path(args.output_dir) / "sharpness.jsonl"
            run = self.run_name or args.run_name or Path(args.output_dir).name
            metadata = run_metadata(model, run=run, seed=args.seed, probe_seed=self.probe_seed)
            resume = state.global_step if state.global_step > 0 else None
            self.sink = JsonlSink(path, metadata, resume_step=resume)

    def _draw_probe(self, dataloader) -> Any:
        if dataloader is None:
            raise ValueError("no probe_batch given and no train dataloader to draw one from")
        dataset = dataloader.dataset
        generator = torch.Generator().manual_seed(self.probe_seed)
        count = min(self.probe_size, len(dataset))
        indices = torch.randperm(len(dataset), generator=generator)[:count].tolist()
        return dataloader.collate_fn([dataset[i] for i in indices])

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer=None,
        **kwargs,
    ):
        if self.meter is None or not self.meter.is_due(state.global_step):
            return control
        row = self.meter.measure(state.global_step, optimizer=optimizer)
        if self.sink is not None:
            self.sink.write(row)
        self._log(numeric_items(row, PREFIX), state, control)
        return control

    def _log(self, logs: dict[str, float], state: TrainerState, control: TrainerControl) -> None:
        if self.trainer is not None:
            # Trainer.log resets control.should_log, which would drop the Trainer's own loss log
            # due at this step.
            should_log = control.should_log
            self.trainer.log(logs)
            control.should_log = should_log
            return
        state.log_history.append({**logs, "step": state.global_step})
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is not None and state.is_world_process_zero:
            train_logs = {f"train/{k}": v for k, v in logs.items() if math.isfinite(v)}
            wandb.run.log({**train_logs, "train/global_step": state.global_step})

    def on_save(self, args: TrainingArguments, state: TrainerState, control, **kwargs):
        if self.meter is not None and state.is_world_process_zero:
            folder = _checkpoint_folder(args, state.global_step)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / STATE_FILE).write_text(json.dumps(self.meter.state_dict()))
        return control

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        """Warm starts and schedule position of the checkpoint training resumes from."""
        saved = _checkpoint_folder(args, state.global_step) / STATE_FILE
        if saved.exists():
            self.meter.load_state_dict(json.loads(saved.read_text()))


def _checkpoint_folder(args: TrainingArguments, step: int) -> Path:
    # transformers' own naming (trainer_utils.PREFIX_CHECKPOINT_DIR)
    return Path(args.output_dir) / f"checkpoint-{step}"
