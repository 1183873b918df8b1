"""Estimators: pure functions of a square operator (a dense matrix or a Hessian operator).

* ``eigen``: the top eigenpairs by Lanczos or power iteration;
* ``trace``: the trace by Hutchinson or Hutch++, with a standard error;
* ``krylov``: the trace and the top eigenpair together, Hutchinson deflated by the Lanczos basis;
* ``directional``: the curvature along one direction per unit of descent, with one product.

None of them touches a model: :mod:`sharpmeter.measure.operators` turns a model into an
operator, and critical sharpness, which moves the model's parameters, is a line search
(:mod:`sharpmeter.measure.linesearch`).
"""

from sharpmeter.measure.estimators.directional import (
    DirectionalSharpnessResult,
    directional_sharpness,
)
from sharpmeter.measure.estimators.eigen import (
    LanczosResult,
    PowerIterationResult,
    lanczos,
    power_iteration,
)
from sharpmeter.measure.estimators.krylov import TraceAndTopResult, trace_and_top
from sharpmeter.measure.estimators.trace import TraceResult, hutchinson, hutchpp

__all__ = [
    "DirectionalSharpnessResult",
    "LanczosResult",
    "PowerIterationResult",
    "TraceAndTopResult",
    "TraceResult",
    "directional_sharpness",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "power_iteration",
    "trace_and_top",
]
