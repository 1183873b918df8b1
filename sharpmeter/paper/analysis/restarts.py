r"""How sharpness answers a learning-rate restart, against the same curve's noise.

A restart is read from the learning rate the rows log: a rise by at least ``jump`` times its
peak between two consecutive measurements (:func:`restart_times`; a warmup rises by far less
per measurement). At each restart, with :math:`i` the first measurement after it and :math:`w`
measurements on each side, the curve's **rise** and **fall** are

.. math::

    r_i = \max_{0 \le k < w} \ln S_{i+k} - m_i, \qquad
    f_i = m_i - \min_{0 \le k < w} \ln S_{i+k}, \qquad
    m_i = \operatorname{median}_{1 \le k \le w} \ln S_{i-k},

the largest step up or down from the level just before; a spike that lasts one measurement
counts, one noisy point before the restart does not set the level.

Noise makes rises and falls too, so each restart is compared with two references:

* the **null**: the same statistics at every position of every curve past ``start`` (the rise
  of training left out) whose windows stay clear of the restarts' windows. A restart's rank
  p-value is :math:`(1 + \#\{\text{null} \ge r\}) / (1 + n)`, and the restarts' p-values are
  combined by Fisher's method (a restart whose windows overlap an earlier one's is left out;
  ranked against one null, the p-values still depend on each other a little, so the combined
  one is slightly optimistic);
* the **controls**: the same statistics of the other schedules at the restart's time (one data
  order for all schedules: a hard batch there lifts every curve, not only the restarted one).

The **excess** of a restart is its rise less the larger of the null's median rise and the
controls' median rise; its exponential is how many times sharpness rose beyond what noise and
the other schedules give.

>>> import numpy as np
>>> t = np.arange(100) / 100
>>> lr = 1e-3 * (1 - (4 * t) % 1.0)  # restarts at t = 1/4, 1/2, 3/4
>>> [round(float(x), 2) for x in restart_times(t, lr)]
[0.25, 0.5, 0.75]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from sharpmeter.paper.analysis.replicates import Curve

RESTART_JUMP = 0.5  # a restart: lr rises by half its peak or more between two measurements
RESTART_WINDOW = 3  # measurements on each side of a restart
MIN_NULL = 20  # positions away from the restarts that make the noise's distribution
START = 0.2  # past the rise of training: the paper's decay and plateau phases


@dataclass(frozen=True)
class Shift:
    """One restart: its time, the restarted curve's rise and fall (natural log) and the other
    schedules' median rise and fall at the same time (NaN without another schedule), and the
    rank p-values of the rise and of the fall among the null's."""

    t: float
    rise: float
    fall: float
    control_rise: float
    control_fall: float
    p_rise: float
    p_fall: float


@dataclass(frozen=True)
class RestartResponse:
    """Every restart's :class:`Shift`, the null's median rise and fall and its size, and the
    combined (Fisher) p-values of the restarts' rises and falls."""

    shifts: tuple[Shift, ...]
    null_rise: float
    null_fall: float
    null_size: int
    p_rise: float
    p_fall: float

    @property
    def spike_factor(self) -> float:
        """``exp`` of the restarts' median excess rise: how many times sharpness rose at a
        restart beyond what noise and the other schedules give (1: not at all)."""
        excess = [_excess(s.rise, s.control_rise, self.null_rise) for s in self.shifts]
        return math.exp(np.median(excess))

    @property
    def collapse_factor(self) -> float:
        """The same for falls: sharpness fell to this fraction of its level beyond noise."""
        excess = [_excess(s.fall, s.control_fall, self.null_fall) for s in self.shifts]
        return math.exp(-np.median(excess))


def _excess(shift: float, control: float, null: float) -> float:
    return shift - (null if math.isnan(control) else max(control, null))


def restart_times(t: ArrayLike, lr: ArrayLike, jump: float = RESTART_JUMP) -> np.ndarray:
    """The times of the first measurement after each restart: where the learning rate rose by
    at least ``jump`` times its peak (over the whole run: restarts to a decaying peak are
    missed) since the measurement before; a rise over consecutive measurements counts once.

    Raises ``ValueError`` for arrays of different lengths or a ``jump`` outside (0, 1]."""
    t, lr = np.asarray(t, dtype=float), np.asarray(lr, dtype=float)
    if t.shape != lr.shape or t.ndim != 1:
        raise ValueError(f"t and lr must be 1-d of one length, got {t.shape} and {lr.shape}")
    if not 0 < jump <= 1:
        raise ValueError(f"jump must be in (0, 1], got {jump}")
    t, lr = _time_ordered(t, lr)
    if lr.size < 2 or np.max(lr) <= 0:
        return np.empty(0)
    rises = np.flatnonzero(np.diff(lr) >= jump * np.max(lr)) + 1
    # a rise logged over two measurements is one restart, at its first
    firsts = rises[np.diff(rises, prepend=-1) > 1]
    return t[firsts]


def restart_response(
    curves: Mapping[str, Curve],
    restarted: str,
    restarts: ArrayLike,
    window: int = RESTART_WINDOW,
    start: float = START,
) -> RestartResponse:
    """The response of ``curves[restarted]`` at the ``restarts`` (times, see
    :func:`restart_times`), against the null of every curve in ``curves`` away from them and
    against the other curves at the same times (the module's docstring has the statistics).

    Raises ``ValueError`` when no restart has ``window`` measurements on each side past
    ``start``, or fewer than :data:`MIN_NULL` positions are left for the null."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    logs = {name: _log_curve(*curve) for name, curve in curves.items()}
    times = np.asarray(restarts, dtype=float)
    t, log_s = logs[restarted]
    usable = _apart(
        [r for r in times if _window_fits(t, _first_after(t, r), window, start)], t, window
    )
    if not usable:
        raise ValueError(
            f"no restart with {window} measurements on each side past t = {start:g} in {restarted}"
        )
    null = np.array(
        [
            _shifts(log_s_, i, window)
            for t_, log_s_ in logs.values()
            for i in range(window, t_.size - window + 1)
            if t_[i - window] >= start and _clear_of(t_, i, times, window)
        ]
    ).reshape(-1, 2)
    if len(null) < MIN_NULL:
        raise ValueError(
            f"{len(null)} positions past t = {start:g} clear of the restarts, fewer than {MIN_NULL}"
        )
    shifts = tuple(_shift(logs, restarted, r, window, start, null) for r in usable)
    return RestartResponse(
        shifts,
        null_rise=float(np.median(null[:, 0])),
        null_fall=float(np.median(null[:, 1])),
        null_size=len(null),
        p_rise=_fisher([s.p_rise for s in shifts]),
        p_fall=_fisher([s.p_fall for s in shifts]),
    )


def _apart(times: list[float], t: np.ndarray, window: int) -> list[float]:
    """The restarts whose windows share no measurement with an earlier kept one's (Fisher's
    method combines independent p-values)."""
    kept: list[float] = []
    for time in sorted(times):
        if not kept or _first_after(t, time) - _first_after(t, kept[-1]) >= 2 * window:
            kept.append(time)
    return kept


def _log_curve(t: ArrayLike, s: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(t, ln S)`` at the positive finite values, in time order."""
    s = np.asarray(s, dtype=float)
    t, s = _time_ordered(t, s, kept=s > 0)
    return t, np.log(s)


def _time_ordered(
    t: ArrayLike, values: ArrayLike, kept: np.ndarray | bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(t, values)`` where ``kept`` holds and both are finite, sorted by ``t``."""
    t, values = np.asarray(t, dtype=float), np.asarray(values, dtype=float)
    kept = kept & np.isfinite(t) & np.isfinite(values)
    order = np.argsort(t[kept], kind="stable")
    return t[kept][order], values[kept][order]


def _first_after(t: np.ndarray, time: float) -> int:
    return int(np.searchsorted(t, time, side="left"))


def _window_fits(t: np.ndarray, i: int, window: int, start: float) -> bool:
    return window <= i <= t.size - window and t[i - window] >= start


def _clear_of(t: np.ndarray, i: int, restarts: np.ndarray, window: int) -> bool:
    """Whether position ``i``'s windows share no measurement with a restart's."""
    return all(abs(i - _first_after(t, r)) >= 2 * window for r in restarts)


def _shifts(log_s: np.ndarray, i: int, window: int) -> tuple[float, float]:
    """``(rise, fall)`` at position ``i``."""
    level = float(np.median(log_s[i - window : i]))
    after = log_s[i : i + window]
    return float(np.max(after)) - level, level - float(np.min(after))


def _shifts_at(
    t: np.ndarray, log_s: np.ndarray, time: float, window: int, start: float
) -> tuple[float, float] | None:
    """``(rise, fall)`` at the first measurement at or after ``time``, None where its windows
    do not fit past ``start``."""
    i = _first_after(t, time)
    return _shifts(log_s, i, window) if _window_fits(t, i, window, start) else None


def _shift(
    logs: Mapping[str, tuple[np.ndarray, np.ndarray]],
    restarted: str,
    time: float,
    window: int,
    start: float,
    null: np.ndarray,
) -> Shift:
    rise, fall = _shifts_at(*logs[restarted], time, window, start)
    controls = [
        shifts
        for name, (t, log_s) in logs.items()
        if name != restarted and (shifts := _shifts_at(t, log_s, time, window, start))
    ]
    control_rise, control_fall = np.median(controls, axis=0) if controls else (math.nan, math.nan)
    return Shift(
        t=float(time),
        rise=rise,
        fall=fall,
        control_rise=float(control_rise),
        control_fall=float(control_fall),
        p_rise=_rank_p(rise, null[:, 0]),
        p_fall=_rank_p(fall, null[:, 1]),
    )


def _rank_p(value: float, null: np.ndarray) -> float:
    return (1 + int(np.sum(null >= value))) / (1 + null.size)


def _fisher(p_values: list[float]) -> float:
    return float(stats.combine_pvalues(p_values, method="fisher").pvalue)
