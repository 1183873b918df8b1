r"""Critical sharpness (Kalra et al. 2026, arXiv 2601.16979): a line search on the model.

Not an estimator of :mod:`sharpmeter.measure.estimators` (pure functions of a square operator):
the search evaluates the loss at moved parameters, so it writes the model's parameters (and puts
them back bit-identically), beside the operators that differentiate the same model.

For the probe loss :math:`L` and an update direction :math:`d` (what the optimizer subtracts
per unit learning rate), the *critical learning rate* is the smallest step that raises the loss,

.. math:: \eta_c = \min\{\eta > 0 : L(\theta - \eta d) > L(\theta)\}, \qquad
          \lambda_c = 2 / \eta_c .

On a quadratic :math:`L = \tfrac12 \theta^\top H \theta - b^\top\theta` with gradient
:math:`g`, :math:`L(\theta - \eta d) - L(\theta) = -\eta\, d^\top g + \tfrac12 \eta^2 d^\top H d`,
so :math:`\eta_c = 2 d^\top g / d^\top H d` and :math:`\lambda_c = d^\top H d / d^\top g`, the
*directional sharpness* that
:func:`~sharpmeter.measure.estimators.directional.directional_sharpness` computes with one HVP.
Along the gradient it is the Rayleigh quotient :math:`g^\top H g / g^\top g`. Critical
sharpness needs forward passes only (and one backward for the descent check), so it works
wherever training works (DDP, FSDP2, bf16), and it sees the loss beyond second order.

On an FSDP2 model (``fully_shard``), a flat ``direction`` or ``gradient`` is this rank's shard
of every parameter, and a per-parameter list holds ``DTensor`` objects sharded like the
parameters (as ``.grad`` is); see :mod:`sharpmeter.measure.distributed`.

Example::

    d = sm.update_direction(optimizer)
    r = sm.critical_sharpness(model, None, batch, d, eta0=previous.eta_c)
    print(r.value, r.status, r.num_forward)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sharpmeter.measure.checks import check_positive_int
from sharpmeter.measure.distributed import all_reduce_sum, is_sharded, local
from sharpmeter.measure.loss import LossFn, ProbeLoss, probe_loss_and_gradient
from sharpmeter.measure.params import (
    ParameterVector,
    all_finite,
    as_flat_vector,
    bit_identical,
    copy_into,
    dot,
    resolve_params,
    storage_eps,
    unflatten,
    vector_dtype,
)
from sharpmeter.measure.schema import NONFINITE

STATUSES = ("ok", "nondescent", "unresolved", "no_increase", NONFINITE, "not_converged")
# Steps at the model's crossing per bracketing (again after a check below rises), before
# doubling, halving or bisecting.
PREDICTIONS = 4
ACROSS = 0.9  # of the bracket width asked: a step across a predicted crossing near an end
EXTRAPOLATIONS = 2  # predictions from one end per bracketing: the prediction, then across it
MAX_PRECISION_BITS = 52  # 1 - lo/hi <= 2^-b beyond this needs steps a double cannot tell apart
MIN_CURVATURE = 0.1  # of s * p: curvature seen at a single step p that a prediction needs
# A step resolves a change of the loss only if its first-order change s * eta is at least
# ROUNDING epsilons of the loss's dtype times |L| (rounding alone moved a float32 GPT-2's loss by
# up to 1.5 eps |L| at steps too small to change it, enough to fake a rise) and ACTIVATIONS
# epsilons of the dtype the network computes in (a bf16 model's activations moved its float32
# loss by up to 0.03 eps_bf16 |L| from float32 arithmetic at the same parameters on 64 tokens;
# 1/8 keeps every warm start of a bf16 LoRA model on 16 tokens ok, 0 left 14 of 20 nondescent
# then)
ROUNDING = 8
ACTIVATIONS = 1 / 8
# ... and if the parameters as stored, theta0 - eta d rounded to their dtype, move by eta d to
# within this fraction, in norm and in first-order change: below it a bf16 step moves a few
# entries by whole ulps and leaves the others where they are.
FAITHFUL = 0.5
CHUNK = 2**22  # entries a pass over the parameters takes at a time (16 MiB in float32)


@dataclass(frozen=True)
class CriticalSharpnessResult:
    """Critical sharpness with its bracket.

    Attributes:
        value: :math:`\\lambda_c = 2/\\eta_c` (NaN unless ``status == "ok"``).
        eta_c: the geometric midpoint of the bracket, :math:`\\sqrt{lo \\cdot hi}` (NaN unless
            ``status == "ok"``).
        lo: the final bracket's lower end, a step that did not raise the loss (NaN if none).
        hi: its upper end, a step that raised it (NaN if none), so :math:`lo < \\eta_c \\le hi`.
        num_forward: forward passes spent, the base loss included.
        status: one of :data:`STATUSES`:

            - ``ok``: :math:`1 - lo/hi \\le 2^{-b}`, the loss at ``hi`` is finite and above
              :math:`L(\\theta)`, and none of the ``check_below`` steps below the smallest step
              that did not raise the loss raised it.
            - ``nondescent``: :math:`d^\\top g \\le 0`.
            - ``unresolved``: :math:`d^\\top g > 0`, but the loss rose at every step down to the
              smallest it can tell from rounding (step 5 of :func:`critical_sharpness`), or no
              step along :math:`d` is that large: a dip, if any, shallower than rounding.
              Without :math:`g` (``check_descent=False``): no step lowered the loss by more
              than rounding can (:math:`\\tau`, step 5), so nothing shows that ``lo`` is a dip.
            - ``no_increase``: no step up to the largest tried raised the loss, so
              :math:`\\lambda_c < 2/lo` (``hi`` NaN).
            - ``nonfinite``: the base loss is not finite, or the loss at the final ``hi`` is not
              (it went from at most :math:`L(\\theta)` at ``lo`` to NaN/inf at ``hi`` and no
              finite rise was seen at the bracket's top). The first non-finite step ``hi`` is then
              only an upper bound, :math:`\\eta_c \\le hi`, not a crossing of the loss. Takes
              precedence over ``not_converged``.
            - ``not_converged``: a bracket was found but ``max_forward`` ran out before it was
              verified: the bisection short of :math:`1 - lo/hi \\le 2^{-b}`, the check below
              unfinished, or a downward search from a rising check step without a step that
              does not rise (``lo`` NaN). ``lo`` and ``hi`` show the bracket as far as it got.
        loss: the probe loss :math:`L(\\theta)` (float32 or wider).
        slope: :math:`d^\\top g` when the gradient was available, else NaN.
    """

    value: float
    eta_c: float
    lo: float
    hi: float
    num_forward: int
    status: str
    loss: float
    slope: float


def critical_sharpness(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch: Any,
    direction: ParameterVector | torch.Tensor | Sequence[torch.Tensor],
    *,
    params: Iterable[nn.Parameter] | None = None,
    eta0: float = 1e-3,
    precision_bits: int = 4,
    max_forward: int = 64,
    check_below: int = 2,
    predictions: int = PREDICTIONS,
    gradient: torch.Tensor | Sequence[torch.Tensor] | None = None,
    loss: float | None = None,
    check_descent: bool = True,
    weights: Sequence[float] | None = None,
    seed: int | None = 0,
    distributed: bool | None = None,
) -> CriticalSharpnessResult:
    r"""Critical sharpness :math:`2/\eta_c` along ``direction`` by a forward-only line search.

    1. One forward gives :math:`L(\theta)` (with a backward for :math:`g` when ``gradient`` is
       not given and ``check_descent``); :math:`d^\top g \le 0` stops with ``nondescent``.
    2. Exponential search by factors of 2 from ``eta0`` (warm start: the previous
       :math:`\eta_c`) brackets :math:`\eta_c` in :math:`(lo, hi]` with :math:`hi = 2\,lo`.
    3. Geometric bisection :math:`\sqrt{lo\cdot hi}` until :math:`1 - lo/hi \le 2^{-b}`,
       which takes exactly :math:`b` = ``precision_bits`` steps from a factor-2 bracket
       (:math:`b \ge 2`).

    3'. Before each doubling, halving or bisection, while ``predictions`` are left, the rises
       :math:`r(\eta) = L(\theta - \eta d) - L(\theta)` already seen predict the crossing:
       from one step :math:`p` and the slope :math:`s = d^\top g`, the quadratic
       :math:`r = -s\eta + c\eta^2` through it crosses at :math:`s p^2 / (r(p) + s p)`; from
       both ends of a bracket, the cubic :math:`-s\eta + c\eta^2 + k\eta^3` through them
       (else a quadratic, else the secant). The step a quarter of the precision asked below
       the prediction is tried, or, for a prediction within half the precision of an end, the
       step 0.9 of the precision across it from that end. On a quadratic a warm start then
       costs :math:`1 + 1 + 2 + m` forwards instead of :math:`1 + 2 + b + m`. The prediction
       only chooses where to look: every answer is a bracket of seen losses, as in steps 2
       and 3. A step goes no farther than doubling or halving would (within a quarter of the
       precision; a bump may hide beyond), though not onto their grid.
    4. Check below: a warm start past the first crossing of a loss that is not monotone along
       :math:`d` brackets a later one. So the :math:`m` = ``check_below`` steps
       :math:`s/4, s/16, \dots, s/4^m` below the smallest step :math:`s` that did not raise
       the loss are tried; if one raises it, the first crossing lies below: it becomes the new
       ``hi``, halving from it finds ``lo``, and steps 3 and 4 repeat. Every interval
       :math:`(a, b) \subset [s\,4^{-m-1}, s]` with :math:`b/a > 4` on which the loss rises
       holds a check step, so :math:`m` forwards watch a factor :math:`4^m` (16 by default)
       below :math:`s`, the overshoot of a warm start when :math:`\eta_c` shrinks between
       measurements; factor 2 would watch only :math:`2^m`, a wider factor would step over
       narrower rises. No finite number of forwards excludes every earlier crossing: this is
       a cheap guard, not a proof. On a loss that falls all the way to :math:`\eta_c` (a
       quadratic) no check step rises.
    5. Resolution: a step is tried only if the loss can tell its rise from rounding. Its
       first-order change :math:`s\eta` must be at least ``ROUNDING`` (8) epsilons of the
       loss's dtype (as ``loss_fn`` returns it) and ``ACTIVATIONS`` (1/8) of the dtype the
       network computes in (its modules' outputs in the first forward: bf16 weights, autocast,
       FSDP's ``param_dtype``), times :math:`|L(\theta)|`. And the parameters as stored,
       :math:`\mathrm{fl}(\theta_0 - \eta d)`, must move by :math:`\eta d` to within half
       of it, in norm and in first-order change. A warm start below that doubles (no forward),
       the downward search stops there (``unresolved``: the loss rose at every step it
       resolves) and so does the check below (no rise below could be told from rounding).
       Otherwise one or two ulps of rounding at a step far below :math:`\eta_c` (a LoRA
       model's small :math:`d^\top g`, a bf16 model's steps of whole ulps) fake a crossing.
       The first-order change is taken from ``gradient``: a clipped one (a factor
       :math:`c < 1`) raises the resolution :math:`1/c` times, so a dip that shallow reads
       ``unresolved``; without any (``check_descent=False``) only the storage is checked.

    Without predictions, when ``eta0`` is within a factor 2 of :math:`\eta_c` (and no check
    step rises) the search costs :math:`1 + 2 + b + m` forwards. A non-finite loss counts as an
    increase while searching (training would not survive the step), but only a finite rise at the
    final ``hi`` is ``ok``: a loss that goes from below :math:`L(\theta)` straight to NaN/inf gives
    ``nonfinite``, and a bracket not verified within ``max_forward`` gives ``not_converged``
    (see :class:`CriticalSharpnessResult`). Every branch compares losses reduced over ranks at
    steps that are fixed functions of the ones already tried, so every rank takes the same
    branches. The parameters are set by copy from a snapshot (:math:`\theta_0 - \eta d`, never
    by adding and subtracting) and restored the same way; their bit-identity is checked. Losses
    are compared in float32 or wider.

    Args:
        model: the network (any mode; dropout masks are fixed by ``seed``).
        loss_fn: ``(model, batch) -> scalar`` or ``None`` for ``output.loss``.
        batch: one batch or a ``list`` of batches.
        direction: :math:`d`: a :class:`~sharpmeter.measure.params.ParameterVector` (what
            :func:`~sharpmeter.update_direction` returns), read by parameter identity and
            required to cover exactly ``params`` (restrict it with ``d.over(params)``, else
            ``ValueError``); a flat tensor in the order of ``params``; or one tensor per
            parameter.
        params: the parameters ``direction`` lives on (default: all trainable ones).
        eta0: first step tried.
        precision_bits: bisection precision :math:`b`, relative bracket width :math:`2^{-b}`.
        max_forward: budget of forwards, the base one included.
        check_below: steps tried below the bracket for an earlier crossing (0: none).
        predictions: steps at the model's crossing per search (0: plain doubling, halving
            and bisection, step 3' off).
        gradient: :math:`g` if already known (e.g. the training gradient); saves a backward.
        loss: :math:`L(\theta)` if already known (with ``gradient``); saves the base forward,
            which is then not counted.
        check_descent: compute :math:`g` when not given to detect a non-descent direction
            and to tell steps from rounding (step 5).
        weights: per-batch weights of a multi-batch probe.
        seed: RNG seed of every forward (``None``: leave the global RNG alone).
        distributed: ``batch`` is this rank's shard; losses are summed over ranks, so every
            rank takes the same decisions (default: inside a process group of >1 rank).
    """
    if not (eta0 > 0 and math.isfinite(eta0)):
        raise ValueError(f"eta0 must be positive and finite, got {eta0}")
    check_precision_bits("precision_bits", precision_bits)
    check_positive_int("max_forward", max_forward, minimum=3)
    check_positive_int("check_below", check_below, minimum=0)
    check_positive_int("predictions", predictions, minimum=0)
    chosen = resolve_params(model, params)
    d = as_flat_vector(direction, chosen, "direction")
    if not all_finite(d, chosen):
        raise ValueError("the direction has non-finite entries")
    probe = ProbeLoss(model, loss_fn, batch, weights=weights, seed=seed, distributed=distributed)
    if loss is not None and gradient is not None:
        g, base_forwards = as_flat_vector(gradient, chosen, "gradient"), 0
    else:
        (loss, g), base_forwards = _base_loss(probe, chosen, gradient, check_descent), 1
    slope = float(dot(d, g, chosen)) if g is not None else math.nan
    search = _LineSearch(probe, chosen, d, g)
    search.num_forward = base_forwards
    try:
        if not math.isfinite(loss):
            status, lo, hi = NONFINITE, math.nan, math.nan
        elif slope <= 0:
            status, lo, hi = "nondescent", math.nan, math.nan
        else:
            status, lo, hi = search.bracket(
                loss, eta0, precision_bits, max_forward, check_below, slope, predictions
            )
    finally:
        search.restore()
    eta_c = math.sqrt(lo * hi) if status == "ok" else math.nan
    return CriticalSharpnessResult(
        value=2 / eta_c if status == "ok" else math.nan,
        eta_c=eta_c,
        lo=lo,
        hi=hi,
        num_forward=search.num_forward,
        status=status,
        loss=loss,
        slope=slope,
    )


def check_precision_bits(name: str, value: Any) -> None:
    """A ValueError unless ``value`` is an integer in ``[1, MAX_PRECISION_BITS]``."""
    check_positive_int(name, value)
    if value > MAX_PRECISION_BITS:
        raise ValueError(
            f"{name} must be at most {MAX_PRECISION_BITS} (a double's mantissa), got {value}"
        )


def _base_loss(
    probe: ProbeLoss,
    params: list[nn.Parameter],
    gradient: torch.Tensor | Sequence[torch.Tensor] | None,
    check_descent: bool,
) -> tuple[float, torch.Tensor | None]:
    if gradient is None and check_descent:
        loss, g = probe_loss_and_gradient(probe, params)
        return float(loss), g
    with torch.no_grad():
        loss = float(probe.reduce(probe().detach()))
    return loss, None if gradient is None else as_flat_vector(gradient, params, "gradient")


class _LineSearch:
    """Evaluates :math:`L(\\theta_0 - \\eta d)` by copy and brackets the first increase.

    Every step tried raises the loss or not; a non-finite loss raises it. Only steps that
    :meth:`resolves` are tried. ``rise`` holds :math:`L(\\theta_0 - \\eta d) - L(\\theta_0)` by step
    (inf where not finite), what the quadratic model is fitted to; ``smallest_flat`` is the
    smallest step that did not raise the loss, the anchor of the check below; ``nonfinite``
    holds the steps whose loss was not finite, to tell a finite rise at ``hi`` from a blow-up.
    """

    def __init__(
        self,
        probe: ProbeLoss,
        params: list[nn.Parameter],
        d: torch.Tensor,
        g: torch.Tensor | None,
    ) -> None:
        self.probe = probe
        self.params = params
        self.theta0 = [p.detach().clone() for p in params]
        self.versions = [p._version for p in params]
        self.direction = unflatten(d, params)
        # Flat slices of g by parameter (views, not a copy in a bf16 parameter's dtype).
        self.gradient = None if g is None else list(g.split([local(p).numel() for p in params]))
        self.num_forward = 0
        self.base = math.nan
        self.max_forward = 0
        self.tolerance = math.nan
        self.slope = math.nan
        self.predictions = 0
        self.rise: dict[float, float] = {}
        self.smallest_flat = math.inf
        self.nonfinite: set[float] = set()
        self.faithful_from = math.inf
        self.direction_norm2 = math.nan  # ||d||^2, from surely_faithful's pass
        # The network's coarsest epsilon until a forward shows the dtype it computes in.
        self.model_eps = storage_eps(probe.model.parameters())
        self.unresolved = False  # a downward search stopped at the resolution

    def raises_loss(self, eta: float) -> bool:
        copy_into(
            self.params, [t - eta * d for t, d in zip(self.theta0, self.direction, strict=True)]
        )
        with torch.no_grad():
            loss = float(self.probe.reduce(self.probe()))
        self.num_forward += 1
        if not math.isfinite(loss):
            self.nonfinite.add(eta)
            self.rise[eta] = math.inf
            return True
        self.rise[eta] = loss - self.base
        if loss > self.base:
            return True
        self.smallest_flat = min(self.smallest_flat, eta)
        return False

    def rounding(self) -> float:
        """The change of the loss that rounding alone can make, :math:`\\tau`: ``ROUNDING``
        epsilons of the losses' dtype (as ``loss_fn`` returned them) and ``ACTIVATIONS`` of the
        network's (its modules' outputs: bf16 weights, autocast, FSDP's ``param_dtype``) times
        :math:`|L(\\theta)|`; before a forward has shown them, the parameters' dtypes."""
        loss_eps = self.probe.loss_eps or torch.finfo(vector_dtype(self.params)).eps
        compute_eps = self.probe.compute_eps or self.model_eps
        return max(ROUNDING * loss_eps, ACTIVATIONS * compute_eps) * abs(self.base)

    def budget_left(self) -> bool:
        return self.num_forward < self.max_forward

    def bracket(
        self,
        base: float,
        eta0: float,
        precision_bits: int,
        max_forward: int,
        check_below: int,
        slope: float,
        predictions: int,
    ) -> tuple[str, float, float]:
        """Status and bracket ``(lo, hi]`` of the first step that raises the loss."""
        self.base, self.max_forward, self.slope = base, max_forward, slope
        self.tolerance = 2.0**-precision_bits
        self.predictions = predictions
        self.faithful_from = self.surely_faithful()
        first = self.first_step(eta0)
        if first is None:
            return "unresolved", math.nan, math.nan  # no step along d resolves the loss
        lo, hi = self.refine(*first)
        if math.isnan(hi):
            return "no_increase", lo, hi
        if math.isnan(lo):
            return ("unresolved" if self.unresolved else "not_converged"), lo, hi
        while self.narrow(lo, hi):
            rise = self.rise_below(check_below)
            if rise is None:
                if not (self.slope > 0 or self.dip_seen()):
                    return "unresolved", lo, hi
                return self.status(hi, verified=True), lo, hi
            if math.isnan(rise):
                break
            lo, hi = self.refine(math.nan, rise)
            if self.unresolved:
                return "unresolved", lo, hi
        return self.status(hi, verified=False), lo, hi

    def first_step(self, eta0: float) -> tuple[float, float] | None:
        """The bracket after the first step: ``eta0``, doubled until it :meth:`resolves` the
        loss (no forward), or None when none does. A loss given without its dtype (the meter's)
        shows how coarsely it rounds only at this first forward: if the step no longer resolves
        by what it showed, that step is forgotten and the doubling goes on."""
        for _ in range(2):
            while math.isfinite(eta0) and not self.resolves(eta0):
                eta0 *= 2
            if not math.isfinite(eta0):
                return None
            bracket = self.step(eta0, math.nan, math.nan)
            if self.resolves(eta0):
                return bracket
            self.rise.clear()
            self.nonfinite.clear()
            self.smallest_flat = math.inf
        return None

    def dip_seen(self) -> bool:
        """Whether a step lowered the loss by more than rounding can: without a slope, the only
        evidence that ``lo`` is a dip and not a step too small to change the loss (an ascent
        direction halved down to where the parameters hardly move would end in a 'crossing'
        there)."""
        return any(rise < -self.rounding() for rise in self.rise.values())

    def status(self, hi: float, verified: bool) -> str:
        # A blow-up at the top says more than a short budget: no finite rise was seen at all.
        if hi in self.nonfinite:
            return NONFINITE
        return "ok" if verified else "not_converged"

    def narrow(self, lo: float, hi: float) -> bool:
        """Whether ``(lo, hi]`` is a bracket of the precision asked (False while an end is NaN)."""
        return 1 - lo / hi <= self.tolerance

    def step(self, eta: float, lo: float, hi: float) -> tuple[float, float]:
        """The bracket once ``eta`` is tried: its new ``hi`` if it raises the loss, else ``lo``."""
        return (lo, eta) if self.raises_loss(eta) else (eta, hi)

    def refine(self, lo: float, hi: float) -> tuple[float, float]:
        """Narrow ``(lo, hi]`` (an end NaN: not found yet) to the precision asked or until the
        budget runs out: at the model's crossing while predictions are left and the model has
        one, else doubling ``lo``, halving ``hi`` or geometric bisection. At most
        ``self.predictions`` predictions, ``EXTRAPOLATIONS`` of them from one end, none after
        one from ``hi`` rose again. Downward, no lower than :meth:`resolves`."""
        predictions, extrapolations = self.predictions, EXTRAPOLATIONS
        while self.budget_left() and not self.narrow(lo, hi):
            one_sided = math.isnan(lo) or math.isnan(hi)
            predicted = None
            if predictions > 0 and (extrapolations > 0 or not one_sided):
                predicted = self.prediction(lo, hi)
            if predicted is not None:
                predictions -= 1
                extrapolations -= one_sided
                eta = self.across(predicted, lo, hi)
            elif math.isnan(hi):
                eta = 2 * lo
            elif math.isnan(lo):
                eta = hi / 2
            else:
                eta = math.sqrt(lo * hi)
            if math.isnan(lo) and not self.resolves(eta):
                eta = self.lowest_resolved(eta, hi)
                if eta is None:
                    self.unresolved = True  # the loss rose at every step that resolves it
                    break
            lo, hi = self.step(eta, lo, hi)
            if predicted is not None and one_sided and math.isnan(lo):
                # Aimed below the crossing from above and rose again: the quadratic overshoots.
                extrapolations = 0
        return lo, hi

    def across(self, predicted: float, lo: float, hi: float) -> float:
        """The step to try for a predicted crossing: a quarter of the precision asked below the
        prediction (not on it: an exact prediction would meet a loss equal to the base), or,
        when the prediction lies within half the precision of an end, the step ``ACROSS`` of
        the precision past it from that end (one step then brackets it to the precision)."""
        width = -math.log1p(-self.tolerance)
        if math.log(predicted / lo) < width / 2:  # False while lo is NaN
            return lo * math.exp(ACROSS * width)
        if math.log(hi / predicted) < width / 2:
            return hi * math.exp(-ACROSS * width)
        return predicted * math.exp(-width / 4)

    def prediction(self, lo: float, hi: float) -> float | None:
        """Where the model of the rise :math:`r(\\eta)` crosses 0 inside ``(lo, hi)``, or None.

        With one end :math:`p` and the slope :math:`s = d^\\top g`: the quadratic
        :math:`-s\\eta + c\\eta^2` through it crosses at :math:`s p^2 / (r(p) + s p)`, taken
        within a factor 2 of :math:`p` (no farther than doubling or halving would step, where a
        bump may hide); None when :math:`r(p) + s p`, the curvature seen at :math:`p`, is under
        ``MIN_CURVATURE`` of :math:`s p` (a step too small to extrapolate from, or a slope that
        is not the probe's). With both ends (:func:`_crossing`): the cubic
        :math:`-s\\eta + c\\eta^2 + k\\eta^3` through them, else the quadratic
        :math:`a\\eta + c\\eta^2`, else their secant.
        """
        if not math.isnan(lo) and not math.isnan(hi):
            return _crossing(lo, self.rise[lo], hi, self.rise[hi], self.slope)
        point = hi if math.isnan(lo) else lo
        seen = self.rise[point] + self.slope * point  # NaN without a slope
        if not (math.isfinite(seen) and seen > MIN_CURVATURE * self.slope * point):
            return None
        # s p^2 / seen written as p / ratio: no square to overflow
        return min(max(point / (seen / (self.slope * point)), point / 2), 2 * point)

    def rise_below(self, count: int) -> float | None:
        """The first of :math:`s/4, s/16, \\dots` (``count`` steps, :math:`s` the smallest step
        that did not raise the loss) that raises it; ``None`` if none does or the next one does
        not :meth:`resolves` the loss, NaN if the budget runs out before all are tried."""
        eta = self.smallest_flat
        for _ in range(count):
            if not self.budget_left():
                return math.nan
            eta /= 4
            if not self.resolves(eta):
                # The lowest step that resolves the loss, if it lies above: no rise below it
                # could be told from rounding.
                lowest = self.lowest_resolved(eta, self.smallest_flat)
                return lowest if lowest is not None and self.raises_loss(lowest) else None
            if self.raises_loss(eta):
                return eta
        return None

    def lowest_resolved(self, eta: float, below: float) -> float | None:
        """The first step from ``eta`` up, doubling (from the slope's floor
        :math:`\\tau / s` when that is higher), that :meth:`resolves` the loss, if it lies below
        ``below`` and was not tried yet; else None."""
        floor = self.rounding() / self.slope * (1 + 1e-9)  # NaN without a slope
        eta = max(eta, floor) if math.isfinite(floor) else eta
        while eta < below and not self.resolves(eta):
            eta *= 2
        return eta if eta < below and eta not in self.rise else None

    def resolves(self, eta: float) -> bool:
        r"""Whether a rise at step ``eta`` would be the loss's and not rounding's: its
        first-order change :math:`s\eta` is at least :meth:`rounding` (not asked without a
        slope), and the parameters as stored move by :math:`\eta d` (:meth:`stores_faithfully`,
        taken for granted above the smallest step found to: rounding's share of a step shrinks
        as the step grows, for the sum over many entries, though a few entries can round worse
        at a larger step)."""
        if self.slope * eta < self.rounding():  # never true without a slope (NaN)
            return False
        if eta >= self.faithful_from:
            return True
        if not self.stores_faithfully(eta):
            return False
        self.faithful_from = eta
        return True

    def stores_faithfully(self, eta: float) -> bool:
        r"""Whether the parameters as :meth:`raises_loss` stores them move by :math:`-\eta d`:
        the error :math:`e = \mathrm{fl}(\theta_0 - \mathrm{fl}(\eta d)) - (\theta_0 - \eta d)`
        has :math:`\lVert e\rVert \le` ``FAITHFUL`` :math:`\lVert\eta d\rVert` and, with a
        gradient, :math:`|g^\top e| \le` ``FAITHFUL`` :math:`\eta\, d^\top g`: a coarse entry
        that carries the slope but little of :math:`\lVert d\rVert` stays where it is too."""

        def terms(t: torch.Tensor, d: torch.Tensor, g: torch.Tensor | None) -> tuple:
            error = _wide(t - eta * d) - _wide(t) + eta * _wide(d)
            return error.square().sum(), 0.0 if g is None else torch.dot(_wide(g), error)

        error_norm2, slope_error = self._sums(terms, count=2)
        moved = error_norm2 <= FAITHFUL**2 * eta**2 * self.direction_norm2
        return moved and (self.gradient is None or abs(slope_error) <= FAITHFUL * eta * self.slope)

    def surely_faithful(self) -> float:
        r"""The step from which rounding to nearest stores every step faithfully, so that only
        smaller ones pay for :meth:`stores_faithfully`'s pass over the parameters: entrywise
        :math:`|e_i| \le \epsilon_i(\tfrac12|\theta_i| + 1.01\,\eta|d_i|)` (normal numbers),
        whence both of its bounds."""

        def terms(t: torch.Tensor, d: torch.Tensor, g: torch.Tensor | None) -> tuple:
            eps, t, d = _eps(t), _wide(t), _wide(d)
            bounds = (eps / 2 * t).square().sum(), d.square().sum()
            if g is None:
                return (*bounds, 0.0, 0.0)
            g = _wide(g).abs()
            return (*bounds, torch.dot(g, t.abs()) * eps / 2, torch.dot(g, d.abs()) * eps)

        rounding, self.direction_norm2, slope_rounding, slope_step = self._sums(terms, count=4)
        eps = storage_eps(self.params)
        size = self.direction_norm2
        in_norm = math.sqrt(rounding / size) / (FAITHFUL - 1.01 * eps) if size > 0 else 0.0
        if self.gradient is None:
            return in_norm
        margin = FAITHFUL * self.slope - 1.01 * slope_step
        return max(in_norm, slope_rounding / margin) if margin > 0 else math.inf

    def _sums(
        self,
        terms: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple],
        count: int,
    ) -> list[float]:
        """The ``count`` sums ``terms`` gives for each chunk of :math:`(\\theta_0, d, g)`, over
        the parameters' entries (this rank's shards, then all ranks' when sharded), ``CHUNK``
        entries at a time so that the temporaries stay small, added up in float64. Entries whose
        parameter is not finite are left out: with a finite loss the loss does not use them (an
        embedding row never looked up), and their rounding does not reach it."""
        sums = torch.zeros(count, dtype=torch.float64, device=self.theta0[0].device)
        gradients = self.gradient or [None] * len(self.theta0)
        with torch.no_grad():
            for t, d, g in zip(self.theta0, self.direction, gradients, strict=True):
                for chunk in zip(*(_flat_chunks(x, t) for x in (t, d, g)), strict=True):
                    for i, value in enumerate(terms(*_finite_entries(*chunk))):
                        sums[i] += value
        if is_sharded(self.params):
            sums = all_reduce_sum(sums)
        return sums.tolist()

    def restore(self) -> None:
        copy_into(self.params, self.theta0, self.versions)
        restored = zip(self.params, self.theta0, strict=True)
        if not all(bit_identical(local(p), local(t)) for p, t in restored):
            raise RuntimeError("parameters were not restored bit-identically")


def _flat_chunks(tensor: torch.Tensor | None, like: torch.Tensor) -> Sequence[torch.Tensor | None]:
    """This rank's entries of ``tensor`` in chunks of ``CHUNK``; for None, as many Nones as
    ``like`` has chunks."""
    if tensor is None:
        return [None] * len(local(like).reshape(-1).split(CHUNK))
    return local(tensor).reshape(-1).split(CHUNK)


def _finite_entries(
    t: torch.Tensor, d: torch.Tensor, g: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The chunk ``(t, d, g)`` with the entries where ``t`` is not finite dropped."""
    finite = t.isfinite()
    if bool(finite.all()):
        return t, d, g
    return t[finite], d[finite], None if g is None else g[finite]


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """In float32 or wider, where a bf16 or float32 parameter's rounding error is exact enough."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _eps(tensor: torch.Tensor) -> float:
    return torch.finfo(tensor.dtype).eps


def _crossing(lo: float, rise_lo: float, hi: float, rise_hi: float, slope: float) -> float | None:
    """The zero in ``(lo, hi)`` of the first of these through ``(lo, rise_lo)`` and
    ``(hi, rise_hi)`` that has one there: :math:`-s\\eta + c\\eta^2 + k\\eta^3` (exact on a
    cubic, needs the slope), :math:`a\\eta + c\\eta^2` (exact on a quadratic), the secant
    (always); None for a non-finite rise."""
    if not math.isfinite(rise_hi):
        return None
    try:
        roots = _candidate_roots(lo, rise_lo, hi, rise_hi, slope)
    except (ZeroDivisionError, OverflowError):  # steps at the ends of the float range
        return None
    return next((root for root in roots if lo < root < hi), None)


def _candidate_roots(
    lo: float, rise_lo: float, hi: float, rise_hi: float, slope: float
) -> list[float]:
    roots = []
    if math.isfinite(slope):
        # c eta^2 + k eta^3 = r + s eta at both ends; the crossing solves k eta^2 + c eta = s.
        y_lo, y_hi = (rise_lo + slope * lo) / (lo * lo), (rise_hi + slope * hi) / (hi * hi)
        k = (y_hi - y_lo) / (hi - lo)
        c = y_lo - k * lo
        if k != 0:
            disc = c * c + 4 * k * slope
            if disc >= 0:
                roots += [(-c + sign * math.sqrt(disc)) / (2 * k) for sign in (1, -1)]
        elif c > 0:
            roots.append(slope / c)
    width = lo * hi * (hi - lo)
    a = (rise_lo * hi * hi - rise_hi * lo * lo) / width
    c = (rise_hi * lo - rise_lo * hi) / width
    if c > 0:
        roots.append(-a / c)
    roots.append(lo + (hi - lo) * -rise_lo / (rise_hi - rise_lo))
    return roots
