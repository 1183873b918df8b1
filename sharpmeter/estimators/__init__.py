"""Estimators: pure functions of a square operator (a dense matrix or a Hessian operator)."""

from sharpmeter.estimators.critical import (
    CriticalSharpnessResult,
    DirectionalSharpnessResult,
    critical_sharpness,
    directional_sharpness,
)
from sharpmeter.estimators.eigen import (
    LanczosResult,
    PowerIterationResult,
    lanczos,
    power_iteration,
)
from sharpmeter.estimators.trace import TraceResult, hutchinson, hutchpp

__all__ = [
    "CriticalSharpnessResult",
    "DirectionalSharpnessResult",
    "LanczosResult",
    "PowerIterationResult",
    "TraceResult",
    "critical_sharpness",
    "directional_sharpness",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "power_iteration",
]
