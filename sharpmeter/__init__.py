"""sharpmeter: loss-landscape sharpness of real PyTorch models, measured while they train.

Example::

    import sharpmeter as sm

    op = sm.HessianOperator(model, None, batch)        # Hessian of the probe loss
    top = sm.lanczos(op, k=1)                          # .value .residual .num_matvecs
    tr = sm.hutchinson(op, num_matvecs=32)             # .value .stderr

Three products live here, each a subpackage (imports run only downwards: see
``tests/test_layout.py``):

* :mod:`sharpmeter.measure`: the measurement library, what this namespace exports;
  :mod:`sharpmeter.integrations` plugs it into Hugging Face's Trainer and Accelerate;
* :mod:`sharpmeter.harness`: the GPT-2 study harness (config, data, models, training, the
  ladder of sizes) behind ``sharpmeter study`` and ``recipes/``;
* :mod:`sharpmeter.paper`: the paper side, without torch: its simulator, the analyses, the
  comparison with its claims and the report.
"""

from sharpmeter.measure.context import ParametersWrittenError, measurement
from sharpmeter.measure.directions import adam_preconditioner, learning_rate, update_direction
from sharpmeter.measure.estimators import (
    DirectionalSharpnessResult,
    LanczosResult,
    PowerIterationResult,
    TraceResult,
    directional_sharpness,
    hutchinson,
    hutchpp,
    lanczos,
    power_iteration,
)
from sharpmeter.measure.linesearch import CriticalSharpnessResult, critical_sharpness
from sharpmeter.measure.meter import SharpnessMeter
from sharpmeter.measure.operators import (
    HessianOperator,
    NonFiniteLossError,
    PreconditionedOperator,
)
from sharpmeter.measure.options import MeterOptions
from sharpmeter.measure.params import ParameterVector
from sharpmeter.measure.schedule import Schedule
from sharpmeter.measure.sinks import JsonlSink, WandbSink

__version__ = "0.1.0"

__all__ = [
    "CriticalSharpnessResult",
    "DirectionalSharpnessResult",
    "HessianOperator",
    "JsonlSink",
    "LanczosResult",
    "MeterOptions",
    "NonFiniteLossError",
    "ParameterVector",
    "ParametersWrittenError",
    "PowerIterationResult",
    "PreconditionedOperator",
    "Schedule",
    "SharpnessMeter",
    "TraceResult",
    "WandbSink",
    "__version__",
    "adam_preconditioner",
    "critical_sharpness",
    "directional_sharpness",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "learning_rate",
    "measurement",
    "power_iteration",
    "update_direction",
]
