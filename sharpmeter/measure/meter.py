r"""SharpnessMeter: a schedule and a set of estimators, one flat record per measurement.

A measurement runs inside :func:`sharpmeter.measure.context.measurement` on a fixed probe batch, so
training is never changed by it, and it never raises: a failed estimator leaves NaN in its
columns and says why in its ``*_status`` column. The exception is data parallelism, where the
ranks must take the same collectives in step: a failed collective (another rank is stopped,
hung or dead) or an estimator that raised on one rank ends the run with a
:class:`~sharpmeter.measure.distributed.CollectiveError` saying so, since no rank could go on
measuring (or training) in step with the others.

The record (a flat ``dict`` of floats, ints, bools and strings; every row of a meter has the
same keys, a failed one NaN where it has no value):

=============================  ==========================================================
``step``, ``lr``               training step; learning rate of the next update (first group)
``probe``                      ``fixed`` (the probe batch of the run) or ``train`` (the step's
                               training batch and gradient, ``MeterOptions.probe``)
``loss``, ``grad_norm``        probe loss :math:`L(\theta)` and :math:`\lVert g\rVert`
``loss_noise_floor``           :math:`\epsilon|L|`, :math:`\epsilon` of the coarsest dtype the loss
                               passes through (the parameters' storage, the network's
                               activations, the loss): loss changes below it are rounding
``critical_sharpness``         :math:`\lambda_c = 2/\eta_c` along the optimizer's update direction
``critical_eta[_lo,_hi]``      :math:`\eta_c` and its bracket; ``critical_num_forward``
``stability_ratio``            :math:`\mathrm{lr}\,\lambda_c/2 = \mathrm{lr}/\eta_c`: above 1 the
                               next step raises the probe loss
``directional_sharpness``      :math:`d^\top H d / d^\top g` (one HVP)
``hessian_trace[_stderr]``     Hutchinson or Hutch++ with its standard error
``lambda_max[_residual]``      top Hessian eigenvalue by Lanczos, residual, ``_converged``
``preconditioned_lambda_max``  top eigenvalue of :math:`P^{-1/2} H P^{-1/2}`, :math:`P` the
                               preconditioner of the measured Adam step; ``_residual``,
                               ``_converged``
``*_num_matvecs``              HVPs spent per estimator; ``wall_seconds`` in total
``skipped_for_budget``         grid steps left out since the previous row because a
                               schedule's measures were over its time budget (one per
                               schedule and step)
``*_status``                   ``ok``, or why the measure has no trustworthy value
                               (``no_increase``, ``not_converged``, ``nonfinite``,
                               ``no_direction: ...``, ``error: ...``; the value is then NaN
                               or, for Lanczos, unconverged), or ``not_due``: its schedule
                               did not call for it at this step (NaN)
``status``                     ``ok`` only when every measure taken is; else ``error: <measures>``
                               (an estimator raised) or ``incomplete: <measures>``; a row
                               that failed as a whole, before its measures: a bare
                               ``nonfinite`` (the probe loss) or ``error``, each measure's
                               status saying the same
``error``                      why a whole row failed (``None`` otherwise)
=============================  ==========================================================

Schedules: each measure follows its own (``MeterOptions.schedules``, else ``schedule``, else
the default of its kind), so critical sharpness can be dense while the Hessian-vector-product
measures are sparse; a row holds the measures due at its step. Each schedule's budget is
charged what its measures took, and the row's shared work (the probe gradient, the Hessian
operator) in proportion.

Warm starts: each measurement starts the line search at the previous ``ok`` :math:`\eta_c`
(a failed row seeds nothing). Lanczos starts cold every row: from the previous top
eigenvector it would stop on that vector after a new direction has grown sharper.

Example::

    meter = sm.SharpnessMeter(model, probe_batch, schedule=sm.Schedule(every=50))
    for step, batch in enumerate(loader):
        loss = model(**batch).loss
        loss.backward()
        if meter.is_due(step):
            print(meter.measure(step, optimizer=optimizer))
        optimizer.step()
        optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sharpmeter.measure.context import ParametersWrittenError, measurement
from sharpmeter.measure.directions import (
    DirectionUnavailable,
    check_adam_type,
    learning_rate,
    pending_gradient_scale,
    update_direction,
)
from sharpmeter.measure.distributed import (
    NO_FSDP_HVP,
    CollectiveError,
    agree_on_failure,
    check_not_fsdp1,
    collective,
    is_distributed,
    is_sharded,
    local,
)
from sharpmeter.measure.loss import LossFn, ProbeLoss, probe_loss_and_gradient, split_probe
from sharpmeter.measure.measures import (
    MEASURE_BY_NAME,
    Measure,
    Outcome,
    RowContext,
    WarmStart,
)
from sharpmeter.measure.operators import HessianOperator, NonFiniteLossError
from sharpmeter.measure.options import TRAIN_PROBE, MeterOptions, resolve_options
from sharpmeter.measure.params import (
    all_finite,
    flatten,
    norm,
    resolve_params,
    storage_eps,
    unflatten,
    vector_dtype,
    zeros_for_unused,
)
from sharpmeter.measure.schedule import Ledger, ledgers
from sharpmeter.measure.schema import NONFINITE, NOT_DUE

PROGRESS_DELAY = 2.0  # seconds before a measurement shows its bar: short ones stay quiet
# What every row has besides its measures' columns, NaN where the row failed before them.
ROW_COLUMNS = ("lr", "loss", "grad_norm", "loss_noise_floor")


class SharpnessMeter:
    """Measures sharpness of ``model`` on a fixed probe batch, on a schedule.

    Args:
        model: the (unwrapped) module being trained.
        probe_batch: one batch or a list of batches, kept fixed for the whole run.
        loss_fn: ``(model, batch) -> scalar``, the same as ``loss_fn=`` among the options.
        options: a :class:`~sharpmeter.measure.options.MeterOptions` (default: its defaults).
        **changes: :class:`~sharpmeter.measure.options.MeterOptions` fields that override
            ``options`` (``measures=``, ``schedule=``, ``lanczos_max_iter=``, ...).

    Construction runs one probe forward (RNG, buffers and modes restored), so that a probe
    that gives no loss fails here rather than once per measurement.

    Raises:
        ValueError: an unknown option or measure, a bad value, a probe whose forward gives no
            scalar loss (no ``.loss`` in the output and no ``loss_fn``), a measure that needs
            Hessian-vector products on a model sharded by FSDP (only ``critical`` works there).
    """

    def __init__(
        self,
        model: nn.Module,
        probe_batch: Any = None,
        loss_fn: LossFn | None = None,
        *,
        options: MeterOptions | None = None,
        **changes: Any,
    ) -> None:
        if loss_fn is not None:
            changes["loss_fn"] = loss_fn
        self.options = resolve_options(options, changes)
        self.model = model
        self.probe_batch = probe_batch
        self.chosen: tuple[Measure, ...] = tuple(MEASURE_BY_NAME[m] for m in self.measures)
        check_not_fsdp1(model)
        self.params = resolve_params(model, self.options.params)
        hvp_measures = [m.name for m in self.chosen if m.needs_hvp]
        # is_sharded also refuses parameter layouts that nothing can measure
        if is_sharded(self.params) and hvp_measures:
            raise ValueError(f"cannot measure {hvp_measures} on an FSDP model: {NO_FSDP_HVP}")
        # The Trainer clips by the norm over every trainable parameter's gradient.
        measured = {id(p) for p in self.params}
        self.clips_a_subset = bool(self.options.max_grad_norm) and any(
            id(p) not in measured for p in resolve_params(model)
        )
        # Parameters are copied to the CPU for each measurement until one in the same mode
        # (train or eval) has shown that the model's forwards leave them alone, and for good in
        # a mode where they did not (ParameterGuard): the probe's check below is the first.
        self.clean_modes: set[bool] = set()
        self.rewriting_modes: set[bool] = set()
        self._check_probe_batch()
        self.warm = WarmStart()
        self.ledgers = ledgers({m.name: self.options.schedule_of(m.name) for m in self.chosen})
        self.last_step: int | None = None
        self.skipped_for_budget = 0
        # Lowered to 1 for good once a batched call falls back (out of memory, say): later rows
        # would fail it again, each at the cost of a batched backward.
        self.hvp_products_per_call = self.options.hvp_products_per_call
        # The ledgers is_due found due at a step, for measure() at that step.
        self._due: tuple[int, tuple[Ledger, ...]] | None = None
        self._started = time.perf_counter()

    @property
    def measures(self) -> tuple[str, ...]:
        return self.options.measures

    @property
    def measuring_seconds(self) -> float:
        """Wall time every measurement so far took, in total."""
        return sum(ledger.measuring_seconds for ledger in self.ledgers)

    @property
    def on_training_batches(self) -> bool:
        """Whether each row is measured on its step's training batch (``probe="train"``)."""
        return self.options.probe == TRAIN_PROBE

    def _probe(self, batch: Any = None) -> ProbeLoss:
        batch = self.probe_batch if batch is None else batch
        return ProbeLoss(self.model, self.options.loss_fn, batch, seed=self.options.seed)

    def _check_probe_batch(self) -> None:
        """A fixed probe is given, and one forward of it now gives a scalar loss, so that a
        model without a loss (no ``.loss`` and no ``loss_fn``) is refused here, not once per
        row. Under ``probe="train"`` each row brings its batch, and no probe is given."""
        if self.on_training_batches:
            if self.probe_batch is not None:
                raise ValueError(
                    "probe='train' measures on each step's training batch: give no probe_batch "
                    "and pass the step's batch to measure(step, optimizer, batch=...)"
                )
            return
        try:
            with self._measurement(), torch.no_grad():
                self._probe()()
        except ParametersWrittenError as error:
            warnings.warn(
                f"{error}; every measurement in this mode will copy the parameters to the CPU, put "
                "them back and report an error",
                RuntimeWarning,
                stacklevel=3,
            )

    @contextlib.contextmanager
    def _measurement(self) -> Iterator[None]:
        """:func:`measurement` with the meter's dropout policy, copying the parameters unless a
        measurement in the same mode has shown that the model's forwards leave them alone."""
        mode = self.options.dropout == "train" and self.model.training
        try:
            with measurement(
                self.model, self.options.dropout, copy_parameters=mode not in self.clean_modes
            ) as guard:
                yield
        except ParametersWrittenError:
            self.clean_modes.discard(mode)
            self.rewriting_modes.add(mode)
            raise
        # a write of the same values now (rows within max_norm) may move them later
        if guard.rewrote:
            self.rewriting_modes.add(mode)
        if mode not in self.rewriting_modes:
            self.clean_modes.add(mode)

    def check_optimizer(self, optimizer: Any) -> None:
        """Refuse, before training, an optimizer a chosen measure cannot follow: the
        ``preconditioned`` measure needs Adam's second moments."""
        if "preconditioned" in self.measures:
            check_adam_type(optimizer)

    def is_due(self, step: int) -> bool:
        """Whether some measure's schedule has ``step`` on its grid, not yet measured, within
        its time budget; :meth:`measure` at ``step`` then takes those measures."""
        self._due = None
        if self.last_step is not None and step <= self.last_step:
            return False
        on_grid = [ledger for ledger in self.ledgers if ledger.on_grid(step)]
        if not on_grid:  # the grid is the same on every rank: no collective needed
            return False
        affordable = [ledger.affordable(self.training_seconds) for ledger in on_grid]
        if is_distributed() and any(ledger.schedule.max_fraction for ledger in on_grid):
            # Wall clocks differ between ranks; a measurement is collective, so rank 0 decides.
            decision = torch.tensor(affordable, dtype=torch.int64, device=self.params[0].device)
            with collective("the broadcast of whether a measurement is due"):
                torch.distributed.broadcast(decision, src=0)
            affordable = [bool(flag) for flag in decision.tolist()]
        taken = tuple(ledger for ledger, ok in zip(on_grid, affordable, strict=True) if ok)
        self.skipped_for_budget += len(on_grid) - len(taken)
        self._due = (int(step), taken)
        return bool(taken)

    def measure(
        self,
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        batch: Any = None,
        gradients: Sequence[torch.Tensor | None] | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> dict:
        """One measurement at the current parameters; never changes training, and raises only
        a :class:`~sharpmeter.measure.distributed.CollectiveError` (a failed collective under data
        parallelism: the process group is unusable, so training cannot go on either), or a
        ``ValueError`` for arguments that do not match the probe option.

        Under ``probe="train"``, ``batch`` is the step's training batch (a list of its
        micro-batches under gradient accumulation; under data parallelism this rank's) and
        ``gradients`` the gradient the optimizer is about to step with, one per measured
        parameter (default: their ``.grad``): call it after the backward (and clipping) and
        before ``optimizer.step()``. Critical sharpness then follows the step's own update and
        spends no backward. Gradients that an fp16 loss scaler still scales (``scaler``, the
        loop's ``torch.amp.GradScaler``, or ``optimizer`` accelerate's wrapper with its own,
        before clipping or ``step()`` unscaled them) are divided by its scale, as ``step()``
        will: a plain loop with a ``GradScaler`` passes it here (the optimizer does not know
        its scaler), or calls ``scaler.unscale_(optimizer)`` first.

        With ``optimizer``, critical and directional sharpness follow the update it would
        apply to the probe gradient (:func:`sharpmeter.update_direction`); without, the
        gradient itself (``lr`` is then NaN). After :meth:`is_due` said yes for ``step``, the
        measures whose schedules are due; otherwise every chosen measure. Every row has the
        same keys, in the same order, whatever failed or was not due.
        """
        batch, step_gradients = self._row_inputs(batch, gradients)
        started = time.perf_counter()
        taken_ledgers = self._due[1] if self._due and self._due[0] == step else self.ledgers
        self._due = None
        names = {name for ledger in taken_ledgers for name in ledger.measures}
        taken = tuple(measure for measure in self.chosen if measure.name in names)
        row = self._blank_row(step)
        seconds: dict[str, float] = {}
        try:
            with self._measurement():
                context = self._row_context(optimizer, taken, batch, step_gradients, scaler)
                self._measure_into(row, context, seconds)
            row["status"] = _overall_status(row, taken)
        except CollectiveError:  # the process group is gone: the run must end, saying why
            raise
        except NonFiniteLossError as error:
            _fail(row, taken, NONFINITE, str(error))
        except ParametersWrittenError as error:
            # measured while the parameters moved under the estimators: no value stands
            for measure in taken:
                row.update(dict.fromkeys(measure.columns, math.nan))
                row[measure.status_column] = None
            _fail(row, taken, "error", f"{type(error).__name__}: {error}")
        except Exception as error:  # a measurement must never stop training
            agree_on_failure(error, "a measurement", local(self.params[0]).device)
            _fail(row, taken, "error", f"{type(error).__name__}: {error}")
        for measure in self.chosen:
            if measure not in taken:
                row[measure.status_column] = NOT_DUE
        elapsed = time.perf_counter() - started
        row["wall_seconds"] = elapsed
        row["skipped_for_budget"] = self.skipped_for_budget
        self.skipped_for_budget = 0
        _charge(taken_ledgers, step, elapsed, seconds)
        self.last_step = int(step)
        return row

    def _row_inputs(
        self, batch: Any, gradients: Sequence[torch.Tensor | None] | None
    ) -> tuple[Any, list[torch.Tensor | None] | None]:
        """The row's batch and, under ``probe="train"``, the step's gradient per parameter
        (detached; ``None`` where a parameter has none)."""
        if not self.on_training_batches:
            if batch is not None or gradients is not None:
                raise ValueError(
                    "batch= and gradients= are for probe='train'; this meter measures its "
                    "fixed probe"
                )
            return self.probe_batch, None
        if batch is None:
            raise ValueError(
                "probe='train' measures on the step's training batch: pass "
                "measure(step, optimizer, batch=...)"
            )
        split_probe(batch)
        gradients = [p.grad for p in self.params] if gradients is None else list(gradients)
        if len(gradients) != len(self.params):
            raise ValueError(
                f"got {len(gradients)} gradients for {len(self.params)} measured parameters"
            )
        return batch, [None if g is None else g.detach() for g in gradients]

    def _blank_row(self, step: int) -> dict[str, Any]:
        """A row before measuring: NaN values, no status and no error yet."""
        row: dict[str, Any] = {"step": int(step), "probe": self.options.probe}
        row.update(dict.fromkeys(ROW_COLUMNS, math.nan))
        for measure in self.chosen:
            row.update(dict.fromkeys(measure.columns, math.nan))
            row[measure.status_column] = None
        row.update(status=None, error=None, wall_seconds=math.nan, skipped_for_budget=0)
        return row

    @property
    def training_seconds(self) -> float:
        """Wall time since the meter started (or the run, after a resume), less measuring."""
        return time.perf_counter() - self._started - self.measuring_seconds

    def _measure_into(self, row: dict, context: RowContext, seconds: dict[str, float]) -> None:
        """Take the measures of ``context`` into ``row``, each one's wall seconds into
        ``seconds``."""
        row["lr"] = context.lr
        row["loss"] = context.loss
        row["grad_norm"] = float(norm(context.gradient, self.params))
        row["loss_noise_floor"] = context.rounding_eps * abs(context.loss)
        # HVP measures first: the line search writes the parameters (and restores them), which
        # would make the operator rebuild its graph.
        ordered = sorted(context.measures, key=lambda measure: not measure.needs_hvp)
        bar = tqdm(
            ordered,
            desc="measuring",
            leave=False,
            delay=PROGRESS_DELAY,
            disable=not self.options.progress,
        )
        for measure in bar:
            hvps = context.operator.num_matvecs if context.operator is not None else 0
            bar.set_postfix_str(f"{measure.name}, {hvps} HVPs so far", refresh=False)
            started = time.perf_counter()
            outcome = _take(measure, context)
            seconds[measure.name] = time.perf_counter() - started
            row.update(outcome.values)
            row[measure.status_column] = outcome.status
        if context.operator is not None:
            self.hvp_products_per_call = context.operator.products_per_call

    def _row_context(
        self,
        optimizer: torch.optim.Optimizer | None,
        taken: tuple[Measure, ...],
        batch: Any,
        step_gradients: list[torch.Tensor | None] | None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> RowContext:
        """The row's loss and gradient on ``batch`` (with the Hessian operator when a measure
        taken needs HVPs), the learning rate and the update direction.

        Under ``probe="train"`` the gradient is the step's own (no backward unless an HVP
        measure builds its operator), already clipped as the optimizer will use it, and
        unscaled where an fp16 loss scaler has not unscaled it yet."""
        if step_gradients is not None and optimizer is not None:
            step_gradients = _unscaled(step_gradients, pending_gradient_scale(optimizer, scaler))
        operator = None
        if any(measure.needs_hvp for measure in taken):
            operator = HessianOperator(
                self.model,
                self.options.loss_fn,
                batch,
                params=self.params,
                mode=self.options.hvp_mode,
                seed=self.options.seed,
                products_per_call=self.hvp_products_per_call,
            )
            probe = operator.probe
            loss, gradient = operator.loss, operator.gradient
        elif step_gradients is None:
            probe = self._probe(batch)
            loss, gradient = probe_loss_and_gradient(probe, self.params)
        else:
            probe = self._probe(batch)
            with torch.no_grad():
                loss = probe.reduce(probe().detach())
        if step_gradients is not None:
            grads = zeros_for_unused(step_gradients, self.params)
            gradient = flatten(grads, vector_dtype(self.params))
        if not (torch.isfinite(loss) and all_finite(gradient, self.params)):
            raise NonFiniteLossError(f"the probe loss or gradient is not finite ({float(loss)})")
        if step_gradients is None:
            clips = self._clips_by_global_norm(optimizer, taken)
            clip_norm = self._total_gradient_norm() if clips else None
            max_grad_norm = self.options.max_grad_norm
            gradients = unflatten(gradient, self.params)
        else:
            # The step's gradient is the clipped one the optimizer will step with, and a
            # parameter without one is a parameter the optimizer skips: None, not zeros.
            clip_norm, max_grad_norm = None, None
            gradients = step_gradients
        lr, direction = self._direction(
            optimizer, gradient, gradients, clip_norm, max_grad_norm, taken
        )
        return RowContext(
            meter=self,
            measures=taken,
            batch=batch,
            operator=operator,
            loss=float(loss),
            gradient=gradient,
            lr=lr,
            direction=direction,
            optimizer=optimizer,
            clip_norm=clip_norm,
            rounding_eps=max(probe.loss_eps, probe.compute_eps, storage_eps(self.params)),
        )

    def _clips_by_global_norm(
        self, optimizer: torch.optim.Optimizer | None, taken: tuple[Measure, ...]
    ) -> bool:
        """Whether this row needs :meth:`_total_gradient_norm`: a clipped subset is measured and
        a measure taken follows the optimizer's update. Otherwise the extra backward (and,
        under sharding, its collective) would be spent on a number nothing reads."""
        return (
            self.clips_a_subset
            and optimizer is not None
            and any(measure.follows_update for measure in taken)
        )

    def _total_gradient_norm(self) -> torch.Tensor:
        """The norm clipping divides by: over every trainable parameter, as the Trainer clips,
        even when only a subset is measured (one more backward)."""
        every = resolve_params(self.model)
        return norm(probe_loss_and_gradient(self._probe(), every)[1], every)

    def _direction(
        self,
        optimizer: torch.optim.Optimizer | None,
        gradient: torch.Tensor,
        gradients: list[torch.Tensor | None],
        clip_norm: torch.Tensor | None,
        max_grad_norm: float | None,
        taken: tuple[Measure, ...],
    ) -> tuple[float, torch.Tensor | DirectionUnavailable | None]:
        """The learning rate and the update direction, or why the direction is unavailable
        (the HVP measures that do not need it still run).

        ``update_direction`` raises ``ValueError`` for an optimizer state that has no direction
        per unit rate (the first group's rate 0 while another's is not, none of the measured
        parameters optimized): like an optimizer that cannot be followed, that is a status of
        the direction measures, not a failure of the whole row. No direction is computed when
        no measure taken reads it (a shadow step copies the optimizer's state).
        """
        if optimizer is None:
            return math.nan, gradient
        lr = learning_rate(optimizer)
        if not any(measure.needs_direction for measure in taken):
            return lr, None
        try:
            direction = update_direction(
                optimizer,
                self.params,
                gradients=gradients,
                max_grad_norm=max_grad_norm,
                total_grad_norm=clip_norm,
            )
        except DirectionUnavailable as error:
            return lr, error
        except ValueError as error:
            return lr, DirectionUnavailable(str(error))
        return lr, direction.over(self.params).to(gradient.dtype)

    def state_dict(self) -> dict:
        """JSON-able warm-start and schedule state."""
        return {
            "eta_c": self.warm.eta_c,
            "last_step": self.last_step,
            "training_seconds": self.training_seconds,
            "skipped_for_budget": self.skipped_for_budget,
            "ledgers": [ledger.state_dict() for ledger in self.ledgers],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`. A schedule's ledger resumes from the saved one of the
        same measures; a state saved before meters kept one per schedule (a single account of
        every measure: ``measuring_seconds``, ``last_cost``) resumes every ledger from it."""
        self.warm.eta_c = state.get("eta_c")
        self.last_step = state.get("last_step")
        self.skipped_for_budget = int(state.get("skipped_for_budget", 0))
        saved = {tuple(book["measures"]): book for book in state.get("ledgers", [])}
        single = {key: state[key] for key in ("measuring_seconds", "last_cost") if key in state}
        for ledger in self.ledgers:
            ledger.load_state_dict(
                saved.get(ledger.measures, {**single, "last_step": self.last_step})
            )
        # The budget compares totals over the whole run, so the clock resumes where it stopped.
        elapsed = self.measuring_seconds + float(state.get("training_seconds", 0.0))
        self._started = time.perf_counter() - elapsed


def _take(measure: Measure, context: RowContext) -> Outcome:
    """One measure of one row; what fails is its status, never the row's end."""
    if measure.needs_direction and isinstance(context.direction, DirectionUnavailable):
        return Outcome(f"no_direction: {context.direction}")
    try:
        outcome = measure.run(context)
    except CollectiveError:  # no other estimator can run without the process group
        raise
    except Exception as error:  # one estimator failing leaves the others standing
        agree_on_failure(error, f"measuring {measure.name}", context.gradient.device)
        return Outcome(f"error: {type(error).__name__}: {error}")
    value = outcome.values.get(measure.value_column, math.nan)
    if outcome.status == "ok" and not math.isfinite(value):
        # An HVP that overflowed gives a NaN trace or eigenvalue: never an ok NaN.
        return Outcome(NONFINITE, outcome.values)
    return outcome


def _charge(
    ledgers_taken: Sequence[Ledger], step: int, elapsed: float, seconds: Mapping[str, float]
) -> None:
    """Book a row's ``elapsed`` seconds to the ledgers whose measures it took: each its
    measures' own ``seconds``, and the row's shared work (probe gradient, Hessian operator)
    in proportion to them (evenly when no measure ran: the row failed before them)."""
    own = [sum(seconds.get(name, 0.0) for name in ledger.measures) for ledger in ledgers_taken]
    total = sum(own)
    shared = max(elapsed - total, 0.0)
    for ledger, mine in zip(ledgers_taken, own, strict=True):
        share = mine / total if total > 0 else 1 / len(ledgers_taken)
        ledger.charge(step, mine + shared * share)


def _unscaled(gradients: list[torch.Tensor | None], scale: float) -> list[torch.Tensor | None]:
    if scale == 1.0:
        return gradients
    return [None if g is None else g / scale for g in gradients]


def _fail(row: dict[str, Any], measures: Sequence[Measure], status: str, error: str) -> None:
    """A row that failed before its measures: each measure not taken says so too."""
    row["status"] = status
    row["error"] = error
    for measure in measures:
        if row[measure.status_column] is None:
            row[measure.status_column] = status


def _overall_status(row: Mapping[str, Any], measures: Sequence[Measure]) -> str:
    """``ok`` only when every measure is: what raised is named as an error, what finished
    without a trustworthy value (no increase, not converged, no direction, ...) as incomplete."""
    statuses = {m.name: str(row[m.status_column]) for m in measures}
    errors = [name for name, status in statuses.items() if status.startswith("error")]
    if errors:
        return "error: " + ",".join(errors)
    incomplete = [name for name, status in statuses.items() if status != "ok"]
    return "ok" if not incomplete else "incomplete: " + ",".join(incomplete)
