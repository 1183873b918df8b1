"""The paper's simulator: synthetic sharpness, loss and gradient-norm curves and Tables 1-3.

Pure numpy; independent of the curvature engine. :mod:`.model` holds the paper's stated eqs.
(1)-(6); :mod:`.presets` the constants it leaves open (the ``paper`` preset, each marked stated,
recovered or calibrated); :func:`simulate_run` makes one run, :func:`simulate_study` the
multi-scale study.

Example:
    >>> from sharpmeter.paper.simulator import simulate_study, PAPER_SCALES
    >>> PAPER_SCALES["1.3B"]
    1300000000.0
    >>> print(simulate_study().table3().splitlines()[-1])
    | 7B | 2.1803 | 1.7718 | 1.0745 |
"""

from sharpmeter.paper.sizes import format_size, parse_size

from .presets import PAPER, PAPER_SCALES, PRESETS, Linear, SimulatorPreset, get_preset
from .run import QUANTITIES, SimulatedRun, simulate_run
from .study import ScaleSummary, Study, simulate_study

__all__ = [
    "PAPER",
    "PAPER_SCALES",
    "PRESETS",
    "QUANTITIES",
    "Linear",
    "ScaleSummary",
    "SimulatedRun",
    "SimulatorPreset",
    "Study",
    "format_size",
    "get_preset",
    "parse_size",
    "simulate_run",
    "simulate_study",
]
