"""Hugging Face ``Trainer`` integration: a thin callback around :class:`SharpnessMeter`.

The callback measures at ``on_step_end`` (the step is done: parameters updated, optimizer state
advanced, and ``param_groups[..]["lr"]`` is the next step's rate), so critical sharpness is
taken along the update the *next* step would make. Rows go

* to ``<output_dir>/sharpness.jsonl`` (main process only, always), beside its metadata
  ``sharpness.meta.json`` (the planned ``max_steps``; ``finished`` turns true at
  ``on_train_end``, so a run that raised or was killed reads as unfinished);
* through ``Trainer.log`` under ``sharpness/...`` when the callback is bound to the trainer
  (:meth:`SharpnessCallback.attach`), so they reach every ``report_to`` integration (W&B shows
  them as ``train/sharpness/...`` on the Trainer's own step axis) and ``state.log_history``;
* otherwise into ``state.log_history``;
* and, when a W&B run is active that the Trainer does not report to (an unbound callback, or
  ``report_to`` without ``"wandb"``: the user's own run), into it through a
  :class:`~sharpmeter.measure.sinks.WandbSink` (set up at the first row, under the same
  ``train/sharpness/...`` keys, on its ``train/sharpness/step`` axis). No row goes to W&B twice.

The console gets one short line per measurement (none with ``disable_tqdm``); the full row is
in the JSONL file and the loggers. A logger that fails (a service down, a full disk) is a
:class:`~sharpmeter.measure.sinks.SinkWarning`, never the end of training.

The probe batch is fixed for the run: the one you pass, or ``probe_size`` examples drawn from
the training set with a private generator and a private copy of the collator, every RNG forked
(the training sampler, the global RNG streams and a seeded collator's own generator are never
advanced, so the trajectory is the one you would get without the callback). From a streaming
(iterable) dataset the probe is the first ``probe_size`` examples of a private iterator, so the
stream must be re-iterable: ``iter(dataset)`` must start a new pass each time (a generator
``__iter__``, a ``datasets.IterableDataset``). A stream that can be read once only (one
iterator shared with training) would lose those examples to the probe: pass ``probe_batch=``
there. Under data parallelism (a ``torch.distributed`` group of more than one rank) rank 0
draws the probe and sends it to the others (``broadcast_object_list``), which neither read
their data nor draw a random number for it: ranks that see different data (a stream sharded
by rank) still hold one global probe, of which each measures its shard. The callback makes the
process group honour ``ddp_timeout``, which transformers leaves out of the gloo group of a CPU
run (torch's default is 30 minutes): a stopped, hung or dead rank then ends the run after that
timeout with a :class:`~sharpmeter.measure.distributed.CollectiveError` saying so.

Options are checked when the callback is made, without building anything; the probe's loss and
the optimizer when training begins. Warm starts and the schedule position travel in the
checkpoint's ``trainer_state.json`` and are restored on resume, wherever the checkpoint lies;
the JSONL curve then goes on without duplicate steps. A run resumed in another folder (or with
another ``jsonl_path``) starts its file with the rows up to the checkpoint of the run that saved
it, copied from the JSONL file that run wrote (the checkpoint records it) under this run's
name, with a ``RuntimeWarning`` naming the checkpoint and the file; when that file is gone or
unreadable, the warning says the curve lacks its head, and why. What the file held before (an
unrelated run's rows) is moved aside. The metadata records ``resumed_from`` (the checkpoint
folder: ``args.resume_from_checkpoint``, else the one of the resumed step in the folder its run
saved it in, which the checkpoint records) and ``resumed_at_step``. The JSONL file is the callback's
alone while it trains: a second live writer on it is refused when training begins
(:class:`~sharpmeter.measure.sinks.JsonlLockedError`), and a file a finished or dead earlier run
left is moved aside (``sharpness.1.jsonl``), never truncated. With
``restore_callback_states_from_checkpoint=True`` the Trainer logs "Checkpoint included
callbacks not included in current configuration. Ignoring. (sharpmeter)": harmless, the meter
reads its state itself (see :data:`STATE_KEY`). Checkpoints of sharpmeter versions that wrote
``sharpmeter_state.json`` into the checkpoint folder are not read: the warm start then starts
cold, which costs a few forwards, never a wrong number.

With ``probe="train"`` there is no probe: each row is measured on its step's own training
batch, every micro-batch of the step under gradient accumulation (recorded by a forward
pre-hook on the model while it trains, ``num_items_in_batch`` left out so that each
micro-batch's loss is its mean), at ``on_pre_optimizer_step``: after the backward and the
Trainer's clipping, before ``optimizer.step()``. Critical sharpness then follows the update the
step is about to make from the gradient it computed, and spends no backward (Kalra et al.'s
definition). The row of the update that starts from step ``k``'s parameters has ``step`` k, as
a fixed-probe row at ``on_step_end`` of step ``k`` does. Under data parallelism each rank
measures its own micro-batches and the losses are summed over ranks.

The loss measured is the one the Trainer trains on. A Trainer with ``label_smoothing_factor``
or ``compute_loss_func`` takes the labels out of the batch and computes its loss from the
outputs: a callback bound with :meth:`SharpnessCallback.attach` measures that loss
(:class:`TrainerLoss`), and under ``probe="train"`` keeps the labels the model's forward never
sees. An unbound callback cannot see ``compute_loss_func``, and refuses label smoothing when
training begins; a Trainer subclass that overrides ``compute_loss`` is measured on what the
Trainer would compute without the override (its ``compute_loss`` may record metrics, so it is
never called), with a :class:`TrainerLossWarning`. ``loss_fn=`` overrides all of these.

Example::

    trainer = Trainer(model=model, args=args, train_dataset=train)
    SharpnessCallback.attach(trainer, schedule=Schedule(every=25))
    SharpnessCallback.attach(trainer, probe="train")  # on each step's own batch
    trainer.train()
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import warnings
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import WandbCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from sharpmeter.measure.distributed import collective, honour_timeout, is_distributed, local_shard
from sharpmeter.measure.loss import (
    MicroBatches,
    loss_token_count,
    move_to,
    shifts_labels,
    split_probe,
)
from sharpmeter.measure.meter import SharpnessMeter
from sharpmeter.measure.options import TRAIN_PROBE, MeterOptions, resolve_options
from sharpmeter.measure.rng import fork_rng
from sharpmeter.measure.schema import RUN_FILE
from sharpmeter.measure.sinks import (
    JsonlSink,
    LoggingFailures,
    WandbSink,
    numeric_items,
    run_metadata,
    wandb_mode,
)

PREFIX = "sharpness/"
# The meter's warm start and schedule position, kept in TrainerState.stateful_callbacks so that
# every checkpoint's trainer_state.json carries them. Not a callback class name, and the callback
# is no ExportableState: restore_callback_states_from_checkpoint rebuilds such a callback as
# type(callback)(**args) from JSON and drops the one that was added, which here would lose the
# probe batch, the loss function, the schedule and the binding to the trainer (none is JSON).
# The Trainer then logs that it ignores "sharpmeter"; on_train_begin reads the state itself.
STATE_KEY = "sharpmeter"
# In that state: the JSONL file the run that saved the checkpoint wrote, so that a run resumed
# from it in another folder starts its file with that run's rows.
ROWS_KEY = "jsonl"
# And the folder it saved its checkpoints in: Trainer.train(resume_from_checkpoint=...) does not
# hand the checkpoint over, but with the step this names it.
SAVED_IN_KEY = "output_dir"
# The console line: these columns, when the row has them, with their quality.
SUMMARY = (
    ("critical_sharpness", None, "critical"),
    ("hessian_trace", "hessian_trace_stderr", "trace"),
    ("lambda_max", None, "lambda_max"),
    ("preconditioned_lambda_max", None, "precond"),
    ("directional_sharpness", None, "directional"),
)
_DEFAULT_DDP_TIMEOUT = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}[
    "ddp_timeout"
]


class SharpnessCallback(TrainerCallback):
    """Measure sharpness during ``Trainer.train()``.

    Args:
        probe_batch: a fixed batch (already collated) or ``None`` to draw ``probe_size``
            examples from the training set at the start of training, picked with
            ``probe_seed`` by a private generator.
        options: a :class:`~sharpmeter.measure.options.MeterOptions` (default: its defaults).
        jsonl_path: where rows go (default ``<output_dir>/sharpness.jsonl``).
        run_name: the ``run`` field of every row (default: ``args.run_name`` or the output
            folder's name).
        **changes: :class:`~sharpmeter.measure.options.MeterOptions` fields that override
            ``options`` (``measures``, ``schedule``, ``loss_fn``, ``probe_size``, ...).
            ``max_grad_norm`` left at ``None`` is the Trainer's, ``progress`` at ``None``
            follows the Trainer's progress bars.

    A drawn probe from a streaming dataset needs a re-iterable stream; under data parallelism
    rank 0 draws it and broadcasts it (see the module docstring). A logger that raises while a
    row is logged gives a :class:`~sharpmeter.measure.sinks.SinkWarning` (when logging starts
    failing and when it works again), and training goes on.

    Resume: the meter's state lives in ``state.stateful_callbacks["sharpmeter"]`` and is
    restored from any checkpoint's ``trainer_state.json``. The callback is not an
    ``ExportableState`` (the Trainer would rebuild it from JSON, without its probe and
    options), so with ``restore_callback_states_from_checkpoint=True`` transformers logs a
    harmless "Checkpoint included callbacks not included in current configuration. Ignoring.
    (sharpmeter)"; the state is restored all the same.

    Raises:
        ValueError: at once for a misspelled or bad option; when training begins for a probe
            whose forward gives no loss (or none can be drawn), or an optimizer a measure
            cannot follow.
        JsonlLockedError: when training begins, another live writer holds the JSONL file.
        CollectiveError: under data parallelism, when a collective fails: another rank is
            stopped, hung or dead (noticed after ``args.ddp_timeout``, which the callback
            applies to the process group when training begins).
    """

    def __init__(
        self,
        probe_batch: Any = None,
        *,
        options: MeterOptions | None = None,
        jsonl_path: str | None = None,
        run_name: str | None = None,
        **changes: Any,
    ) -> None:
        # Checked without a model: building one would draw from the RNG the Trainer just seeded.
        self.options = resolve_options(options, changes)
        if probe_batch is not None:
            if self.options.probe == TRAIN_PROBE:
                raise ValueError("probe='train' measures on each step's batch: give no probe_batch")
            split_probe(probe_batch)
        self.probe_batch = probe_batch
        self.jsonl_path = jsonl_path
        self.run_name = run_name
        self.meter: SharpnessMeter | None = None
        self.sink: JsonlSink | None = None
        self._rows_path: Path | None = None  # where this training's rows go
        self._saved_in: Path | None = None  # where this training's checkpoints go
        self.trainer: Trainer | None = None
        self._wandb: WandbSink | None = None  # set up on the first row that finds a W&B run
        self._logging = LoggingFailures()
        # probe="train": the micro-batches of the current step, and the hook recording them.
        self._step_batches = MicroBatches()
        self._recorder: torch.utils.hooks.RemovableHandle | None = None
        self._labels: Any = None  # the labels of the forward the Trainer is making
        self._unwrap_compute_loss: Any = None

    @classmethod
    def attach(cls, trainer: Trainer, probe_batch: Any = None, **arguments: Any):
        """Create a callback with ``arguments`` (``options=``, option fields, ``jsonl_path=``,
        ...), bind it to ``trainer`` (so rows go through ``Trainer.log``) and add it. Returns
        the callback.

        A Trainer that reports to W&B starts its run when training begins, and without an API
        key wandb would stop to prompt for one (an error where no one can answer): unless
        ``WANDB_MODE`` is set, it is set here by :func:`~sharpmeter.measure.sinks.wandb_mode`
        (offline without a key)."""
        if reports_to_wandb(trainer):
            os.environ.setdefault("WANDB_MODE", wandb_mode())
        callback = cls(probe_batch, **arguments)
        callback.trainer = trainer
        if callback.options.loss_fn is None:
            callback.options = callback.options.replace(loss_fn=trainer_loss(trainer))
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
        # Before the first collective (the probe broadcast) and the Trainer's first step.
        timeout = ddp_timeout(args)
        if timeout is not None:
            honour_timeout(timeout)
        options = self._options_under(args, state)
        if options.loss_fn is None and args.label_smoothing_factor:
            raise ValueError(
                "the Trainer trains on a label-smoothed loss, which an unbound callback cannot "
                "compute: add it with SharpnessCallback.attach(trainer, ...), or pass loss_fn="
            )
        if options.probe == TRAIN_PROBE:
            self.meter = SharpnessMeter(model, options=options)
            self._record_training_batches(model)
        else:
            batch = self.probe_batch
            if batch is None:
                batch = self._draw_probe(train_dataloader, list(model.parameters()))
            # Every rank holds the same global probe; each measures its shard (sums over ranks).
            batch = local_shard(move_to(batch, next(model.parameters()).device))
            self.meter = SharpnessMeter(model, batch, options=options)
        if optimizer is not None:
            self.meter.check_optimizer(optimizer)
        saved = state.stateful_callbacks.get(STATE_KEY)
        if state.global_step > 0 and saved:
            self.meter.load_state_dict(saved)
        self._rows_path = Path(self.jsonl_path or Path(args.output_dir) / RUN_FILE).absolute()
        self._saved_in = Path(args.output_dir).absolute()
        self._publish_state(state)
        if state.is_world_process_zero:
            resumed = saved if state.global_step > 0 and saved else {}
            self._open_sink(args, state, model, self._resumed_after(state, saved), resumed)

    def _open_sink(
        self,
        args: TrainingArguments,
        state: TrainerState,
        model,
        resume_step: int | None,
        saved: Mapping[str, Any],
    ) -> None:
        """The JSONL sink of this training, its metadata saying where a resumed run came from;
        ``saved`` is the meter's state in the checkpoint resumed from (empty: none, or not
        recorded in it).

        Raises:
            JsonlLockedError: another live writer holds the file (before the first step)."""
        if self.sink is not None:
            self.sink.close()  # trained again: the file is taken anew, by this training
        run = self.run_name or args.run_name or Path(args.output_dir).name
        resumed: dict[str, Any] = {}
        checkpoint = None
        if state.global_step > 0:
            checkpoint = resumed_checkpoint(args, state.global_step, saved.get(SAVED_IN_KEY))
            resumed = {
                "resumed_from": None if checkpoint is None else str(checkpoint),
                "resumed_at_step": state.global_step,
            }
        # max_steps: the planned length, so analysis can tell an unfinished run.
        metadata = run_metadata(
            model,
            run=run,
            seed=args.seed,
            probe_seed=self.options.probe_seed,
            max_steps=state.max_steps,
            **resumed,
        )
        # A checkpoint of another run: its rows up to the resume start this file.
        earlier = saved.get(ROWS_KEY)
        if earlier is None and checkpoint is not None:
            earlier = checkpoint.parent / RUN_FILE
        self.sink = JsonlSink(
            self._rows_path, metadata, resume_step=resume_step, resume_rows_from=earlier
        )
        if resume_step is not None:
            _report_resumed_head(self.sink, checkpoint, state.global_step, resume_step)

    def _resumed_after(self, state: TrainerState, saved: Any) -> int | None:
        """The last row the checkpoint resumed from had taken (the rows after it, which the
        run that wrote them went on to measure, are measured again), or None for a fresh run.
        A training-batch row of step ``k`` is taken in the next step, after checkpoint ``k``
        was saved; so is a row of any schedule that was not due at ``k``."""
        if state.global_step == 0:
            return None
        if saved:
            return self.meter.last_step  # None: nothing was measured before the checkpoint
        return state.global_step - (1 if self.meter.on_training_batches else 0)

    def _options_under(self, args: TrainingArguments, state: TrainerState) -> MeterOptions:
        """The options with what was left to the Trainer filled in from it: its gradient
        clipping, and a progress bar where it shows its own."""
        filled: dict[str, Any] = {}
        if self.options.max_grad_norm is None:
            filled["max_grad_norm"] = args.max_grad_norm or None
        if self.options.progress is None:
            filled["progress"] = state.is_world_process_zero and not args.disable_tqdm
        return self.options.replace(**filled)

    def _draw_probe(self, dataloader, params: list[torch.Tensor]) -> Any:
        """The global probe: drawn here in one process, by rank 0 under data parallelism; the
        random streams of the devices holding ``params`` (the model's) are forked too."""
        if dataloader is None:
            raise ValueError("no probe_batch given and no train dataloader to draw one from")
        if is_distributed():
            return self._probe_from_rank_zero(dataloader, params)
        return self._draw_probe_here(dataloader, params)

    def _probe_from_rank_zero(self, dataloader, params: list[torch.Tensor]) -> Any:
        """Rank 0's probe on every rank. Ranks may see different data (a stream sharded by
        rank, a dataset that depends on the rank), yet every rank must measure its shard of
        one global probe. Rank 0 sends the probe or why it could not draw one, so that no rank
        waits for a probe that never comes; the others read nothing and draw no random number.
        """
        payload: list[Any] = [None]
        failure: Exception | None = None
        if dist.get_rank() == 0:
            try:
                payload = [(self._draw_probe_here(dataloader, params), None)]
            except Exception as error:  # sent to the other ranks, then raised here
                failure = error
                payload = [(None, f"{type(error).__name__}: {error}")]
        with collective("the probe broadcast"):
            dist.broadcast_object_list(payload, src=0)
        if failure is not None:
            raise failure
        batch, reason = payload[0]
        if reason is not None:
            raise ValueError(f"rank 0 could not draw the probe ({reason})")
        return batch

    def _draw_probe_here(self, dataloader, params: list[torch.Tensor]) -> Any:
        """``probe_size`` examples collated by a copy of the training collator, every RNG
        forked (CUDA's on the devices of ``params``, where a collator may draw too): training
        draws the numbers it would have drawn without us."""
        try:
            collate = copy.deepcopy(dataloader.collate_fn)
        except Exception as error:
            raise ValueError(
                f"cannot copy the training collator to draw a probe without advancing its "
                f"random state ({type(error).__name__}: {error}): pass probe_batch="
            ) from error
        with fork_rng(params):
            return collate(self._probe_examples(dataloader.dataset))

    def _probe_examples(self, dataset) -> list[Any]:
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            # A stream has no indices: its first examples, from an iterator of our own.
            examples = list(itertools.islice(iter(dataset), self.options.probe_size))
            if not examples:
                raise ValueError(
                    "the training stream gave no example for the probe: pass probe_batch="
                )
            return examples
        generator = torch.Generator().manual_seed(self.options.probe_seed)
        count = min(self.options.probe_size, len(dataset))
        indices = torch.randperm(len(dataset), generator=generator)[:count].tolist()
        return [dataset[i] for i in indices]

    def _record_training_batches(self, model: torch.nn.Module) -> None:
        """Keep every batch the model is trained on (a forward in train mode with gradients;
        not evaluation, not our own measuring forwards) until the step's optimizer step."""

        def record(module, args, kwargs):
            if module.training and torch.is_grad_enabled():
                batch = _as_batch(args, kwargs)
                if self._labels is not None and isinstance(batch, dict):
                    batch.setdefault("labels", self._labels)
                self._step_batches.append(batch)

        self._remove_recorder()
        self._recorder = model.register_forward_pre_hook(record, with_kwargs=True)
        if self.trainer is not None:
            self._keep_labels(self.trainer)

    def _keep_labels(self, trainer: Trainer) -> None:
        """A Trainer may take the labels out of the batch before its forward (label smoothing,
        ``compute_loss_func``, a subclass's ``compute_loss``), where the recorder would miss
        them: a wrapper of this trainer's ``compute_loss`` hands them over for the forward it
        makes, whatever loss the rows are measured on."""
        compute_loss = trainer.compute_loss

        def keeping_labels(model, inputs, *args, **kwargs):
            self._labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
            try:
                return compute_loss(model, inputs, *args, **kwargs)
            finally:
                self._labels = None

        own = trainer.__dict__.get("compute_loss")  # an instance's own, or the class's method
        trainer.compute_loss = keeping_labels

        def unwrap() -> None:
            if trainer.__dict__.get("compute_loss") is not keeping_labels:
                return  # wrapped again since (another callback): its wrapper calls ours
            if own is None:
                del trainer.compute_loss
            else:
                trainer.compute_loss = own

        self._unwrap_compute_loss = unwrap

    def _remove_recorder(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
        if self._unwrap_compute_loss is not None:
            self._unwrap_compute_loss()
            self._unwrap_compute_loss = None
        self._step_batches = MicroBatches()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_batches = MicroBatches()
        return control

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer=None,
        **kwargs,
    ):
        """``probe="train"``: the step's gradient is complete and clipped, the optimizer has
        not stepped: the row of the parameters of ``state.global_step``, on this step's
        batches."""
        if self._recorder is None or self.meter is None:
            return control
        batches, self._step_batches = self._step_batches, MicroBatches()
        if batches and self.meter.is_due(state.global_step):
            self._take_row(args, state, control, optimizer, batches)
        return control

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
        if self._recorder is None and self.meter.is_due(state.global_step):
            self._take_row(args, state, control, optimizer)
        # Before the Trainer saves a checkpoint of this step, which follows on_step_end.
        self._publish_state(state)
        return control

    def _take_row(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any,
        batches: list[Any] | None = None,
    ) -> None:
        """Measure (on ``batches`` under ``probe="train"``), write and log the row."""
        row = self.meter.measure(state.global_step, optimizer=optimizer, batch=batches)
        if self.sink is not None:
            self.sink.write(row)
        self._log(row, state, control)
        if state.is_world_process_zero and not args.disable_tqdm:
            tqdm.write(summary_line(row))

    def on_train_end(self, args, state, control, **kwargs):
        # Only a normal end comes here: a run that raised keeps "finished": false, and its
        # sink reports rows it could not write when it is collected (JsonlSink).
        self._remove_recorder()
        if self.sink is not None:
            self.sink.mark_finished()
            self.sink.close()
        if self._wandb is not None:
            self._wandb.close()  # the run is the user's: closing it never finishes it
            self._wandb = None
        return control

    def _publish_state(self, state: TrainerState) -> None:
        # Where a run resumed elsewhere finds its head, and the checkpoint it resumed from.
        origin = {ROWS_KEY: str(self._rows_path), SAVED_IN_KEY: str(self._saved_in)}
        state.stateful_callbacks[STATE_KEY] = {**self.meter.state_dict(), **origin}

    def _log(self, row: dict[str, Any], state: TrainerState, control: TrainerControl) -> None:
        """Send a row's numbers to the loggers; one that raises never stops training
        (:class:`~sharpmeter.measure.sinks.LoggingFailures`). Never raises."""
        self._logging.send(state.global_step, lambda: self._send_to_loggers(row, state, control))

    def _send_to_loggers(
        self, row: dict[str, Any], state: TrainerState, control: TrainerControl
    ) -> None:
        """Bound: ``Trainer.log``. Unbound: ``state.log_history``. Then, on the main process
        with a W&B run active that the Trainer does not report to, a :class:`WandbSink`
        writing into that run."""
        logs = numeric_items(row, PREFIX)
        if self.trainer is not None:
            self._log_through_trainer(logs, control)
            if reports_to_wandb(self.trainer):
                return  # the Trainer's WandbCallback has logged the row
        else:
            state.log_history.append({**logs, "step": state.global_step})
        if not state.is_world_process_zero:
            return
        sink = self._wandb_sink()
        if sink is not None:
            # Under the keys the Trainer's WandbCallback gives (train/sharpness/...);
            # non-finite values are left out.
            finite = {k: v for k, v in numeric_items(row).items() if math.isfinite(v)}
            sink.write({**finite, "step": state.global_step})

    def _wandb_sink(self) -> WandbSink | None:
        """The :class:`WandbSink` of the active W&B run, set up on the first row that finds one
        (as transformers' ``WandbCallback`` does: nothing in ``__init__``); ``None`` without
        wandb or an active run. The callback never starts a run of its own; the sink follows
        the active one when it changes. A setup that raises is tried again at the next row."""
        try:
            import wandb
        except ImportError:
            return None
        if wandb.run is None:
            return None
        if self._wandb is None:
            self._wandb = WandbSink(prefix=f"train/{PREFIX}")
        return self._wandb

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


def reports_to_wandb(trainer: Trainer) -> bool:
    """Whether the Trainer logs to W&B itself: its ``WandbCallback`` is there (``report_to``
    with ``"wandb"``, or ``"all"`` with wandb installed, or passed in ``callbacks=``)."""
    return any(isinstance(c, WandbCallback) for c in trainer.callback_handler.callbacks)


def ddp_timeout(args: TrainingArguments) -> timedelta | None:
    """The ``ddp_timeout`` the user chose, as a ``timedelta``; None when it is the default
    (30 minutes, torch's own): a group made with a longer timeout of the user's is then kept."""
    if args.ddp_timeout == _DEFAULT_DDP_TIMEOUT:
        return None
    delta = getattr(args, "ddp_timeout_delta", None)
    return delta if isinstance(delta, timedelta) else timedelta(seconds=args.ddp_timeout)


def resumed_checkpoint(
    args: TrainingArguments, step: int, saved_in: str | None = None
) -> Path | None:
    """The checkpoint folder a run resumed at ``step`` came from, as far as the callback can
    tell (the Trainer does not hand it over): ``args.resume_from_checkpoint`` when it names a
    folder, else the checkpoint of that step in ``saved_in`` (where the run that saved it saved
    its checkpoints), else the output folder's own; None when none exists."""
    folders = [
        Path(folder) / f"checkpoint-{step}" for folder in (saved_in, args.output_dir) if folder
    ]
    for candidate in (args.resume_from_checkpoint, *folders):
        if isinstance(candidate, (str, Path)) and Path(candidate).is_dir():
            return Path(candidate)
    return None


def _report_resumed_head(
    sink: JsonlSink, checkpoint: Path | None, step: int, resume_step: int
) -> None:
    """Warns when the rows up to the resume are not this file's own: copied from the
    checkpoint's run, or missing (the curve then starts after the resume)."""
    if sink.resumed_rows is None or sink.resumed_rows_from == sink.path:
        return  # the run's own rows are kept (or the file cannot be written yet)
    origin = (
        f"checkpoint {checkpoint}" if checkpoint is not None else f"a checkpoint of step {step}"
    )
    if sink.resumed_rows_from is not None:
        done = f"its {sink.resumed_rows} rows up to step {resume_step} were copied from "
        done += f"{sink.resumed_rows_from}"
    else:
        done = (
            f"no rows up to step {resume_step} were found for it, so the curve in {sink.path} "
            "starts after the resume (its metadata records resumed_from)"
        )
        if sink.resume_source_error is not None:
            done += f"; the rows of its run could not be read ({sink.resume_source_error})"
    warnings.warn(
        f"sharpmeter: training resumed from {origin}; {done}", RuntimeWarning, stacklevel=4
    )


def summary_line(row: dict[str, Any]) -> str:
    """One short console line for a row: the values measured, their quality, the status.

    A standard error is shown only when it is finite: "± nan" would read as a number."""
    parts = []
    for column, error, label in SUMMARY:
        value = row.get(column)
        if not isinstance(value, float) or math.isnan(value):
            continue
        spread = row.get(error) if error else None
        shown = isinstance(spread, (int, float)) and math.isfinite(spread)
        parts.append(f"{label} {value:.4g}" + (f" ± {spread:.2g}" if shown else ""))
    seconds = row.get("wall_seconds", math.nan)
    return (
        f"sharpness step {row['step']}: "
        + (", ".join(parts) or "no value")
        + f" [{row.get('status')}, {seconds:.1f} s]"
    )


class TrainerLossWarning(UserWarning):
    """The Trainer's loss may not be the one measured (a subclass overrides ``compute_loss``)."""


class TrainerLoss:
    """The loss a Trainer with label smoothing or ``compute_loss_func`` trains on, as a
    ``loss_fn``: ``Trainer.compute_loss`` (the base class's, never an override) on a copy of the
    batch, whose labels it takes out. Its ``num_items_in_batch`` is the batch's own loss-token
    count, so that a loss summed over tokens and divided by it, as transformers asks of a
    ``compute_loss_func``, is the batch's mean (the meter weighs batches by their loss tokens
    itself); the Trainer's rescaling for ``average_tokens_across_devices`` is off during the
    call, since the meter sums ranks' shares itself.

    Example::

        loss_fn = TrainerLoss(trainer)    # what SharpnessCallback.attach picks by itself
        loss = loss_fn(model, batch)      # label-smoothed, as the Trainer computes it
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("the Trainer computes its loss from labels: the batch has none")
        count = torch.tensor(loss_token_count(batch, shifts_labels(model)), device=labels.device)
        args = self.trainer.args
        averaging = args.average_tokens_across_devices
        args.average_tokens_across_devices = False
        try:
            return Trainer.compute_loss(self.trainer, model, dict(batch), num_items_in_batch=count)
        finally:
            args.average_tokens_across_devices = averaging


def trainer_loss(trainer: Trainer) -> TrainerLoss | None:
    """The ``loss_fn`` that measures what ``trainer`` trains on: :class:`TrainerLoss` when it
    computes its loss outside the model (label smoothing, ``compute_loss_func``), ``None`` (the
    model's ``.loss``) otherwise. A subclass's own ``compute_loss`` is never called (it may
    record metrics or hold state): a :class:`TrainerLossWarning` says so."""
    if getattr(type(trainer), "compute_loss", Trainer.compute_loss) is not Trainer.compute_loss:
        warnings.warn(
            f"{type(trainer).__name__} overrides compute_loss; sharpmeter measures the loss "
            "Trainer.compute_loss would give (the model's .loss, or the Trainer's label "
            "smoothing or compute_loss_func). If yours trains on another loss, pass loss_fn=",
            TrainerLossWarning,
            stacklevel=3,
        )
    outside = getattr(trainer, "label_smoother", None) or getattr(
        trainer, "compute_loss_func", None
    )
    return TrainerLoss(trainer) if outside is not None else None


def _as_batch(args: tuple, kwargs: dict[str, Any]) -> Any:
    """A training forward's inputs as a batch the meter calls the model with. The Trainer's
    ``num_items_in_batch`` (the step's loss-token count, which makes a micro-batch's loss a
    share of the step's) is left out: the meter weighs each micro-batch's mean loss itself."""
    if kwargs:
        return {key: value for key, value in kwargs.items() if key != "num_items_in_batch"}
    return args[0] if len(args) == 1 else tuple(args)
