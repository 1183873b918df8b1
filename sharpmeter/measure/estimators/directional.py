r"""Directional sharpness: the curvature along an update direction per unit of descent.

For a direction :math:`d` and the gradient :math:`g`, :math:`d^\top H d / d^\top g` with one
Hessian-vector product: the second-order prediction of critical sharpness
(:func:`sharpmeter.measure.linesearch.critical_sharpness`), which it equals on a quadratic.

Example::

    d = sm.update_direction(optimizer)
    r = sm.directional_sharpness(sm.HessianOperator(model, None, batch), d)
    print(r.value, r.status)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sharpmeter.measure.estimators._operator import CountingOperator, LinearOperator
from sharpmeter.measure.params import ParameterVector, as_flat_vector


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
    direction: ParameterVector | torch.Tensor,
    gradient: torch.Tensor | None = None,
) -> DirectionalSharpnessResult:
    r"""Directional sharpness :math:`d^\top H d / d^\top g` with one Hessian-vector product.

    The second-order prediction of
    :func:`~sharpmeter.measure.linesearch.critical_sharpness`; on a quadratic the two agree
    where the curvature along :math:`d` is positive. A negative value (negative curvature) is
    ``ok`` here, where critical sharpness says ``no_increase``: the loss never rises along
    :math:`d`.
    ``gradient`` defaults to the operator's own (``HessianOperator.gradient``). A
    :class:`~sharpmeter.measure.params.ParameterVector` direction (what
    :func:`~sharpmeter.measure.directions.update_direction` returns) is read in the operator's
    parameter order.
    """
    op = CountingOperator(operator)
    if gradient is None:
        gradient = getattr(operator, "gradient", None)
        if gradient is None:
            raise ValueError("pass gradient=: this operator does not carry one")
    if isinstance(direction, ParameterVector):
        params = getattr(operator, "params", None)
        if params is None:
            raise ValueError("a ParameterVector direction needs an operator over parameters")
        direction = as_flat_vector(direction, params, "direction")
    d = direction.to(device=op.device, dtype=op.dtype)
    g = gradient.to(device=op.device, dtype=op.dtype)
    if d.shape != (op.dim,) or g.shape != (op.dim,):
        raise ValueError(f"direction and gradient must be flat vectors of length {op.dim}")
    if not (torch.isfinite(d).all() and torch.isfinite(g).all()):
        raise ValueError("the direction and the gradient must be finite")
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
