r"""The measures a :class:`~sharpmeter.measure.meter.SharpnessMeter` takes, as one table of data.

A :class:`Measure` says which row columns it writes (its value first), whether it needs
Hessian-vector products, the optimizer's update direction, or follows that update (and so the
optimizer's gradient clipping), and how it is taken from a :class:`RowContext`. The meter loops
over the chosen entries of :data:`MEASURE_TABLE`, and every name tuple is derived from it, so
a measure's columns are spelled once (in :data:`sharpmeter.measure.schema.MEASURE_COLUMNS`,
which the paper side reads without torch): rows that failed have the same keys as rows that did
not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sharpmeter.measure.directions import DirectionUnavailable, adam_preconditioner
from sharpmeter.measure.estimators import (
    LanczosResult,
    TraceAndTopResult,
    directional_sharpness,
    hutchinson,
    hutchpp,
    lanczos,
    trace_and_top,
)
from sharpmeter.measure.linesearch import critical_sharpness
from sharpmeter.measure.operators import HessianOperator, PreconditionedOperator
from sharpmeter.measure.params import unflatten
from sharpmeter.measure.schema import MEASURE_COLUMNS

if TYPE_CHECKING:
    from sharpmeter.measure.meter import SharpnessMeter
    from sharpmeter.measure.options import MeterOptions

TRACE_METHODS = {"hutchinson": hutchinson, "hutchpp": hutchpp}
# Hutchinson deflated by the Lanczos basis of the spectral measure: when both are chosen, one
# Krylov run serves both (estimators/krylov.py, benchmarks/results/krylov.md).
DEFLATED = "deflated"
# Deflated in a row that takes the spectral measure too (its Lanczos steps are spent anyway:
# the same HVPs, a lower stderr), else Hutchinson.
AUTO = "auto"
TRACE_METHOD_NAMES = (AUTO, *TRACE_METHODS, DEFLATED)
# The first line search starts at the learning rate, or here where there is none to read (no
# optimizer, a rate of 0): the search doubles or halves from it, a few forwards either way.
COLD_ETA0 = 1e-3


@dataclass
class WarmStart:
    """Where the next line search starts: the last ``ok`` :math:`\\eta_c` (a failed one
    seeds nothing). Lanczos starts cold, from the seed's vector: from the last top eigenvector
    it stops on that vector when a new direction has grown past it (see
    :func:`~sharpmeter.lanczos`)."""

    eta_c: float | None = None


@dataclass(frozen=True)
class RowContext:
    """What the measures of one row read: the meter (model, probe, parameters, options, warm
    starts), the measures this row takes, and this row's batch (the fixed probe or the step's
    training batch), operator, probe loss and gradient,
    learning rate, optimizer and its update direction (or why there is none), and the norm
    the optimizer clips by."""

    meter: SharpnessMeter
    measures: tuple[Measure, ...]
    batch: Any
    operator: HessianOperator | None
    loss: float
    gradient: torch.Tensor
    lr: float
    direction: torch.Tensor | DirectionUnavailable | None
    optimizer: torch.optim.Optimizer | None
    clip_norm: torch.Tensor | None
    rounding_eps: float  # of the coarsest dtype the probe loss passes through
    # Results measures of this row share (the deflated trace's Krylov run); filled as taken.
    shared: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def options(self) -> MeterOptions:
        return self.meter.options

    @property
    def warm(self) -> WarmStart:
        return self.meter.warm


@dataclass(frozen=True)
class Outcome:
    """One measure of one row: its status (``ok`` or why not) and the columns it could fill."""

    status: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Measure:
    """One measure: its name, what it needs, the columns it writes and how it is taken."""

    name: str
    needs_hvp: bool
    needs_direction: bool
    follows_update: bool
    columns: tuple[str, ...]
    run: Callable[[RowContext], Outcome]

    @property
    def value_column(self) -> str:
        return self.columns[0]

    @property
    def status_column(self) -> str:
        return f"{self.name}_status"


def _critical(row: RowContext) -> Outcome:
    meter, lr = row.meter, row.lr
    result = critical_sharpness(
        meter.model,
        row.options.loss_fn,
        row.batch,
        row.direction,
        params=meter.params,
        eta0=row.warm.eta_c or (lr if lr > 0 else COLD_ETA0),
        precision_bits=row.options.critical_precision_bits,
        predictions=row.options.critical_predictions,
        gradient=row.gradient,
        loss=row.loss,
        seed=row.options.seed,
    )
    if result.status == "ok":
        row.warm.eta_c = result.eta_c
    values = {
        "critical_sharpness": result.value,
        "critical_eta": result.eta_c,
        "critical_eta_lo": result.lo,
        "critical_eta_hi": result.hi,
        "critical_num_forward": result.num_forward,
        "stability_ratio": lr / result.eta_c,
    }
    return Outcome(result.status, values)


def _directional(row: RowContext) -> Outcome:
    # The slope of the loss whose Hessian the operator holds: under probe="train" the row's
    # gradient is the step's, clipped (and weighted as the training loop weighs micro-batches).
    result = directional_sharpness(row.operator, row.direction)
    return Outcome(result.status, {"directional_sharpness": result.value})


def _trace(row: RowContext) -> Outcome:
    options = row.options
    if _deflates(row):
        shared = _shared_krylov(row)
        result = shared.trace
        # The Lanczos steps count here only when no spectral measure reports them.
        spent = result.num_matvecs if _chosen(row, "spectral") else shared.num_matvecs
    else:
        method = "hutchinson" if options.trace_method == AUTO else options.trace_method
        estimate = TRACE_METHODS[method]
        result = estimate(row.operator, num_matvecs=options.trace_num_matvecs, seed=options.seed)
        spent = result.num_matvecs
    values = {
        "hessian_trace": result.value,
        "hessian_trace_stderr": result.stderr,
        "hessian_trace_num_matvecs": spent,
    }
    return Outcome("ok", values)


def _spectral(row: RowContext) -> Outcome:
    if _deflates(row) and _chosen(row, "trace"):
        return _eigen_outcome("lambda_max", _shared_krylov(row).top)
    return _eigen_outcome("lambda_max", _top_eigenpair(row, row.operator))


def _shared_krylov(row: RowContext) -> TraceAndTopResult:
    """The row's one Krylov run for the deflated trace and the top eigenvalue, taken once:
    Lanczos, its basis deflating ``trace_num_matvecs`` probes."""
    if "krylov" not in row.shared:
        options = row.options
        result = trace_and_top(
            row.operator,
            lanczos_max_iter=options.lanczos_max_iter,
            lanczos_tol=options.lanczos_tol,
            num_matvecs=options.trace_num_matvecs,
            seed=options.seed,
        )
        row.shared["krylov"] = result
    return row.shared["krylov"]


def _deflates(row: RowContext) -> bool:
    """Whether the row's trace is Hutchinson deflated by the Lanczos basis (see ``AUTO``)."""
    method = row.options.trace_method
    return method == DEFLATED or (method == AUTO and _chosen(row, "spectral"))


def _chosen(row: RowContext, name: str) -> bool:
    return any(measure.name == name for measure in row.measures)


def _preconditioned(row: RowContext) -> Outcome:
    if row.optimizer is None:
        return Outcome("no_optimizer")
    meter = row.meter
    # P of the very update critical sharpness follows: the probe gradient's next step.
    diagonal = adam_preconditioner(
        row.optimizer,
        meter.params,
        gradients=unflatten(row.gradient, meter.params),
        max_grad_norm=row.options.max_grad_norm,
        total_grad_norm=row.clip_norm,
    )
    operator = PreconditionedOperator(row.operator, diagonal)
    return _eigen_outcome("preconditioned_lambda_max", _top_eigenpair(row, operator))


def _top_eigenpair(row: RowContext, operator: Any) -> LanczosResult:
    options = row.options
    return lanczos(
        operator,
        k=1,
        max_iter=options.lanczos_max_iter,
        tol=options.lanczos_tol,
        seed=options.seed,
    )


def _eigen_outcome(prefix: str, result: LanczosResult) -> Outcome:
    values = {
        prefix: result.value,
        f"{prefix}_residual": result.residual,
        f"{prefix}_num_matvecs": result.num_matvecs,
        f"{prefix}_converged": result.converged,
    }
    return Outcome("ok" if result.converged else "not_converged", values)


MEASURE_TABLE = (
    Measure(
        name="critical",
        needs_hvp=False,
        needs_direction=True,
        follows_update=True,
        columns=MEASURE_COLUMNS["critical"],
        run=_critical,
    ),
    Measure(
        name="directional",
        needs_hvp=True,
        needs_direction=True,
        follows_update=True,
        columns=MEASURE_COLUMNS["directional"],
        run=_directional,
    ),
    Measure(
        name="trace",
        needs_hvp=True,
        needs_direction=False,
        follows_update=False,
        columns=MEASURE_COLUMNS["trace"],
        run=_trace,
    ),
    Measure(
        name="spectral",
        needs_hvp=True,
        needs_direction=False,
        follows_update=False,
        columns=MEASURE_COLUMNS["spectral"],
        run=_spectral,
    ),
    Measure(
        name="preconditioned",
        needs_hvp=True,
        needs_direction=False,
        # P is the preconditioner of the optimizer's next update, clipping included.
        follows_update=True,
        columns=MEASURE_COLUMNS["preconditioned"],
        run=_preconditioned,
    ),
)
MEASURE_BY_NAME = {measure.name: measure for measure in MEASURE_TABLE}
MEASURES = tuple(MEASURE_BY_NAME)
HVP_MEASURES = tuple(measure.name for measure in MEASURE_TABLE if measure.needs_hvp)


def measure_of(column: str) -> str | None:
    """The measure that logs ``column`` (None for what every row has: loss, grad_norm, ...).

    >>> measure_of("lambda_max_residual"), measure_of("loss")
    ('spectral', None)
    """
    return next((m.name for m in MEASURE_TABLE if column in m.columns), None)
