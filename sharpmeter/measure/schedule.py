"""When to measure: every n steps, log-spaced steps, and a wall-time budget.

Sharpness moves fastest early in training, so a log-spaced schedule spends its measurements where
the curve bends; ``every`` gives an even grid; ``max_fraction`` caps the share of wall time that
measuring may take (a step that is due is skipped while the meter is over budget).

Example::

    Schedule(every=50)                       # steps 0, 50, 100, ...
    Schedule(per_decade=8)                   # 0, 1, 2, 3, 4, 6, 7, 10, 13, 18, 24, 32, ...
    Schedule(every=10, max_fraction=0.05)    # at most 5% of the training wall time
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sharpmeter.measure.checks import check_positive_int, is_finite_number


@dataclass(frozen=True)
class Schedule:
    """Which steps are due for a measurement.

    Args:
        every: measure at multiples of ``every`` (ignored when ``per_decade`` is set).
        per_decade: log-spaced steps, ``round(10**(i / per_decade))`` for i = 0, 1, ..., and 0.
        max_fraction: most wall time measuring may take, as a fraction of the time spent
            training (``None``: no budget).
    """

    every: int = 10
    per_decade: int | None = None
    max_fraction: float | None = None

    def __post_init__(self) -> None:
        check_positive_int("every", self.every)
        if self.per_decade is not None:
            check_positive_int("per_decade", self.per_decade)
        fraction = self.max_fraction
        if fraction is not None and not (is_finite_number(fraction) and 0 < fraction <= 1):
            raise ValueError(f"max_fraction must be in (0, 1], got {self.max_fraction!r}")

    def is_due(self, step: int) -> bool:
        """Whether ``step`` is on the grid (the time budget is the meter's to check)."""
        if step < 0:
            return False
        if self.per_decade is None:
            return step % self.every == 0
        if step == 0:
            return True
        index = math.floor(self.per_decade * math.log10(step))
        return any(
            round(10 ** (i / self.per_decade)) == step for i in range(max(index - 1, 0), index + 2)
        )

    def within_budget(
        self, measuring_seconds: float, training_seconds: float, next_cost: float = 0.0
    ) -> bool:
        """Whether one more measurement, expected to take ``next_cost`` seconds, keeps the
        time spent measuring within ``max_fraction`` of the time spent training.

        With ``next_cost`` the last measurement's duration, a measurement overshoots only by
        what it costs beyond the one before it (the first: all of it), so while costs do not
        grow, measuring over a run of training time ``T`` takes at most
        ``max_fraction * T + (first measurement)``."""
        if self.max_fraction is None:
            return True
        return measuring_seconds + next_cost <= self.max_fraction * training_seconds
