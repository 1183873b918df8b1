"""Turn logged rows into per-run curves, and summarise a curve by its head or tail.

Two row shapes are logged (see ``sharpmeter.records``):

* long (the simulator): ``{"n_params": N, "step": i, "fraction": t, "quantity": "sharpness",
  "value": v}``, one row per quantity and checkpoint;
* wide (the training callback): ``{"n_params": N, "step": 120, "run": "...",
  "critical_sharpness": 12.3, "loss": ..., ...}``, one row per measurement.

Both become ``{n_params: (t, values)}`` with ``t`` the fraction of training (the row's
``fraction`` when every row of the run has one, else ``step`` over the run's planned length or,
not knowing it, its last logged step), sorted by ``t``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from sharpmeter.analysis._checks import as_finite_1d, check_fraction

DEFAULT_LONG_QUANTITY = "sharpness"
DEFAULT_WIDE_QUANTITY = "critical_sharpness"

Curves = dict[float, tuple[np.ndarray, np.ndarray]]


def window_size(n_points: int, fraction: float) -> int:
    """Number of checkpoints in ``fraction`` of a curve of ``n_points``: ``max(1, ceil(f n))``.

    >>> window_size(200, 0.1)
    20
    """
    check_fraction("fraction", fraction)
    # the small slack keeps 0.1 * 200 = 20.000000000000004 from becoming 21
    return max(1, math.ceil(fraction * n_points - 1e-9))


def head_mean(values: ArrayLike, fraction: float = 0.1) -> float:
    """Mean of the first ``fraction`` of the checkpoints (uniformly spaced, in time order).

    >>> head_mean([1, 3, 5, 7], 0.5)
    2.0
    """
    arr = as_finite_1d("values", values, min_points=1)
    return float(arr[: window_size(arr.size, fraction)].mean())


def tail_mean(values: ArrayLike, fraction: float = 0.1) -> float:
    """Mean of the last ``fraction`` of the checkpoints: the "final" value of a run.

    The paper's final sharpness and loss are the mean of the last 20 of 200 checkpoints
    (``fraction=0.1``); averaging the tail, not taking the last point, damps the noise.

    >>> tail_mean([1, 3, 5, 7], 0.5)
    6.0
    """
    arr = as_finite_1d("values", values, min_points=1)
    return float(arr[-window_size(arr.size, fraction) :].mean())


def final_value(t: np.ndarray, s: np.ndarray, fraction: float = 0.2) -> float:
    """Mean of ``s`` over the last ``fraction`` of training time, ``t >= t_end - fraction``
    (the last point alone when no other falls in that span).

    >>> final_value(np.array([0.0, 0.5, 0.9, 1.0]), np.array([5.0, 3.0, 2.0, 1.0]))
    1.5
    """
    return float(np.mean(s[final_span(t, fraction)]))


def final_stderr(t: np.ndarray, s: np.ndarray, fraction: float = 0.2) -> float:
    """Standard error of :func:`final_value` as if the points were independent (NaN for one
    point); neighbouring measurements are correlated, so it understates the uncertainty."""
    tail = s[final_span(t, fraction)]
    return float(tail.std(ddof=1) / math.sqrt(tail.size)) if tail.size > 1 else math.nan


def final_span(t: np.ndarray, fraction: float) -> np.ndarray:
    """Which points of a sorted ``t`` lie in the last ``fraction`` of training time (the last
    point always does)."""
    span = t >= t[-1] - fraction - 1e-12
    span[-1] = True
    return span


def finite_number(value: Any) -> float | None:
    """A finite float, or None for a missing, empty, non-numeric or non-finite entry."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def is_long(row: Mapping[str, Any]) -> bool:
    """A long row (one quantity and its value, the simulator's shape) rather than a wide one."""
    return "quantity" in row and "value" in row


RunKey = tuple[float | None, Any]  # (n_params, run name): what tells one run from another


def run_key(row: Mapping[str, Any]) -> RunKey:
    """The run a row belongs to: its model size and its ``run`` name (None when not logged)."""
    return finite_number(row.get("n_params")), row.get("run")


def row_problem(row: Mapping[str, Any]) -> str | None:
    """Why a row cannot be placed on a curve (no size, no position in training), or None."""
    n_params = finite_number(row.get("n_params"))
    if n_params is None or n_params <= 0:
        return "has no positive n_params"
    if finite_number(row.get("step")) is None and finite_number(row.get("fraction")) is None:
        return "has neither step nor fraction"
    return None


def quantity_name(row: Mapping[str, Any], quantity: str | None) -> str:
    """``quantity``, or for ``None`` the default of the row's shape."""
    return quantity or (DEFAULT_LONG_QUANTITY if is_long(row) else DEFAULT_WIDE_QUANTITY)


def logs_quantity(row: Mapping[str, Any], quantity: str | None) -> bool:
    """Whether ``row`` carries a value of ``quantity``, finite or not."""
    name = quantity_name(row, quantity)
    return row["quantity"] == name if is_long(row) else name in row


def logged_value(row: Mapping[str, Any], quantity: str | None) -> float | None:
    """The finite value of ``quantity`` in a row that carries it, else None."""
    return finite_number(row["value"] if is_long(row) else row[quantity_name(row, quantity)])


def run_curve(
    rows: Sequence[Mapping[str, Any]], quantity: str | None = None, length: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The finite values of ``quantity`` in one run's rows, as ``(t, values)`` sorted by ``t``
    (both empty when there is none).

    ``t`` is the rows' ``fraction`` when every point has one, else ``step / length``, with
    ``length`` the planned number of steps (so a run stopped early ends before ``t = 1``
    instead of being stretched over the whole axis); without it, or when the run logged past
    it, the last step the run logged (any quantity, finite or not: a run whose last
    measurements failed still ended there).
    """
    points = [
        (finite_number(row.get("fraction")), finite_number(row.get("step")), value)
        for row in rows
        if logs_quantity(row, quantity) and (value := logged_value(row, quantity)) is not None
    ]
    if not points:
        return np.array([]), np.array([])
    if all(fraction is not None for fraction, _, _ in points):
        t = np.array([fraction for fraction, _, _ in points], dtype=float)
    else:
        if any(step is None for _, step, _ in points):
            raise ValueError("a run mixes rows with only a fraction and rows with only a step")
        steps = np.array([step for _, step, _ in points], dtype=float)
        top = max([length or 0.0] + [finite_number(row.get("step")) or 0.0 for row in rows])
        t = steps / top if top > 0 else steps
    values = np.array([value for _, _, value in points], dtype=float)
    order = np.argsort(t, kind="stable")
    return t[order], values[order]


def one_curve_per_size(
    curves: Mapping[RunKey, tuple[np.ndarray, np.ndarray]], quantity: str | None
) -> Curves:
    """``{n_params: (t, values)}`` from per-run curves, smallest size first; runs with no point
    are left out. Several runs at one size are refused rather than silently merged."""
    kept = {key: curve for key, curve in curves.items() if curve[0].size}
    if not kept:
        raise ValueError(f"no finite values of quantity {quantity or '(default)'} in the records")
    runs_per_size: dict[float, list[Any]] = defaultdict(list)
    for n_params, run in kept:
        runs_per_size[n_params].append(run)
    shared = {n: runs for n, runs in runs_per_size.items() if len(runs) > 1}
    if shared:
        raise ValueError(f"several runs share a model size; pass one run per size: {shared}")
    return {key[0]: curve for key, curve in sorted(kept.items(), key=lambda kv: kv[0][0])}


def curves_from_records(rows: Iterable[Mapping[str, Any]], quantity: str | None = None) -> Curves:
    """Group logged rows into one curve per model size for one quantity (see :func:`run_curve`).

    ``quantity=None`` means ``"sharpness"`` for long rows and ``"critical_sharpness"`` for wide
    rows. Rows whose value is missing or not finite (a failed measurement, logged with its status)
    are skipped. The rows are taken as given: reading files through
    :func:`sharpmeter.analysis.runs.load_runs` resolves steps logged twice and knows each run's
    planned length.

    >>> rows = [{"n_params": 1e7, "step": s, "critical_sharpness": v}
    ...         for s, v in [(0, 1.0), (10, 2.0)]]
    >>> t, v = curves_from_records(rows)[1e7]
    >>> t.tolist(), v.tolist()
    ([0.0, 1.0], [1.0, 2.0])
    """
    runs: dict[RunKey, list[Mapping[str, Any]]] = defaultdict(list)
    for index, row in enumerate(rows):
        problem = row_problem(row)
        if problem is not None:
            raise ValueError(f"row {index} {problem}: {dict(row)}")
        runs[run_key(row)].append(row)
    curves = {key: run_curve(rows_of_run, quantity) for key, rows_of_run in runs.items()}
    return one_curve_per_size(curves, quantity)
