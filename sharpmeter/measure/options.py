"""MeterOptions: every setting of a sharpness measurement, each default stated once with its
reason.

One frozen object serves every entry point: :class:`~sharpmeter.measure.meter.SharpnessMeter`, the
Trainer callback, the ``accelerate`` helper and the run config (whose ``SharpnessArguments``
turn themselves into one). Each takes ``options=MeterOptions(...)``, keyword arguments that
override its fields, or both; a config that wants another value says so in its YAML file.

Example::

    options = MeterOptions(measures=("critical",), schedule=Schedule(every=25))
    sparse = Schedule(per_decade=4)
    options = MeterOptions(schedules={"trace": sparse, "spectral": sparse})
    meter = SharpnessMeter(model, probe, options=options)
    meter = SharpnessMeter(model, probe, measures=("critical",), lanczos_max_iter=60)
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sharpmeter.measure.checks import check_choice, check_positive_int, is_finite_number
from sharpmeter.measure.context import DROPOUT_POLICIES
from sharpmeter.measure.linesearch import PREDICTIONS, check_precision_bits
from sharpmeter.measure.loss import LossFn
from sharpmeter.measure.measures import HVP_MEASURES, MEASURES, TRACE_METHOD_NAMES
from sharpmeter.measure.operators import MODES, check_products_per_call
from sharpmeter.measure.schedule import Schedule

# Where a row is measured: a probe batch kept for the whole run, or the step's own training
# batch along the step's own update (Kalra et al.'s definition).
FIXED_PROBE, TRAIN_PROBE = "fixed", "train"
PROBES = (FIXED_PROBE, TRAIN_PROBE)

# Critical sharpness costs a few forwards (about 3.6 training steps with its probe gradient,
# benchmarks/results/overhead.md): a dense grid, every 10 steps, while it has taken at most 2% of
# the wall time.
FORWARD_SCHEDULE = Schedule(every=10, max_fraction=0.02)
# An HVP costs about two training steps whatever the model size, and the trace and the top
# eigenvalue take 15-20 of them: a sparser grid, every 50 steps (on critical sharpness' steps),
# one 3% budget for all (one Hessian operator serves them in a row). Both budgets: at most 5%.
HVP_SCHEDULE = Schedule(every=50, max_fraction=0.03)


@dataclass(frozen=True)
class MeterOptions:
    """What a meter measures, when, and how; checked when made (:meth:`validate`).

    Args:
        measures: any of ``critical``, ``directional``, ``trace``, ``spectral``,
            ``preconditioned`` (repeats are dropped).
        schedule: the steps every measure not named in ``schedules`` is taken at, and the
            share of wall time those measures may take; ``None``: each measure follows the
            default of its kind, :data:`FORWARD_SCHEDULE` (critical sharpness) or
            :data:`HVP_SCHEDULE` (the measures that take Hessian-vector products).
        schedules: ``{measure: Schedule}``, a grid and a budget of its own for each measure
            named (measures with equal schedules share one budget; names of measures not
            chosen are ignored). A row holds the measures due at its step, the others
            ``not_due``.
        loss_fn: ``(model, batch) -> scalar``; ``None`` for the output's ``.loss`` (a Hugging
            Face model given ``labels``, or ``start_positions``/``end_positions``, ...).
        params: the parameters to measure (``None``: every trainable one).
        dropout: ``"eval"`` or ``"train"`` (fixed-seed masks).
        trace_method: ``"hutchinson"``, ``"hutchpp"``, ``"deflated"`` (Hutchinson deflated
            by the spectral measure's Lanczos basis: one Krylov run for both, lower variance
            at the same HVPs) or ``"auto"``: deflated in a row that takes the spectral measure
            too (its Lanczos steps are spent anyway), else Hutchinson: decided per row, so give
            both one schedule (as by default) to keep one estimator along the curve;
            ``trace_num_matvecs`` its HVP budget (probes).
        lanczos_max_iter, lanczos_tol: Krylov size (HVPs) and relative residual target of a
            top eigenvalue; missing the target within ``lanczos_max_iter`` is
            ``not_converged`` (the row ``incomplete: spectral``).
        critical_precision_bits: the line search brackets :math:`\\eta_c` to a relative width
            :math:`2^{-b}`.
        critical_predictions: steps the line search takes where a model of the loss along the
            update predicts the crossing (``predictions`` of
            :func:`~sharpmeter.measure.linesearch.critical_sharpness`); 0: plain doubling and
            bisection, whose steps depend on the losses alone. The predictions use the slope
            along the update; with a clipped training gradient (``probe="train"``) it is not
            the probe's, and they miss more often (the answer stays a bracket of seen losses).
        max_grad_norm: the gradient clipping of the optimizer's update (as the Trainer's
            ``max_grad_norm``); ``None`` or 0: none. Under the Trainer callback ``None`` means
            the Trainer's own.
        hvp_mode: ``"double_backward"``, ``"fwd"`` or ``"fd"``.
        hvp_products_per_call: independent Hessian-vector products (the trace's probes) taken
            in one batched backward (``products_per_call`` of
            :class:`~sharpmeter.measure.operators.HessianOperator`; ``double_backward`` only):
            the same numbers to rounding, at up to that many times an HVP's backward memory.
            On a CPU 1 is faster except for tiny models (8: 0.46-0.60x the speed on the 1M
            and 10M GPT-2s); on a GPU measure it (``benchmarks/gpu_checks.sh``).
        seed: seed of the trace probes, the Lanczos start and the dropout masks.
        progress: a progress bar (measure, HVPs so far) for measurements longer than two
            seconds; ``None``: none, except under the Trainer callback, which shows it where
            the Trainer shows its own.
        probe: ``"fixed"``, one probe batch for every row; or ``"train"``, each row on its
            step's training batch (every micro-batch of the step) along the update the
            optimizer is about to make from the step's own gradient, which critical sharpness
            then reuses (no backward): the definition of Kalra et al. The row's ``probe``
            column says which.
        probe_size, probe_seed: the examples of a probe drawn from the training set, and the
            seed that picks them (where no probe batch is given: the Trainer callback, a run
            config).

    Raises:
        ValueError: an unknown measure or a bad value, named.
    """

    # Critical sharpness (forward passes only), the trace and the top eigenvalue: the three
    # curves the report compares. Directional and preconditioned sharpness when asked for.
    measures: tuple[str, ...] = ("critical", "trace", "spectral")
    # Each measure on the default of its kind (FORWARD_SCHEDULE, HVP_SCHEDULE): a schedule given
    # here is the one grid of every measure, as asked.
    schedule: Schedule | None = None
    # No measure on a grid of its own unless named.
    schedules: Mapping[str, Schedule] = field(default_factory=dict)
    # The output's .loss: what a Hugging Face model computes when the batch has labels.
    loss_fn: LossFn | None = None
    # Every trainable parameter: the curvature of the model that is trained.
    params: Iterable[nn.Parameter] | None = None
    # The deterministic eval-mode network, whose curvature depends on no dropout mask.
    dropout: str = "eval"
    # Unbiased with a standard error at any budget; beside lambda_max deflated, at the same
    # HVPs: 0.9-1.1% stderr where Hutchinson's 8 probes give 1.6% (1M GPT-2), 6.5x fewer HVPs
    # to 2% on the 5K GPT-2 (benchmarks/results/krylov.md).
    trace_method: str = "auto"
    # 8 HVPs, about 16 training steps: the standard error says how far to trust the estimate.
    trace_num_matvecs: int = 8
    # Every row starts Lanczos cold (a warm start can stop on a vector that is no longer the
    # top): 8-24 HVPs on the GPT-2s of the tests and benchmarks; 30 bounds what it costs (about
    # 60 training steps) and holds (30 vectors of the parameters' size).
    lanczos_max_iter: int = 30
    # About three digits of the top eigenvalue.
    lanczos_tol: float = 1e-3
    # eta_c to 6% (2^-4), four bisection forwards once it is bracketed.
    critical_precision_bits: int = 4
    # About 7 forwards instead of 9-10 once warm (benchmarks/results/train_probe.md).
    critical_predictions: int = PREDICTIONS
    # The meter cannot see whether the loop clips, so none unless told; the Trainer callback
    # reads the Trainer's.
    max_grad_norm: float | None = None
    # Exact, one extra backward per HVP with the gradient's graph reused, any module.
    hvp_mode: str = "double_backward"
    # One product per backward: on a CPU batching is slower (benchmarks/results/hvp.md), and
    # its memory grows with the batch.
    hvp_products_per_call: int = 1
    # The same probes, start vector and masks in every run: rows of two runs compare.
    seed: int = 0
    # Quiet unless asked: the callback follows the Trainer's own progress bars.
    progress: bool | None = None
    # One batch for the whole run: rows compare point by point, whatever batch a step drew.
    probe: str = FIXED_PROBE
    # 8 examples: an HVP costs about two training steps of a batch of the probe's size.
    probe_size: int = 8
    # A fixed seed: the same probe examples in every run of a study.
    probe_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.measures, Iterable) and not isinstance(self.measures, str):
            # One entry per measure, in the order given: a repeat would take it twice per row.
            given = list(self.measures)
            unique = tuple(m for i, m in enumerate(given) if m not in given[:i])
            object.__setattr__(self, "measures", unique)
        self.validate()

    def validate(self) -> None:
        """Every check that needs no model: names and values only, nothing is built and no
        random number is drawn (a callback made after the Trainer seeded must not move it)."""
        _check_measures(self.measures)
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise ValueError(
                f"schedule must be a sharpmeter.Schedule or None, got {self.schedule!r}"
            )
        _check_schedules(self.schedules)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ValueError(
                f"loss_fn must be a callable (model, batch) -> loss, got {self.loss_fn!r}"
            )
        if self.params is not None and (
            isinstance(self.params, torch.Tensor) or not isinstance(self.params, Iterable)
        ):
            raise ValueError("params must be a list of parameters (e.g. list(layer.parameters()))")
        check_choice("dropout", self.dropout, DROPOUT_POLICIES)
        check_choice("probe", self.probe, PROBES)
        check_choice("trace_method", self.trace_method, TRACE_METHOD_NAMES)
        check_choice("hvp_mode", self.hvp_mode, MODES)
        check_products_per_call(
            "hvp_products_per_call", self.hvp_products_per_call, "hvp_mode", self.hvp_mode
        )
        check_positive_int("trace_num_matvecs", self.trace_num_matvecs, minimum=4)
        check_positive_int("lanczos_max_iter", self.lanczos_max_iter)
        check_precision_bits("critical_precision_bits", self.critical_precision_bits)
        check_positive_int("critical_predictions", self.critical_predictions, minimum=0)
        check_positive_int("seed", self.seed, minimum=0)
        check_positive_int("probe_size", self.probe_size)
        check_positive_int("probe_seed", self.probe_seed, minimum=0)
        if not (is_finite_number(self.lanczos_tol) and self.lanczos_tol > 0):
            raise ValueError(f"lanczos_tol must be a positive number, got {self.lanczos_tol!r}")
        if self.max_grad_norm is not None and not (
            is_finite_number(self.max_grad_norm) and self.max_grad_norm >= 0
        ):
            raise ValueError(
                f"max_grad_norm must be a non-negative number or None, got {self.max_grad_norm!r}"
            )
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ValueError(f"progress must be True, False or None, got {self.progress!r}")

    def schedule_of(self, measure: str) -> Schedule:
        """The schedule ``measure`` follows: its own in ``schedules``, else ``schedule``, else
        the default of its kind.

        >>> MeterOptions().schedule_of("trace") == HVP_SCHEDULE
        True
        >>> MeterOptions(schedule=Schedule(every=1)).schedule_of("trace")
        Schedule(every=1, per_decade=None, max_fraction=None)
        """
        if measure in self.schedules:
            return self.schedules[measure]
        if self.schedule is not None:
            return self.schedule
        return HVP_SCHEDULE if measure in HVP_MEASURES else FORWARD_SCHEDULE

    def replace(self, **changes: Any) -> MeterOptions:
        """These options with ``changes``, checked; a misspelled name is refused with the
        closest one (``max_grad_nrom``: did you mean ``max_grad_norm``?)."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = [name for name in changes if name not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown sharpness option {unknown[0]!r}{hint}; the options are "
                + ", ".join(names)
            )
        return dataclasses.replace(self, **changes)


def resolve_options(options: MeterOptions | None, changes: dict[str, Any]) -> MeterOptions:
    """What an entry point was given: ``options`` (default :class:`MeterOptions`) with the
    keyword arguments ``changes`` applied."""
    return (options if options is not None else MeterOptions()).replace(**changes)


def _check_measures(measures: Any) -> None:
    if isinstance(measures, str) or not isinstance(measures, Iterable):
        raise ValueError(
            f"measures must be a tuple of names such as ('critical',), got {measures!r}"
        )
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise ValueError(f"measures must be a non-empty subset of {MEASURES}, got {measures}")


def _check_schedules(schedules: Any) -> None:
    if not isinstance(schedules, Mapping):
        raise ValueError(
            f"schedules must be a dict such as {{'trace': Schedule(every=50)}}, got {schedules!r}"
        )
    unknown = [name for name in schedules if name not in MEASURES]
    if unknown:
        raise ValueError(f"schedules names unknown measures {unknown}; measures: {MEASURES}")
    for name, schedule in schedules.items():
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedules[{name!r}] must be a sharpmeter.Schedule, got {schedule!r}")
