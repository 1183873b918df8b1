"""Turn logged rows into per-run curves, and summarise a curve by its head or tail.

Two row shapes are logged (see ``sharpmeter.paper.records``):

* long (the simulator): ``{"n_params": N, "step": i, "fraction": t, "quantity": "sharpness",
  "value": v}``, one row per quantity and checkpoint;
* wide (the training callback): ``{"n_params": N, "step": 120, "run": "...",
  "critical_sharpness": 12.3, "loss": ..., ...}``, one row per measurement.

Both become ``{n_params: (t, values)}`` with ``t`` the fraction of training (the row's
``fraction`` when every row of the run has one, else ``step`` over the run's planned length or,
not knowing it, its last logged step), sorted by ``t``. A run is told from another by its size,
its ``run`` name and its ``seed`` (when the rows carry one); several seeds at one size are
replicates (:mod:`sharpmeter.paper.analysis.replicates`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from sharpmeter.measure.schema import MEASURE_OF_COLUMN, NOT_DUE, OK, VALUE_COLUMNS
from sharpmeter.paper.analysis._checks import as_finite_1d, check_fraction
from sharpmeter.paper.analysis.replicates import Curve, Curves, Replicates, group_replicates
from sharpmeter.paper.sizes import format_size, parse_size

DEFAULT_LONG_QUANTITY = "sharpness"
DEFAULT_WIDE_QUANTITY = "critical_sharpness"
# What the analysis may take as sharpness: the simulator's curve and each measure's value.
SHARPNESS_QUANTITIES = (DEFAULT_LONG_QUANTITY, *VALUE_COLUMNS)


def check_sharpness_quantity(quantity: str | None) -> str | None:
    """``quantity`` when it is a measure of sharpness (None: the rows' default), else raise
    ``ValueError`` listing those: the fits (eq. (1), the scaling laws) and the verdicts are
    about sharpness, and a loss or learning-rate column read as one would answer the paper's
    claims about something else (the loss "settles at the edge of stability", it "correlates
    with the loss").

    A W&B export names a column by its logged key, prefixes included: its last ``/`` part is
    what counts.

    >>> check_sharpness_quantity("lambda_max")
    'lambda_max'
    >>> check_sharpness_quantity("train/sharpness/critical_sharpness")
    'train/sharpness/critical_sharpness'
    """
    if quantity is not None and quantity.rsplit("/", 1)[-1] not in SHARPNESS_QUANTITIES:
        raise ValueError(
            f"{quantity!r} is not a measure of sharpness; use one of "
            + ", ".join(SHARPNESS_QUANTITIES)
        )
    return quantity


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
    """Mean of ``s`` over the last ``fraction`` of training, ``t >= 1 - fraction`` (``t`` the
    fraction of training, 1 its end). Raises ``ValueError`` when no point lies there: a run
    whose last values failed, or that stopped early, has no value at the end of training, and
    its last finite point describes another time.

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
    """Which points of ``t`` lie in the last ``fraction`` of training, ``t >= 1 - fraction``;
    raises ``ValueError`` (:func:`no_final_reason`) when none does."""
    reason = no_final_reason(t, fraction)
    if reason is not None:
        raise ValueError(reason)
    return np.asarray(t) >= 1.0 - fraction - 1e-12


def no_final_reason(t: np.ndarray, fraction: float) -> str | None:
    """Why a curve on ``t`` has no final value (no point in the last ``fraction`` of
    training), else None.

    >>> no_final_reason(np.array([0.1, 0.3]), 0.2)
    'no point in the last 20% of training (the last at t = 0.3)'
    """
    t = np.asarray(t, dtype=float)
    if t.size and t.max() >= 1.0 - fraction - 1e-12:
        return None
    last = f" (the last at t = {t.max():.3g})" if t.size else ""
    return f"no point in the last {fraction:.0%} of training{last}"


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


# (n_params, run name, seed): what tells one run from another
RunKey = tuple[float | None, Any, int | None]


def run_key(row: Mapping[str, Any]) -> RunKey:
    """The run a row belongs to: its model size, its ``run`` name and its ``seed`` (None when
    not logged)."""
    return size_of(row.get("n_params")), row.get("run"), seed_of(row.get("seed"))


def size_of(value: Any) -> float | None:
    """A model size as a number: a number, or text as users and the paper write sizes
    (``"10K"``, ``"1.2M"``, ``"3B"``, any case), which a CSV cell keeps as text. None when not
    recorded or not finite; raises ``ValueError`` naming text that is no size
    (:func:`~sharpmeter.paper.sizes.parse_size`).

    >>> size_of("1.5m"), size_of(3e9), size_of(None)
    (1500000.0, 3000000000.0, None)
    """
    return parse_size(value) if isinstance(value, str) else finite_number(value)


def run_name(n_params: float | None, run: Any) -> str:
    """A run's ``run`` name, or its readable size when it logged none."""
    return str(run) if run is not None else format_size(n_params)


def seed_of(value: Any) -> int | None:
    """A seed as an int (``3.0`` reads as 3), None when not recorded; raises ``ValueError``
    for anything that is not an integer.

    >>> seed_of(3.0), seed_of(None)
    (3, None)
    """
    if value is None:
        return None
    number = finite_number(value)
    if number is None or not number.is_integer():
        raise ValueError(f"a seed that is not an integer: {value!r}")
    return int(number)


def row_problem(row: Mapping[str, Any]) -> str | None:
    """Why a row cannot be placed on a curve (no size, no position in training, a seed that is
    no integer), or None."""
    try:
        n_params = size_of(row.get("n_params"))
    except ValueError as error:
        return f"has an n_params that is no model size: {error}"
    if n_params is None or n_params <= 0:
        return "has no positive n_params"
    if finite_number(row.get("step")) is None and finite_number(row.get("fraction")) is None:
        return "has neither step nor fraction"
    try:
        seed_of(row.get("seed"))
    except ValueError as error:
        return f"has {error}"
    return None


def quantity_name(row: Mapping[str, Any], quantity: str | None) -> str:
    """``quantity``, or for ``None`` the default of the row's shape."""
    return quantity or (DEFAULT_LONG_QUANTITY if is_long(row) else DEFAULT_WIDE_QUANTITY)


def logs_quantity(row: Mapping[str, Any], quantity: str | None) -> bool:
    """Whether ``row`` carries a value of ``quantity``, finite or not, that was measured: a
    measure its schedule did not call for at the row's step (``not_due``) logs nothing."""
    name = quantity_name(row, quantity)
    if is_long(row):
        return row["quantity"] == name
    return name in row and measure_status(row, name) != NOT_DUE


def logged_value(row: Mapping[str, Any], quantity: str | None) -> float | None:
    """The finite value of ``quantity`` in a row that carries it, else None; None too when
    its measure's status is not ``ok`` (an unconverged eigenvalue keeps its last Ritz value
    in the row, as evidence, not as a result).

    >>> row = {"n_params": 10, "step": 5, "lambda_max": 2.5, "spectral_status": "not_converged"}
    >>> ok = {**row, "spectral_status": "ok"}
    >>> logged_value(row, "lambda_max"), logged_value(ok, "lambda_max")
    (None, 2.5)
    """
    if is_long(row):
        return finite_number(row["value"])
    name = quantity_name(row, quantity)
    status = measure_status(row, name)
    return finite_number(row[name]) if status in (None, OK) else None


def measure_status(row: Mapping[str, Any], column: str) -> Any:
    """The status of the measure a wide row's ``column`` belongs to (None for a column of no
    measure, such as ``loss``, or a row written before statuses were logged)."""
    measure = MEASURE_OF_COLUMN.get(column)
    return None if measure is None else row.get(f"{measure}_status")


def run_curve(
    rows: Sequence[Mapping[str, Any]], quantity: str | None = None, length: float | None = None
) -> Curve:
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


def curves_from_records(rows: Iterable[Mapping[str, Any]], quantity: str | None = None) -> Curves:
    """Group logged rows into one curve per model size for one quantity (see :func:`run_curve`).

    ``quantity=None`` means ``"sharpness"`` for long rows and ``"critical_sharpness"`` for wide
    rows. Rows whose value is missing or not finite (a failed measurement, logged with its status)
    are skipped. Several runs at one size are refused, replicates too: read those from files with
    :meth:`~sharpmeter.paper.analysis.runs.RunSelection.replicates`. The rows are taken as given:
    reading files through :func:`sharpmeter.paper.analysis.runs.load_runs` resolves steps logged
    twice and knows each run's planned length.

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
    curves = [
        (n_params, seed, run_name(n_params, run), run_curve(rows_of_run, quantity))
        for (n_params, run, seed), rows_of_run in runs.items()
    ]
    return _one_curve_per_size(group_replicates(curves, quantity))


def _one_curve_per_size(replicates: Replicates) -> Curves:
    seeded = {
        format_size(n): list(by_seed) for n, by_seed in replicates.items() if len(by_seed) > 1
    }
    if seeded:
        raise ValueError(
            f"several runs share a model size, replicates of seeds {seeded}; this takes one run "
            "per size: read replicates with select_runs(load_runs(files)).replicates(quantity)"
        )
    return {n: curve for n, by_seed in replicates.items() for curve in by_seed.values()}
