r"""Several runs per model size that differ only in their seed: replicates, and what a size's
value and a scaling fit are made of when a study has them.

Curves come per size and seed, ``{n_params: {seed: (t, values)}}`` (:data:`Replicates`; a
study with one run per size has one curve per size, under its seed or ``None``). Runs at one
size are replicates only when each has a seed of its own: two with the same seed, or without
one, are a mix-up (a run copied, a size mislabelled) that no average may hide.

**A size's value.** Each seed's value (its final value, its peak over its final) is computed on
its own curve, then averaged over the size's k seeds, with the standard error over seeds and a
t-interval::

    mean = (1/k) sum_i v_i,   se = s / sqrt(k),   s^2 = sum_i (v_i - mean)^2 / (k - 1),
    interval: mean +- t_{k-1} se

(NaN for one seed, which says nothing of the spread). The seeds are the independent units: the
points of one curve are not (neighbours are correlated), and pooling the curves first would,
say, take the maximum over more noisy points and bias a peak upwards.

**Scaling fits** (:func:`scaling_fits`) take every run's value as a point, ``n = sum k`` points
with ``n - 2`` degrees of freedom, so their residual variance carries the seed-to-seed spread
besides the sizes' scatter about the law. The same fits on the sizes' means (``K - 2`` degrees
of freedom for K sizes) stand beside them: with as many seeds at every size the two lines
coincide (least squares on replicated sizes is least squares on the means), only the intervals
differ. The one on every run is the wider when the seeds disagree more than the means stray
from the law; it is the narrower (more degrees of freedom) when the means' scatter is what the
seed noise explains; and when the means stray more than their seeds explain (an effect of the
size that no seed averages away), its interval is too narrow: a size's seeds share that effect,
so they are not independent points about the line. With no trend, per-size offsets of sd 0.05
and seed noise of sd 0.01, its 95% interval excludes 0 in 33-63% of studies of 3-6 sizes; the
one on the means in 5-6%. The verdicts (:mod:`sharpmeter.paper.compare`) therefore decide on
the means, which keep their level whatever the two sources of scatter.

Seeds 0.1 apart around means on a line: the fit on the means sees no spread, the one on every
run does.

>>> finals = {1e7: {0: 1.35, 1: 1.25}, 1e8: {0: 1.25, 1: 1.15}, 1e9: {0: 1.15, 1: 1.05}}
>>> every_run, on_means = scaling_fits(finals)
>>> every_run.log_linear.n, on_means.log_linear.n, round(every_run.log_linear.slope, 6)
(6, 3, -0.1)
>>> [[round(bound, 3) for bound in fits.log_linear.slope_ci] for fits in (every_run, on_means)]
[[-0.185, -0.015], [-0.1, -0.1]]
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from scipy import stats

from sharpmeter.paper.analysis.scaling import FitComparison, compare_fits
from sharpmeter.paper.sizes import format_size

T = TypeVar("T")
Seed = int | None
Curve = tuple[np.ndarray, np.ndarray]
Curves = dict[float, Curve]  # one curve per size
Replicates = dict[float, dict[Seed, Curve]]  # per size, smallest first, its curves by seed
ScalingFits = tuple[FitComparison, FitComparison | None]  # on every run, on the size means
MIN_SIZES_FOR_SCALING = 3


@dataclass(frozen=True)
class SeedMean:
    """One value per seed of a size: their mean, the standard error over seeds and its
    t-interval at ``level`` (module docstring; NaN for one seed).

    >>> m = SeedMean((1.0, 2.0, 3.0))
    >>> m.mean, m.n_seeds, round(m.stderr, 4), [round(bound, 3) for bound in m.ci]
    (2.0, 3, 0.5774, [-0.484, 4.484])
    >>> SeedMean((1.5,)).mean, SeedMean((1.5,)).stderr
    (1.5, nan)
    """

    values: tuple[float, ...]
    level: float = 0.95

    @property
    def n_seeds(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def stderr(self) -> float:
        if self.n_seeds < 2:
            return math.nan
        return float(np.std(self.values, ddof=1) / math.sqrt(self.n_seeds))

    @property
    def ci(self) -> tuple[float, float]:
        if self.n_seeds < 2:
            return math.nan, math.nan
        half = float(stats.t.ppf(0.5 + self.level / 2, self.n_seeds - 1)) * self.stderr
        return self.mean - half, self.mean + half


def as_replicates(curves: Mapping[float, Curve | Mapping[Seed, Curve]]) -> Replicates:
    """Per size, smallest first, its curves by seed; a size given one curve ``(t, values)``
    has it under the seed ``None``.

    >>> t = np.array([0.0, 1.0])
    >>> {n: list(by_seed) for n, by_seed in as_replicates({1e8: (t, t), 1e7: {3: (t, t)}}).items()}
    {10000000.0: [3], 100000000.0: [None]}
    """
    return {n: dict(c) if isinstance(c, Mapping) else {None: c} for n, c in sorted(curves.items())}


def group_replicates(
    runs: Iterable[tuple[float, Seed, str, Curve]], quantity: str | None
) -> Replicates:
    """Every run's ``(n_params, seed, label, curve)`` as :data:`Replicates`, seeds in order;
    runs with no point are left out.

    Raises ``ValueError`` when no run has a point, and naming the runs (by ``label``) of every
    size where two runs share a seed or one has none: replicates need a seed each.
    """
    by_size: dict[float, list[tuple[Seed, str, Curve]]] = defaultdict(list)
    for n_params, seed, label, curve in runs:
        if curve[0].size:
            by_size[n_params].append((seed, label, curve))
    if not by_size:
        raise ValueError(f"no finite values of quantity {quantity or '(default)'} in the records")
    mixed = [_mix_up(n, found) for n, found in sorted(by_size.items()) if not _replicates(found)]
    if mixed:
        raise ValueError(
            "several runs share a model size with no seed of their own to tell them apart "
            "(runs at one size are replicates when each has its own seed, from its metadata "
            "or its rows): " + "; ".join(mixed)
        )
    return {
        n: {seed: curve for seed, _, curve in sorted(found, key=lambda run: run[0])}
        for n, found in sorted(by_size.items())
    }


def _replicates(runs: list[tuple[Seed, str, Curve]]) -> bool:
    seeds = [seed for seed, _, _ in runs]
    return len(runs) == 1 or (None not in seeds and len(set(seeds)) == len(seeds))


def _mix_up(n_params: float, runs: list[tuple[Seed, str, Curve]]) -> str:
    """``10M: a (runs/a/sharpness.jsonl) seed 3, b (runs/b/sharpness.jsonl) seed 3``."""
    listed = ", ".join(f"{label} {seed_text(seed)}" for seed, label, _ in runs)
    return f"{format_size(n_params)}: {listed}"


def seed_text(seed: Seed) -> str:
    return "no seed" if seed is None else f"seed {seed}"


def has_replicates(by_size: Mapping[float, Mapping[Seed, object]]) -> bool:
    """Whether a size has more than one seed."""
    return any(len(by_seed) > 1 for by_seed in by_size.values())


def per_run(
    replicates: Replicates, summary: Callable[[np.ndarray, np.ndarray], T]
) -> dict[float, dict[Seed, T]]:
    """``summary(t, values)`` of every run, by size and seed."""
    return {
        n: {seed: summary(*curve) for seed, curve in by_seed.items()}
        for n, by_seed in replicates.items()
    }


def seed_means(
    values: Mapping[float, Mapping[Seed, float]], level: float = 0.95
) -> dict[float, SeedMean]:
    """Each size's values over its seeds."""
    return {n: SeedMean(tuple(by_seed.values()), level) for n, by_seed in values.items()}


def every_point(values: Mapping[float, Mapping[Seed, float]]) -> tuple[np.ndarray, np.ndarray]:
    """``(sizes, values)`` of every run: a size repeated once per seed."""
    points = [(n, value) for n, by_seed in values.items() for value in by_seed.values()]
    return np.array([n for n, _ in points]), np.array([value for _, value in points])


def scaling_fits(values: Mapping[float, Mapping[Seed, float]], level: float = 0.95) -> ScalingFits:
    """Both scaling forms on every run's value, and on the sizes' means when a size has several
    seeds (None otherwise: it would be the same fit). Raises ``ValueError`` as
    :func:`~sharpmeter.paper.analysis.scaling.compare_fits` does."""
    every_run = compare_fits(*every_point(values), level)
    if not has_replicates(values):
        return every_run, None
    means = seed_means(values)
    return every_run, compare_fits(list(means), [m.mean for m in means.values()], level)


def scaling_fits_or_reason(
    values: Mapping[float, Mapping[Seed, float]], level: float = 0.95
) -> ScalingFits | str:
    """:func:`scaling_fits`, or why there are none: fewer than 3 sizes, or values no fit can
    take (not finite, not positive for the power law, too large or small to square), so that
    whatever else is reported about the runs still is.

    >>> scaling_fits_or_reason({1e7: {None: 1.0}, 1e8: {None: 0.9}})
    'no scaling fit: needs at least 3 model sizes, got 2'
    """
    if len(values) < MIN_SIZES_FOR_SCALING:
        return (
            f"no scaling fit: needs at least {MIN_SIZES_FOR_SCALING} model sizes, got {len(values)}"
        )
    try:
        return scaling_fits(values, level)
    except ValueError as error:
        return f"no scaling fit: {error}"
