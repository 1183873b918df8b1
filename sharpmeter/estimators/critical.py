r"""Critical sharpness (Kalra et al. 2026, arXiv 2601.16979) and directional sharpness.

For the probe loss :math:`L` and an update direction :math:`d` (what the optimizer subtracts
per unit learning rate), the *critical learning rate* is the smallest step that raises the loss,

.. math:: \eta_c = \min\{\eta > 0 : L(\theta - \eta d) > L(\theta)\}, \qquad
          \lambda_c = 2 / \eta_c .

On a quadratic :math:`L = \tfrac12 \theta^\top H \theta - b^\top\theta` with gradient
:math:`g`, :math:`L(\theta - \eta d) - L(\theta) = -\eta\, d^\top g + \tfrac12 \eta^2 d^\top H d`,
so :math:`\eta_c = 2 d^\top g / d^\top H d` and :math:`\lambda_c = d^\top H d / d^\top g`, the
*directional sharpness* that :func:`directional_sharpness` computes with one HVP. Along the
gradient it is the Rayleigh quotient :math:`g^\top H g / g^\top g`. Critical sharpness needs
forward passes only (and one backward for the descent check), so it works wherever training
works (DDP, FSDP2, bf16), and it sees the loss beyond second order.

On an FSDP2 model (``fully_shard``), a flat ``direction`` or ``gradient`` is this rank's shard
of every parameter, and a per-parameter list holds ``DTensor`` objects sharded like the
parameters (as ``.grad`` is); see :mod:`sharpmeter.distributed`.

Example::

    d = sm.update_direction(optimizer)
    r = sm.critical_sharpness(model, None, batch, d, eta0=previous.eta_c)
    print(r.value, r.status, r.num_forward)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sharpmeter.distributed import local
from sharpmeter.estimators._operator import CountingOperator, LinearOperator, check_positive_int
from sharpmeter.loss import LossFn, ProbeLoss, probe_loss_and_gradient
from sharpmeter.params import all_finite, as_flat_vector, dot, resolve_params, unflatten

STATUSES = ("ok", "nondescent", "no_increase", "nonfinite")


@dataclass(frozen=True)
class CriticalSharpnessResult:
    """Critical sharpness with its bracket.

    Attributes:
        value: :math:`\\lambda_c = 2/\\eta_c` (NaN unless ``status == "ok"``).
        eta_c: the geometric midpoint of the bracket, :math:`\\sqrt{lo \\cdot hi}`.
        lo: largest step seen that did not raise the loss (NaN if none).
        hi: smallest step seen that raised it (NaN if none), so :math:`lo < \\eta_c \\le hi`.
        num_forward: forward passes spent, the base loss included.
        status: ``ok``; ``nondescent`` (:math:`d^\\top g \\le 0`, or every step down to the
            smallest tried raised the loss); ``no_increase`` (no step up to the largest tried
            raised it: :math:`\\lambda_c < 2/lo`); ``nonfinite`` (the base loss is not finite).
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
    direction: torch.Tensor | Sequence[torch.Tensor],
    *,
    params: Iterable[nn.Parameter] | None = None,
    eta0: float = 1e-3,
    k: int = 4,
    max_forward: int = 64,
    gradient: torch.Tensor | Sequence[torch.Tensor] | None = None,
    loss: float | None = None,
    check_descent: bool = True,
    weights: Sequence[float] | None = None,
    dropout_seed: int | None = 0,
    distributed: bool | None = None,
) -> CriticalSharpnessResult:
    r"""Critical sharpness :math:`2/\eta_c` along ``direction`` by a forward-only line search.

    1. One forward gives :math:`L(\theta)` (with a backward for :math:`g` when ``gradient`` is
       not given and ``check_descent``); :math:`d^\top g \le 0` stops with ``nondescent``.
    2. Exponential search by factors of 2 from ``eta0`` (warm start: the previous
       :math:`\eta_c`) brackets :math:`\eta_c` in :math:`(lo, hi]` with :math:`hi = 2\,lo`.
    3. Geometric bisection :math:`\sqrt{lo\cdot hi}` until :math:`1 - lo/hi \le 2^{-k}`,
       which takes exactly :math:`k` steps from a factor-2 bracket (:math:`k \ge 2`).

    When ``eta0`` is within a factor 2 of :math:`\eta_c` the search costs :math:`1 + 2 + k`
    forwards. A non-finite loss counts as an increase. The parameters are set by copy from a
    snapshot (:math:`\theta_0 - \eta d`, never by adding and subtracting) and restored the same
    way; their bit-identity is checked. Losses are compared in float32 or wider.

    Args:
        model: the network (any mode; dropout masks are fixed by ``dropout_seed``).
        loss_fn: ``(model, batch) -> scalar`` or ``None`` for ``output.loss``.
        batch: one batch or a ``list`` of batches.
        direction: :math:`d`, flat or one tensor per parameter.
        params: the parameters ``direction`` lives on (default: all trainable ones).
        eta0: first step tried.
        k: bisection precision, relative bracket width :math:`2^{-k}`.
        max_forward: budget of forwards, the base one included.
        gradient: :math:`g` if already known (e.g. the training gradient); saves a backward.
        loss: :math:`L(\theta)` if already known (with ``gradient``); saves the base forward,
            which is then not counted.
        check_descent: compute :math:`g` when not given to detect a non-descent direction.
        weights: per-batch weights of a multi-batch probe.
        dropout_seed: RNG seed of every forward (``None``: leave the global RNG alone).
        distributed: ``batch`` is this rank's shard; losses are summed over ranks, so every
            rank takes the same decisions (default: inside a process group of >1 rank).
    """
    if not (eta0 > 0 and math.isfinite(eta0)):
        raise ValueError(f"eta0 must be positive and finite, got {eta0}")
    check_positive_int("k", k)
    check_positive_int("max_forward", max_forward, minimum=3)
    chosen = resolve_params(model, params)
    d = as_flat_vector(direction, chosen, "direction")
    if not all_finite(d, chosen):
        raise ValueError("the direction has non-finite entries")
    probe = ProbeLoss(
        model, loss_fn, batch, weights=weights, seed=dropout_seed, distributed=distributed
    )
    search = _LineSearch(probe, chosen, d)
    try:
        if loss is not None and gradient is not None:
            g = as_flat_vector(gradient, chosen, "gradient")
        else:
            loss, g = _base_loss(probe, chosen, gradient, check_descent)
            search.num_forward = 1
        slope = float(dot(d, g, chosen)) if g is not None else math.nan
        if not math.isfinite(loss):
            status, lo, hi = "nonfinite", math.nan, math.nan
        elif slope <= 0:
            status, lo, hi = "nondescent", math.nan, math.nan
        else:
            status, lo, hi = search.bracket(loss, eta0, k, max_forward)
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
    """Evaluates :math:`L(\\theta_0 - \\eta d)` by copy and brackets the first increase."""

    def __init__(self, probe: ProbeLoss, params: list[nn.Parameter], d: torch.Tensor) -> None:
        self.probe = probe
        self.params = params
        self.theta0 = [p.detach().clone() for p in params]
        self.direction = unflatten(d, params)
        self.num_forward = 0

    def raises_loss(self, eta: float, base: float) -> bool:
        with torch.no_grad():
            for p, t, d in zip(self.params, self.theta0, self.direction, strict=True):
                p.copy_(t - eta * d)
            loss = float(self.probe.reduce(self.probe()))
        self.num_forward += 1
        return not math.isfinite(loss) or loss > base

    def bracket(
        self, base: float, eta0: float, k: int, max_forward: int
    ) -> tuple[str, float, float]:
        """Status and bracket ``(lo, hi]`` of the first step that raises the loss."""
        lo, hi = math.nan, math.nan
        eta = eta0
        if self.raises_loss(eta, base):
            hi = eta
            while math.isnan(lo):
                if self.num_forward >= max_forward:
                    return "nondescent", lo, hi
                eta /= 2
                if self.raises_loss(eta, base):
                    hi = eta
                else:
                    lo = eta
        else:
            lo = eta
            while math.isnan(hi):
                if self.num_forward >= max_forward:
                    return "no_increase", lo, hi
                eta *= 2
                if self.raises_loss(eta, base):
                    hi = eta
                else:
                    lo = eta
        while 1 - lo / hi > 2.0**-k and self.num_forward < max_forward:
            mid = math.sqrt(lo * hi)
            if self.raises_loss(mid, base):
                hi = mid
            else:
                lo = mid
        return "ok", lo, hi

    def restore(self) -> None:
        with torch.no_grad():
            for p, t in zip(self.params, self.theta0, strict=True):
                p.copy_(t)
        restored = zip(self.params, self.theta0, strict=True)
        if not all(torch.equal(local(p), local(t)) for p, t in restored):
            raise RuntimeError("parameters were not restored bit-identically")


@dataclass(frozen=True)
class DirectionalSharpnessResult:
    """:math:`d^\\top H d / d^\\top g` with its parts.

    ``value`` is NaN with ``status == "nondescent"`` when :math:`d^\\top g \\le 0`.
    """

    value: float
    curvature: float
    slope: float
    num_matvecs: int
    status: str


def directional_sharpness(
    operator: LinearOperator | torch.Tensor,
    direction: torch.Tensor,
    gradient: torch.Tensor | None = None,
) -> DirectionalSharpnessResult:
    r"""Directional sharpness :math:`d^\top H d / d^\top g` with one Hessian-vector product.

    The second-order prediction of :func:`critical_sharpness`; on a quadratic the two agree.
    ``gradient`` defaults to the operator's own (``HessianOperator.gradient``).
    """
    op = CountingOperator(operator)
    if gradient is None:
        gradient = getattr(operator, "gradient", None)
        if gradient is None:
            raise ValueError("pass gradient=: this operator does not carry one")
    d = direction.to(device=op.device, dtype=op.dtype)
    g = gradient.to(device=op.device, dtype=op.dtype)
    if d.shape != (op.dim,) or g.shape != (op.dim,):
        raise ValueError(f"direction and gradient must be flat vectors of length {op.dim}")
    slope = float(d @ g)
    curvature = float(d @ (op @ d))
    descent = slope > 0
    return DirectionalSharpnessResult(
        value=curvature / slope if descent else math.nan,
        curvature=curvature,
        slope=slope,
        num_matvecs=op.num_matvecs,
        status="ok" if descent else "nondescent",
    )
