"""When to measure: every n steps, log-spaced steps, and a wall-time budget.

Sharpness moves fastest early in training, so a log-spaced schedule spends its measurements where
the curve bends; ``every`` gives an even grid; ``max_fraction`` caps the share of wall time that
measuring may take (a step that is due is skipped while the meter is over budget).

A meter gives each measure a schedule (``MeterOptions.schedules``): the measures that share one
keep one :class:`Ledger`, the account of their grid position and of the time they took, so a
cheap measure on a dense grid and an expensive one on a sparse grid each spend their own share.

Example::

    Schedule(every=50)                       # steps 0, 50, 100, ...
    Schedule(per_decade=8)                   # 0, 1, 2, 3, 4, 6, 7, 10, 13, 18, 24, 32, ...
    Schedule(every=10, max_fraction=0.05)    # at most 5% of the training wall time
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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


@dataclass
class Ledger:
    """One schedule's account in a meter: the measures that follow it, the last step it
    measured, and the wall time its measurements took (in total, and the last one), which its
    budget is checked against."""

    schedule: Schedule
    measures: tuple[str, ...]
    last_step: int | None = None
    measuring_seconds: float = 0.0
    last_cost: float = 0.0

    def on_grid(self, step: int) -> bool:
        """Whether ``step`` is on this schedule's grid and later than its last measurement."""
        later = self.last_step is None or step > self.last_step
        return later and self.schedule.is_due(step)

    def affordable(self, training_seconds: float) -> bool:
        """Whether one more measurement, costing what the last one did, keeps this schedule
        within its share of ``training_seconds``."""
        return self.schedule.within_budget(
            self.measuring_seconds, training_seconds, next_cost=self.last_cost
        )

    def charge(self, step: int, seconds: float) -> None:
        """Book a measurement at ``step`` that took ``seconds`` of this schedule's measures."""
        self.last_step = int(step)
        self.measuring_seconds += seconds
        self.last_cost = seconds

    def state_dict(self) -> dict[str, Any]:
        return {
            "measures": list(self.measures),
            "last_step": self.last_step,
            "measuring_seconds": self.measuring_seconds,
            "last_cost": self.last_cost,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = state.get("last_step")
        self.measuring_seconds = float(state.get("measuring_seconds", 0.0))
        self.last_cost = float(state.get("last_cost", 0.0))


def ledgers(schedule_of: dict[str, Schedule]) -> tuple[Ledger, ...]:
    """One ledger per distinct schedule of ``{measure: schedule}``, in the measures' order: the
    measures sharing a schedule share its grid and its budget.

    >>> dense, sparse = Schedule(every=10), Schedule(every=50)
    >>> books = ledgers({"critical": dense, "trace": sparse, "spectral": sparse})
    >>> [book.measures for book in books]
    [('critical',), ('trace', 'spectral')]
    """
    grouped: dict[Schedule, list[str]] = {}
    for measure, schedule in schedule_of.items():
        grouped.setdefault(schedule, []).append(measure)
    return tuple(Ledger(schedule, tuple(names)) for schedule, names in grouped.items())
