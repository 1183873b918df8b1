r"""SharpnessMeter: a schedule and a set of estimators, one flat record per measurement.

A measurement runs inside :func:`sharpmeter.probe.measurement` on a fixed probe batch, so
training is never changed by it, and it never raises: a failed estimator leaves NaN in its
columns and says why in its ``*_status`` column. The one exception is a failed collective under
data parallelism (:class:`~sharpmeter.distributed.CollectiveError`: another rank is stopped,
hung or dead), after which no rank can go on training.

The record (a flat ``dict`` of floats, ints and strings):

=============================  ==========================================================
``step``, ``lr``               training step; learning rate of the next update (first group)
``loss``, ``grad_norm``        probe loss :math:`L(\theta)` and :math:`\lVert g\rVert`
``loss_noise_floor``           :math:`\epsilon_{\rm dtype}|L|`: loss changes below it are rounding
``critical_sharpness``         :math:`\lambda_c = 2/\eta_c` along the optimizer's update direction
``critical_eta[_lo,_hi]``      :math:`\eta_c` and its bracket; ``critical_num_forward``
``stability_ratio``            :math:`\mathrm{lr}\,\lambda_c/2 = \mathrm{lr}/\eta_c`: above 1 the
                               next step raises the probe loss
``directional_sharpness``      :math:`d^\top H d / d^\top g` (one HVP)
``hessian_trace[_stderr]``     Hutchinson or Hutch++ with its standard error
``lambda_max[_residual]``      top Hessian eigenvalue by Lanczos, residual, ``_converged``
``preconditioned_lambda_max``  top eigenvalue of :math:`P^{-1/2} H P^{-1/2}`, :math:`P` the
                               preconditioner of the measured Adam step
``*_num_matvecs``              HVPs spent per estimator; ``wall_seconds`` in total
``skipped_for_budget``         steps on the grid left out since the previous measurement
                               because measuring was over its time budget
``*_status``                   ``ok``, or why the measure has no trustworthy value
                               (``no_increase``, ``not_converged``, ``nonfinite``,
                               ``no_direction: ...``, ``error: ...``; the value is then NaN
                               or, for Lanczos, unconverged)
``status``                     ``ok`` only when every measure is; else ``error: <measures>``
                               (an estimator raised) or ``incomplete: <measures>``
=============================  ==========================================================

Warm starts: each measurement starts the line search at the previous ``ok`` :math:`\eta_c`
and Lanczos at the previous finite top eigenvector; a failed row seeds nothing.

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

import difflib
import inspect
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sharpmeter.directions import (
    DirectionUnavailable,
    adam_preconditioner,
    check_adam_type,
    learning_rate,
    update_direction,
)
from sharpmeter.distributed import (
    NO_FSDP_HVP,
    CollectiveError,
    check_not_fsdp1,
    collective,
    is_distributed,
    is_sharded,
)
from sharpmeter.estimators import (
    critical_sharpness,
    directional_sharpness,
    hutchinson,
    hutchpp,
    lanczos,
)
from sharpmeter.estimators._operator import check_positive_int
from sharpmeter.loss import LossFn, ProbeLoss, probe_loss_and_gradient
from sharpmeter.operators import MODES, HessianOperator, NonFiniteLossError, PreconditionedOperator
from sharpmeter.params import all_finite, norm, resolve_params, unflatten
from sharpmeter.probe import DROPOUT_POLICIES, measurement
from sharpmeter.schedule import Schedule

MEASURES = ("critical", "directional", "trace", "spectral", "preconditioned")
DEFAULT_MEASURES = ("critical", "trace", "spectral")
HVP_MEASURES = ("directional", "trace", "spectral", "preconditioned")
DIRECTION_MEASURES = ("critical", "directional")
# The measures that follow the optimizer's next update, and so its clipping of the gradient.
UPDATE_MEASURES = (*DIRECTION_MEASURES, "preconditioned")
# An HVP costs about two training steps whatever the model size, so a fixed grid alone would
# multiply training time (benchmarks/results/overhead.md): by default measuring takes at most 5%.
DEFAULT_SCHEDULE = Schedule(every=10, max_fraction=0.05)
PROGRESS_DELAY = 2.0  # seconds before a measurement shows its bar: short ones stay quiet
TRACE_METHODS = {"hutchinson": hutchinson, "hutchpp": hutchpp}

_COLUMNS = {
    "critical": (
        "critical_sharpness",
        "critical_eta",
        "critical_eta_lo",
        "critical_eta_hi",
        "critical_num_forward",
        "stability_ratio",
    ),
    "directional": ("directional_sharpness",),
    "trace": ("hessian_trace", "hessian_trace_stderr", "hessian_trace_num_matvecs"),
    "spectral": ("lambda_max", "lambda_max_residual", "lambda_max_num_matvecs"),
    "preconditioned": (
        "preconditioned_lambda_max",
        "preconditioned_lambda_max_residual",
        "preconditioned_num_matvecs",
    ),
}


def measure_of(column: str) -> str | None:
    """The measure that logs ``column`` (None for what every row has: loss, grad_norm, ...)."""
    return next((measure for measure, names in _COLUMNS.items() if column in names), None)


class SharpnessMeter:
    """Measures sharpness of ``model`` on a fixed probe batch, on a schedule.

    Args:
        model: the (unwrapped) module being trained.
        probe_batch: one batch or a list of batches, kept fixed for the whole run.
        loss_fn: ``(model, batch) -> scalar``; ``None`` for the output's ``.loss`` (a Hugging
            Face model given ``labels``, or ``start_positions``/``end_positions``, ...).
        measures: any of ``critical``, ``directional``, ``trace``, ``spectral``,
            ``preconditioned``.
        schedule: a :class:`Schedule` (default: every 10 steps while measuring has taken at
            most 5% of the wall time, ``Schedule(every=10, max_fraction=0.05)``).
        params: the parameters to measure (default all trainable).
        dropout: ``"eval"`` (default) or ``"train"`` (fixed-seed masks).
        trace_method: ``"hutchinson"`` or ``"hutchpp"``; ``trace_matvecs`` its HVP budget.
        lanczos_steps, lanczos_tol: Krylov size (HVPs) and relative residual target of the
            top eigenvalue; missing the target within the steps is ``not_converged`` (the row
            ``incomplete: spectral``): raise ``lanczos_steps`` for a larger budget.
        critical_k: bisection precision :math:`2^{-k}` of :math:`\\eta_c`.
        max_grad_norm: gradient clipping the optimizer applies (as the Trainer does).
        hvp_mode: ``"double_backward"``, ``"fwd"`` or ``"fd"``.
        seed: seed of the probes and of the dropout masks.
        progress: show a progress bar (measure, HVPs so far) for measurements that take more
            than two seconds.

    Construction runs one probe forward (RNG, buffers and modes restored), so that a probe
    that gives no loss fails here rather than once per measurement.

    Raises:
        ValueError: an unknown measure, a probe whose forward gives no scalar loss (no
            ``.loss`` in the output and no ``loss_fn``), a bad schedule or setting, a measure
            that needs Hessian-vector products on a model sharded by FSDP (only ``critical``
            works there).
    """

    def __init__(
        self,
        model: nn.Module,
        probe_batch: Any,
        loss_fn: LossFn | None = None,
        measures: Sequence[str] = DEFAULT_MEASURES,
        schedule: Schedule | None = None,
        *,
        params: Iterable[nn.Parameter] | None = None,
        dropout: str = "eval",
        trace_method: str = "hutchinson",
        trace_matvecs: int = 8,
        lanczos_steps: int = 20,
        lanczos_tol: float = 1e-3,
        critical_k: int = 4,
        max_grad_norm: float | None = None,
        hvp_mode: str = "double_backward",
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        _check_settings(
            loss_fn=loss_fn,
            measures=measures,
            schedule=schedule,
            params=params,
            dropout=dropout,
            trace_method=trace_method,
            trace_matvecs=trace_matvecs,
            lanczos_steps=lanczos_steps,
            lanczos_tol=lanczos_tol,
            critical_k=critical_k,
            max_grad_norm=max_grad_norm,
            hvp_mode=hvp_mode,
            seed=seed,
            progress=progress,
        )
        self.model = model
        self.probe_batch = probe_batch
        self.loss_fn = loss_fn
        self.measures = tuple(dict.fromkeys(measures))
        self.schedule = schedule if schedule is not None else DEFAULT_SCHEDULE
        check_not_fsdp1(model)
        self.params = resolve_params(model, params)
        hvp_measures = [m for m in self.measures if m in HVP_MEASURES]
        # is_sharded also refuses parameter layouts that nothing can measure
        if is_sharded(self.params) and hvp_measures:
            raise ValueError(f"cannot measure {hvp_measures} on an FSDP model: {NO_FSDP_HVP}")
        self.dropout = dropout
        self.trace_method = trace_method
        self.trace_matvecs = trace_matvecs
        self.lanczos_steps = lanczos_steps
        self.lanczos_tol = lanczos_tol
        self.critical_k = critical_k
        self.max_grad_norm = max_grad_norm
        self.hvp_mode = hvp_mode
        self.seed = seed
        self.progress = progress
        # The Trainer clips by the norm over every trainable parameter's gradient.
        measured = {id(p) for p in self.params}
        self.clips_a_subset = bool(max_grad_norm) and any(
            id(p) not in measured for p in resolve_params(model)
        )
        self._check_probe_loss()
        self.eta_c: float | None = None
        self.top_vector: torch.Tensor | None = None
        self.preconditioned_vector: torch.Tensor | None = None
        self.last_step: int | None = None
        self.measuring_seconds = 0.0
        self.last_cost = 0.0
        self.skipped_for_budget = 0
        self._started = time.perf_counter()

    def _check_probe_loss(self) -> None:
        """One probe forward now, so that a model without a loss (no ``.loss`` and no
        ``loss_fn``) or a loss that is not a scalar is refused here, not once per row."""
        with measurement(self.model, self.dropout), torch.no_grad():
            ProbeLoss(self.model, self.loss_fn, self.probe_batch, seed=self.seed)()

    def check_optimizer(self, optimizer: Any) -> None:
        """Refuse, before training, an optimizer a chosen measure cannot follow: the
        ``preconditioned`` measure needs Adam's second moments."""
        if "preconditioned" in self.measures:
            check_adam_type(optimizer)

    def is_due(self, step: int) -> bool:
        """Whether ``step`` is on the schedule, not yet measured, and within the time budget."""
        if self.last_step is not None and step <= self.last_step:
            return False
        if not self.schedule.is_due(step):
            return False
        if self.schedule.max_fraction is None:
            return True
        due = self.schedule.within_budget(
            self.measuring_seconds, self.training_seconds, next_cost=self.last_cost
        )
        if is_distributed():
            # Wall clocks differ between ranks; a measurement is collective, so rank 0 decides.
            decision = torch.tensor(int(due), device=self.params[0].device)
            with collective("the broadcast of whether a measurement is due"):
                torch.distributed.broadcast(decision, src=0)
            due = bool(decision)
        self.skipped_for_budget += not due
        return due

    def measure(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """One measurement at the current parameters; never changes training, and raises only
        a :class:`~sharpmeter.distributed.CollectiveError` (a failed collective under data
        parallelism: the process group is unusable, so training cannot go on either).

        With ``optimizer``, critical and directional sharpness follow the update it would
        apply to the probe gradient (:func:`sharpmeter.update_direction`); without, the
        gradient itself (``lr`` is then NaN).
        """
        started = time.perf_counter()
        row: dict[str, Any] = {"step": int(step)}
        try:
            with measurement(self.model, self.dropout):
                self._measure_into(row, optimizer)
            row["status"] = _overall_status(row, self.measures)
        except CollectiveError:  # the process group is gone: the run must end, saying why
            raise
        except NonFiniteLossError as error:
            row["status"] = "nonfinite"
            row["error"] = str(error)
        except Exception as error:  # a measurement must never stop training
            row["status"] = "error"
            row["error"] = f"{type(error).__name__}: {error}"
        for measure in self.measures:
            for column in _COLUMNS[measure]:
                row.setdefault(column, math.nan)
            row.setdefault(f"{measure}_status", row["status"])
        row.setdefault("lr", math.nan)
        elapsed = time.perf_counter() - started
        row["wall_seconds"] = elapsed
        row["skipped_for_budget"] = self.skipped_for_budget
        self.skipped_for_budget = 0
        self.measuring_seconds += elapsed
        self.last_cost = elapsed
        self.last_step = int(step)
        return row

    @property
    def training_seconds(self) -> float:
        """Wall time since the meter started (or the run, after a resume), less measuring."""
        return time.perf_counter() - self._started - self.measuring_seconds

    def _measure_into(self, row: dict, optimizer: torch.optim.Optimizer | None) -> None:
        operator = None
        if any(m in HVP_MEASURES for m in self.measures):
            operator = HessianOperator(
                self.model,
                self.loss_fn,
                self.probe_batch,
                params=self.params,
                mode=self.hvp_mode,
                dropout_seed=self.seed,
            )
            loss, gradient = operator.loss, operator.gradient
        else:
            probe = ProbeLoss(self.model, self.loss_fn, self.probe_batch, seed=self.seed)
            loss, gradient = probe_loss_and_gradient(probe, self.params)
            if not (torch.isfinite(loss) and all_finite(gradient, self.params)):
                raise NonFiniteLossError(f"the probe loss is not finite ({float(loss)})")
        clip_norm = self._total_gradient_norm() if self._clips_by_global_norm(optimizer) else None
        lr, direction = self._direction(optimizer, gradient, clip_norm)
        row["lr"] = lr
        row["loss"] = float(loss)
        row["grad_norm"] = float(norm(gradient, self.params))
        row["loss_noise_floor"] = torch.finfo(self.params[0].dtype).eps * abs(float(loss))
        # HVP estimators first: the line search writes the parameters (and restores them), which
        # would make the operator rebuild its graph.
        steps = {
            "directional": lambda: self._directional(operator, direction, gradient),
            "trace": lambda: self._trace(operator),
            "spectral": lambda: self._spectral(operator),
            "preconditioned": lambda: self._preconditioned(
                operator, optimizer, gradient, clip_norm
            ),
            "critical": lambda: self._critical(direction, gradient, float(loss), lr),
        }
        ordered = sorted(self.measures, key=lambda m: m == "critical")
        bar = tqdm(
            ordered, desc="measuring", leave=False, delay=PROGRESS_DELAY, disable=not self.progress
        )
        for measure in bar:
            hvps = operator.num_matvecs if operator is not None else 0
            bar.set_postfix_str(f"{measure}, {hvps} HVPs so far", refresh=False)
            if measure in DIRECTION_MEASURES and isinstance(direction, DirectionUnavailable):
                row[f"{measure}_status"] = f"no_direction: {direction}"
                continue
            try:
                row.update(steps[measure]())
            except CollectiveError:  # no other estimator can run without the process group
                raise
            except Exception as error:  # one estimator failing leaves the others standing
                row[f"{measure}_status"] = f"error: {type(error).__name__}: {error}"
                continue
            value = row.get(_COLUMNS[measure][0])
            if row.get(f"{measure}_status") == "ok" and not math.isfinite(value):
                # An HVP that overflowed gives a NaN trace or eigenvalue: never an ok NaN.
                row[f"{measure}_status"] = "nonfinite"

    def _clips_by_global_norm(self, optimizer: torch.optim.Optimizer | None) -> bool:
        """Whether this row needs :meth:`_total_gradient_norm`: a clipped subset is measured and
        a chosen measure follows the optimizer's update. Otherwise the extra backward (and,
        under sharding, its collective) would be spent on a number nothing reads."""
        return (
            self.clips_a_subset
            and optimizer is not None
            and any(m in UPDATE_MEASURES for m in self.measures)
        )

    def _total_gradient_norm(self) -> torch.Tensor:
        """The norm clipping divides by: over every trainable parameter, as the Trainer clips,
        even when only a subset is measured (one more backward)."""
        every = resolve_params(self.model)
        probe = ProbeLoss(self.model, self.loss_fn, self.probe_batch, seed=self.seed)
        return norm(probe_loss_and_gradient(probe, every)[1], every)

    def _direction(
        self,
        optimizer: torch.optim.Optimizer | None,
        gradient: torch.Tensor,
        clip_norm: torch.Tensor | None,
    ) -> tuple[float, torch.Tensor | DirectionUnavailable | None]:
        """The learning rate and the update direction, or why the direction is unavailable
        (the HVP measures that do not need it still run).

        ``update_direction`` raises ``ValueError`` for an optimizer state that has no direction
        per unit rate (the first group's rate 0 while another's is not, none of the measured
        parameters optimized): like an optimizer that cannot be followed, that is a status of
        the direction measures, not a failure of the whole row. No direction is computed when
        no chosen measure reads it (a shadow step copies the optimizer's state).
        """
        if optimizer is None:
            return math.nan, gradient
        lr = learning_rate(optimizer)
        if not any(m in DIRECTION_MEASURES for m in self.measures):
            return lr, None
        try:
            direction = update_direction(
                optimizer,
                self.params,
                gradients=unflatten(gradient, self.params),
                max_grad_norm=self.max_grad_norm,
                total_grad_norm=clip_norm,
            )
        except DirectionUnavailable as error:
            return lr, error
        except ValueError as error:
            return lr, DirectionUnavailable(str(error))
        return lr, direction.over(self.params).to(gradient.dtype)

    def _directional(self, operator, direction, gradient) -> dict:
        result = directional_sharpness(operator, direction, gradient)
        return {"directional_sharpness": result.value, "directional_status": result.status}

    def _trace(self, operator) -> dict:
        result = TRACE_METHODS[self.trace_method](operator, self.trace_matvecs, seed=self.seed)
        return {
            "hessian_trace": result.value,
            "hessian_trace_stderr": result.stderr,
            "hessian_trace_num_matvecs": result.num_matvecs,
            "trace_status": "ok",
        }

    def _spectral(self, operator) -> dict:
        result = lanczos(
            operator,
            k=1,
            max_iter=self.lanczos_steps,
            tol=self.lanczos_tol,
            v0=self.top_vector,
            seed=self.seed,
        )
        self.top_vector = _warm_vector(result.vector, self.top_vector)
        return {
            "lambda_max": result.value,
            "lambda_max_residual": result.residual,
            "lambda_max_num_matvecs": result.num_matvecs,
            "lambda_max_converged": result.converged,
            "spectral_status": "ok" if result.converged else "not_converged",
        }

    def _preconditioned(self, operator, optimizer, gradient, clip_norm) -> dict:
        if optimizer is None:
            return {"preconditioned_status": "no_optimizer"}
        # P of the very update critical sharpness follows: the probe gradient's next step.
        diagonal = adam_preconditioner(
            optimizer,
            self.params,
            gradients=unflatten(gradient, self.params),
            max_grad_norm=self.max_grad_norm,
            total_grad_norm=clip_norm,
        )
        result = lanczos(
            PreconditionedOperator(operator, diagonal),
            k=1,
            max_iter=self.lanczos_steps,
            tol=self.lanczos_tol,
            v0=self.preconditioned_vector,
            seed=self.seed,
        )
        self.preconditioned_vector = _warm_vector(result.vector, self.preconditioned_vector)
        return {
            "preconditioned_lambda_max": result.value,
            "preconditioned_lambda_max_residual": result.residual,
            "preconditioned_num_matvecs": result.num_matvecs,
            "preconditioned_status": "ok" if result.converged else "not_converged",
        }

    def _critical(self, direction, gradient, loss, lr) -> dict:
        result = critical_sharpness(
            self.model,
            self.loss_fn,
            self.probe_batch,
            direction,
            params=self.params,
            eta0=self.eta_c if self.eta_c else (lr if lr > 0 else 1e-3),
            k=self.critical_k,
            gradient=gradient,
            loss=loss,
            dropout_seed=self.seed,
        )
        if result.status == "ok":
            self.eta_c = result.eta_c
        return {
            "critical_sharpness": result.value,
            "critical_eta": result.eta_c,
            "critical_eta_lo": result.lo,
            "critical_eta_hi": result.hi,
            "critical_num_forward": result.num_forward,
            "stability_ratio": lr / result.eta_c,
            "critical_status": result.status,
        }

    def state_dict(self) -> dict:
        """JSON-able warm-start and schedule state (eigenvectors are not kept)."""
        return {
            "eta_c": self.eta_c,
            "last_step": self.last_step,
            "measuring_seconds": self.measuring_seconds,
            "training_seconds": self.training_seconds,
            "last_cost": self.last_cost,
            "skipped_for_budget": self.skipped_for_budget,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.eta_c = state.get("eta_c")
        self.last_step = state.get("last_step")
        self.measuring_seconds = float(state.get("measuring_seconds", 0.0))
        self.last_cost = float(state.get("last_cost", 0.0))
        self.skipped_for_budget = int(state.get("skipped_for_budget", 0))
        # The budget compares totals over the whole run, so the clock resumes where it stopped.
        elapsed = self.measuring_seconds + float(state.get("training_seconds", 0.0))
        self._started = time.perf_counter() - elapsed


_OPTION_NAMES = tuple(inspect.signature(SharpnessMeter.__init__).parameters)[3:]


def check_options(options: Mapping[str, Any]) -> None:
    """Check :class:`SharpnessMeter` keyword options without a model or a probe.

    Names and values are checked as the meter checks them, so a callback or a config can
    refuse a bad option at once; nothing is built and no random number is drawn.

    Raises:
        ValueError: an unknown (e.g. misspelled) option or a bad value.
    """
    unknown = [name for name in options if name not in _OPTION_NAMES]
    if unknown:
        close = difflib.get_close_matches(unknown[0], _OPTION_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown sharpness option {unknown[0]!r}{hint}; the options are "
            + ", ".join(_OPTION_NAMES)
        )
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(SharpnessMeter.__init__).parameters.items()
        if name in _OPTION_NAMES
    }
    _check_settings(**{**defaults, **options})


def _check_settings(
    *,
    loss_fn: Any,
    measures: Any,
    schedule: Any,
    params: Any,
    dropout: Any,
    trace_method: Any,
    trace_matvecs: Any,
    lanczos_steps: Any,
    lanczos_tol: Any,
    critical_k: Any,
    max_grad_norm: Any,
    hvp_mode: Any,
    seed: Any,
    progress: Any,
) -> None:
    """Every model-free check of the meter's settings, in one place."""
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"loss_fn must be a callable (model, batch) -> loss, got {loss_fn!r}")
    if isinstance(measures, str) or not isinstance(measures, Iterable):
        raise ValueError(
            f"measures must be a tuple of names such as ('critical',), got {measures!r}"
        )
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise ValueError(f"measures must be a non-empty subset of {MEASURES}, got {measures}")
    if schedule is not None and not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a sharpmeter.Schedule, got {schedule!r}")
    if params is not None and (
        isinstance(params, torch.Tensor) or not isinstance(params, Iterable)
    ):
        raise ValueError("params must be a list of parameters (e.g. list(layer.parameters()))")
    if dropout not in DROPOUT_POLICIES:
        raise ValueError(f"dropout must be one of {DROPOUT_POLICIES}, got {dropout!r}")
    if trace_method not in TRACE_METHODS:
        raise ValueError(
            f"trace_method must be one of {tuple(TRACE_METHODS)}, got {trace_method!r}"
        )
    if hvp_mode not in MODES:
        raise ValueError(f"hvp_mode must be one of {MODES}, got {hvp_mode!r}")
    for name, value, minimum in (
        ("trace_matvecs", trace_matvecs, 4),
        ("lanczos_steps", lanczos_steps, 1),
        ("critical_k", critical_k, 1),
        ("seed", seed, 0),
    ):
        check_positive_int(name, value, minimum)
    if not _is_number(lanczos_tol) or not lanczos_tol > 0:
        raise ValueError(f"lanczos_tol must be a positive number, got {lanczos_tol!r}")
    if max_grad_norm is not None and (not _is_number(max_grad_norm) or max_grad_norm < 0):
        raise ValueError(
            f"max_grad_norm must be a non-negative number or None, got {max_grad_norm!r}"
        )
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True or False, got {progress!r}")


def _warm_vector(vector: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor | None:
    """The next Lanczos start: this result's vector unless it is not finite (an unconverged
    but finite vector is still a good start; a NaN one would spoil every later run)."""
    return vector.detach() if bool(torch.isfinite(vector).all()) else previous


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _overall_status(row: Mapping[str, Any], measures: Sequence[str]) -> str:
    """``ok`` only when every measure is: what raised is named as an error, what finished
    without a trustworthy value (no increase, not converged, no direction, ...) as incomplete."""
    statuses = {m: str(row.get(f"{m}_status", "ok")) for m in measures}
    errors = [m for m, status in statuses.items() if status.startswith("error")]
    if errors:
        return "error: " + ",".join(errors)
    incomplete = [m for m, status in statuses.items() if status != "ok"]
    return "ok" if not incomplete else "incomplete: " + ",".join(incomplete)
