"""sharpmeter: loss-landscape sharpness of real PyTorch models, measured while they train.

Example::

    import sharpmeter as sm

    op = sm.HessianOperator(model, None, batch)        # Hessian of the probe loss
    top = sm.lanczos(op, k=1)                          # .value .residual .num_matvecs
    tr = sm.hutchinson(op, num_matvecs=32)             # .value .stderr
"""

from sharpmeter.directions import adam_preconditioner, learning_rate, update_direction
from sharpmeter.estimators import (
    CriticalSharpnessResult,
    DirectionalSharpnessResult,
    LanczosResult,
    PowerIterationResult,
    TraceResult,
    critical_sharpness,
    directional_sharpness,
    hutchinson,
    hutchpp,
    lanczos,
    power_iteration,
)
from sharpmeter.measures import MEASURES
from sharpmeter.meter import SharpnessMeter
from sharpmeter.operators import (
    HessianOperator,
    NonFiniteLossError,
    PreconditionedOperator,
)
from sharpmeter.options import MeterOptions
from sharpmeter.probe import attention_guard, measurement
from sharpmeter.schedule import Schedule

__version__ = "0.1.0"

__all__ = [
    "CriticalSharpnessResult",
    "DirectionalSharpnessResult",
    "HessianOperator",
    "LanczosResult",
    "NonFiniteLossError",
    "PowerIterationResult",
    "PreconditionedOperator",
    "TraceResult",
    "adam_preconditioner",
    "attention_guard",
    "critical_sharpness",
    "directional_sharpness",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "learning_rate",
    "MEASURES",
    "MeterOptions",
    "Schedule",
    "SharpnessMeter",
    "update_direction",
    "measurement",
    "power_iteration",
]
