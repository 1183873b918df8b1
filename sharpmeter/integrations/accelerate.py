"""``accelerate`` integration for hand-written training loops: the same meter, a few lines.

Every rank builds the meter on the same global probe batch and measures its shard of it
(losses and HVPs are summed over ranks, so every rank gets the same numbers); only the main
process writes the JSONL file and logs to W&B.

Example (``accelerate launch --multi_gpu --num_processes 2 train.py``)::

    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    meter = AcceleratedMeter(
        accelerator, model, probe_batch, jsonl_path="runs/a/sharpness.jsonl", max_steps=1000
    )
    for step, batch in enumerate(loader, start=1):
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        meter.step(step, optimizer)     # measures when the schedule says so
    meter.close()                       # the metadata then says the run finished

Resuming from a checkpoint saved after step ``k`` (``accelerator.load_state``), pass
``resume_step=k``: the rows up to ``k`` stay and the curve goes on from there (without it the
rerun is a new run, and the earlier file is moved aside to ``sharpness.1.jsonl``)::

    accelerator.load_state("runs/a/checkpoint-200")
    meter = AcceleratedMeter(accelerator, model, probe_batch, jsonl_path=..., resume_step=200)
    for step, batch in enumerate(loader, start=201):
        ...

With ``probe="train"`` there is no probe batch: each row is measured on the step's own batch
(this rank's; under gradient accumulation the list of its micro-batches) along the update the
optimizer is about to make from the step's gradient, so ``step`` goes between the backward
(and clipping) and ``optimizer.step()``::

    meter = AcceleratedMeter(accelerator, model, probe="train", jsonl_path="runs/a/sharpness.jsonl")
    for step, batch in enumerate(loader):
        accelerator.backward(model(**batch).loss)
        meter.step(step, optimizer, batch=batch)    # before the update
        optimizer.step()
        optimizer.zero_grad()

Under gradient accumulation (``Accelerator(gradient_accumulation_steps=k)``) call it for every
micro-batch, counting optimizer steps; a row is taken where the accumulated step completes::

    step = 0
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            meter.step(step, optimizer, batch=batch)    # measures the step's k micro-batches
            optimizer.step()
            optimizer.zero_grad()
        step += accelerator.sync_gradients
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from accelerate import Accelerator

from sharpmeter.measure.distributed import local_shard
from sharpmeter.measure.loss import MicroBatches, move_to
from sharpmeter.measure.meter import SharpnessMeter
from sharpmeter.measure.options import TRAIN_PROBE, MeterOptions, resolve_options
from sharpmeter.measure.schema import RUN_FILE
from sharpmeter.measure.sinks import JsonlSink, LoggingFailures, WandbSink, run_metadata


class AccumulationWarning(UserWarning):
    """``AcceleratedMeter.step`` is called in a way gradient accumulation makes lose rows or
    mix a row's micro-batches with another gradient."""


class AcceleratedMeter:
    """A :class:`SharpnessMeter` on an ``accelerate``-prepared model, with its sinks.

    Args:
        accelerator: the loop's ``Accelerator``.
        model: the prepared (possibly DDP-wrapped) model; the meter measures the unwrapped one.
        probe_batch: the global probe batch, identical on every rank (none under
            ``probe="train"``).
        jsonl_path: the JSONL file the main process writes.
        wandb: also log to W&B: into the active run (the one active at each row, if the
            user replaces it), else into one the meter starts (offline without an API key
            or when it cannot start online). A failed log is a :class:`SinkWarning`.
        run_name: the ``run`` field of every row.
        max_steps: the loop's planned number of steps, written into the metadata: analysis
            puts step ``s`` at ``t = s / max_steps``, so a run killed midway is not stretched
            over the whole axis (without it, ``t = s / last step logged``).
        optimizer: the loop's optimizer, to refuse at once one a measure cannot follow (the
            ``preconditioned`` measure needs Adam) instead of failing every row.
        resume_step: when the loop resumes from a checkpoint (``accelerator.load_state``)
            saved after step ``resume_step``, the rows up to it are kept and those the
            stopped run measured after it are dropped (the resumed loop measures them again),
            so the curve goes on without a gap or a duplicate. Without it the file is a new
            run's: an earlier run's rows are moved aside (``sharpness.1.jsonl``), never mixed
            in. The meter's warm start is not in the checkpoint: the first row after the
            resume starts cold, which costs a few forwards, never a wrong number.
        options: a :class:`~sharpmeter.measure.options.MeterOptions` (default: its defaults).
        **changes: :class:`~sharpmeter.measure.options.MeterOptions` fields that override
            ``options``.

    Raises:
        JsonlLockedError: another live writer (another meter, process) holds ``jsonl_path``.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        probe_batch: Any = None,
        *,
        jsonl_path: str | os.PathLike = RUN_FILE,
        wandb: bool = False,
        run_name: str | None = None,
        max_steps: int | None = None,
        optimizer: Any = None,
        resume_step: int | None = None,
        options: MeterOptions | None = None,
        **changes: Any,
    ) -> None:
        if max_steps is not None and (not _is_int(max_steps) or max_steps <= 0):
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        if resume_step is not None and (not _is_int(resume_step) or resume_step < 0):
            raise ValueError(f"resume_step must be a step (an integer >= 0), got {resume_step!r}")
        self.accelerator = accelerator
        unwrapped = accelerator.unwrap_model(model)
        options = resolve_options(options, changes)
        if options.probe == TRAIN_PROBE or probe_batch is None:
            batch = probe_batch  # the meter refuses what does not match the probe option
        else:
            batch = local_shard(move_to(probe_batch, accelerator.device))
        self.meter = SharpnessMeter(unwrapped, batch, options=options)
        if optimizer is not None:
            self.meter.check_optimizer(optimizer)
        self.jsonl: JsonlSink | None = None
        self.wandb_sink: WandbSink | None = None
        self._wandb_failures = LoggingFailures(" to W&B")
        self._micro_batches = MicroBatches()  # probe="train": the step's, until it completes
        self._group_step: int | None = None  # the step of this accumulated step's micro-batches
        self._warned_step = self._warned_batch = False
        if accelerator.is_main_process:
            metadata = run_metadata(
                unwrapped,
                run=run_name or os.path.basename(os.path.dirname(jsonl_path) or "."),
                world_size=accelerator.num_processes,
                max_steps=max_steps,
                **({} if resume_step is None else {"resumed_at_step": resume_step}),
            )
            self.jsonl = JsonlSink(jsonl_path, metadata, resume_step=resume_step)
            if wandb:
                self.wandb_sink = WandbSink(name=run_name)

    def step(self, step: int, optimizer: torch.optim.Optimizer, batch: Any = None) -> dict | None:
        """Measure if ``step`` is due; returns the row or None. With a fixed probe after
        ``optimizer.step()``; under ``probe="train"`` before it, given the step's ``batch``.

        Under ``accelerator.accumulate(model)`` call it for every micro-batch, with ``step``
        the number of optimizer steps: a micro-batch whose backward does not complete the
        accumulated gradient (``accelerator.sync_gradients`` false: the optimizer's step does
        nothing, and under DDP the gradients are this rank's alone) is not measured, and under
        ``probe="train"`` its batch joins the step's, whose row is measured on all of them at
        the micro-batch that completes it. Its loss weighs them by their loss tokens (as the
        Trainer does); accelerate's backward weighs each micro-batch's mean equally (and a
        last step of r < k micro-batches by r/k), so with micro-batches of unequal token
        counts the row's ``grad_norm`` is the step's, not its loss's. A step that changes
        within an accumulated step, or a completed step given fewer micro-batches than it
        accumulated, gives an :class:`AccumulationWarning`, once.

        Raises :class:`~sharpmeter.measure.distributed.CollectiveError` when another rank is
        stopped, hung or dead (after the process group's timeout:
        ``InitProcessGroupKwargs(timeout=)``).
        """
        if batch is not None and self.meter.on_training_batches:
            self._micro_batches.append(batch)  # one micro-batch, whatever its container
        self._check_steps_count_updates(step)
        if not getattr(self.accelerator, "sync_gradients", True):
            return None
        batches, self._micro_batches = self._micro_batches, MicroBatches()
        self._group_step = None
        if self.meter.on_training_batches:
            self._check_every_micro_batch_given(len(batches))
        if not self.meter.is_due(step):
            return None
        row = self.meter.measure(step, optimizer=optimizer, batch=batches or batch)
        if self.jsonl is not None:
            self.jsonl.write(row)
        if self.wandb_sink is not None:
            self._wandb_failures.send(row["step"], lambda: self.wandb_sink.write(row))
        return row

    def _check_steps_count_updates(self, step: int) -> None:
        """Warn once when ``step`` changes between micro-batches of one accumulated step: it
        counts micro-batches then, and the schedule's grid, which is on the updates, may never
        meet a micro-batch that completes one (rows lost without a word)."""
        if self._group_step is None:
            self._group_step = step
        elif step != self._group_step and not self._warned_step:
            self._warned_step = True
            warnings.warn(
                f"AcceleratedMeter.step got step {self._group_step}, then {step}, within one "
                "accumulated optimizer step: pass the count of optimizer steps (the schedule's "
                "grid is on it), or rows are skipped",
                AccumulationWarning,
                stacklevel=3,
            )

    def _check_every_micro_batch_given(self, given: int) -> None:
        """Warn once when a completed step had fewer micro-batches given than it accumulated
        (``step`` called only where ``accelerator.sync_gradients``): its row then measures
        the last micro-batches against the gradient of all of them."""
        expected = getattr(self.accelerator, "gradient_accumulation_steps", 1)
        state = getattr(self.accelerator, "gradient_state", None)
        if given >= expected or getattr(state, "end_of_dataloader", False) or self._warned_batch:
            return
        self._warned_batch = True
        warnings.warn(
            f"the step's gradient accumulated {expected} micro-batches but step() was given "
            f"{given}: call it at every micro-batch, or pass the step's micro-batches as a list",
            AccumulationWarning,
            stacklevel=3,
        )

    def close(self) -> None:
        """End the run normally: record in the metadata that it finished (a run that never
        gets here reads as unfinished), write what a full disk held back (warning about what
        is lost) and end a W&B run this meter started."""
        if self.jsonl is not None:
            self.jsonl.mark_finished()
            self.jsonl.close()
        if self.wandb_sink is not None:
            self.wandb_sink.close()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
