"""A multi-scale study: one run per scale on one generator, summarised as the paper's tables.

Example:
    >>> study = simulate_study()  # the paper's study: six scales, seed 42
    >>> [row.name for row in study.rows]
    ['10M', '125M', '350M', '1.3B', '3B', '7B']
    >>> round(study.rows[-1].final_loss, 3)
    3.077
    >>> print(study.table1().splitlines()[2])
    | Model | Peak S | Final S | Loss | Acc. |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from sharpmeter.paper.sizes import format_size, parse_size

from .presets import SimulatorPreset, get_preset
from .run import SimulatedRun, simulate_run

TASK_HEADERS = {
    "HellaSwag": "Hella.",
    "ARC-Easy": "ARC-E",
    "PIQA": "PIQA",
    "WinoGrande": "Wino.",
    "LAMBADA": "LAMB.",
}
"""Column names the paper's Table 2 uses for its tasks."""


@dataclass(frozen=True)
class ScaleSummary:
    """One row of the study: the statistics of one run (see :class:`SimulatedRun`)."""

    name: str
    n_params: float
    peak_sharpness: float
    final_sharpness: float
    final_loss: float
    accuracy: Mapping[str, float]
    mean_accuracy: float
    phase_means: tuple[float, float, float]
    corr_sharpness_loss: float
    corr_sharpness_grad: float
    peak_to_plateau: float

    @classmethod
    def from_run(cls, run: SimulatedRun) -> ScaleSummary:
        return cls(
            name=run.name,
            n_params=run.n_params,
            peak_sharpness=run.peak_sharpness,
            final_sharpness=run.final_sharpness,
            final_loss=run.final_loss,
            accuracy=dict(run.accuracy),
            mean_accuracy=run.mean_accuracy,
            phase_means=run.phase_means,
            corr_sharpness_loss=run.corr_sharpness_loss,
            corr_sharpness_grad=run.corr_sharpness_grad,
            peak_to_plateau=run.peak_to_plateau,
        )


@dataclass(frozen=True, eq=False)
class Study:
    """The runs of a study and their per-scale summaries; ``print(study)`` shows the tables."""

    preset: SimulatorPreset
    runs: tuple[SimulatedRun, ...]
    rows: tuple[ScaleSummary, ...]

    def columns(self) -> dict[str, NDArray]:
        """The summaries as a dict of numpy arrays, one entry per row, for fits and plots.

        Keys: ``name``, ``n_params``, ``peak_sharpness``, ``final_sharpness``, ``final_loss``,
        ``mean_accuracy``, ``phase1``-``phase3``, ``corr_sharpness_loss``,
        ``corr_sharpness_grad``, ``peak_to_plateau`` and ``accuracy_<task>`` per task.
        """
        cols: dict[str, NDArray] = {"name": np.array([r.name for r in self.rows])}
        for key in ("n_params", "peak_sharpness", "final_sharpness", "final_loss", "mean_accuracy"):
            cols[key] = np.array([getattr(r, key) for r in self.rows])
        for i in range(3):
            cols[f"phase{i + 1}"] = np.array([r.phase_means[i] for r in self.rows])
        for key in ("corr_sharpness_loss", "corr_sharpness_grad", "peak_to_plateau"):
            cols[key] = np.array([getattr(r, key) for r in self.rows])
        for task in self.preset.tasks:
            cols[f"accuracy_{task}"] = np.array([r.accuracy[task] for r in self.rows])
        return cols

    def to_records(self) -> list[dict[str, str | int | float]]:
        """Long curve rows of every run, scale by scale (see :meth:`SimulatedRun.to_records`)."""
        return [row for run in self.runs for row in run.to_records()]

    def table1(self) -> str:
        """Table 1: peak and final sharpness, final loss and mean accuracy per scale."""
        return _markdown(
            "Table 1: Scale-dependent sharpness and performance summary.",
            ["Model", "Peak S", "Final S", "Loss", "Acc."],
            [
                [r.name, r.peak_sharpness, r.final_sharpness, r.final_loss, r.mean_accuracy]
                for r in self.rows
            ],
        )

    def table2(self) -> str:
        """Table 2: accuracy per downstream task and scale."""
        tasks = self.preset.tasks
        return _markdown(
            "Table 2: Downstream task accuracy across model scales.",
            ["Model", *(TASK_HEADERS.get(task, task) for task in tasks)],
            [[r.name, *(r.accuracy[task] for task in tasks)] for r in self.rows],
        )

    def table3(self) -> str:
        """Table 3: mean sharpness in each phase."""
        return _markdown(
            "Table 3: Phase-wise mean sharpness across scales.",
            ["Model", "Phase 1", "Phase 2", "Phase 3"],
            [[r.name, *r.phase_means] for r in self.rows],
        )

    def correlations_table(self) -> str:
        """Within-run correlations that Section 3.3 quotes for 10M and 7B, and peak/plateau."""
        return _markdown(
            "Within-run correlations (Section 3.3) and peak-to-plateau ratio.",
            ["Model", "r(S, loss)", "r(S, grad)", "Peak/Final"],
            [
                [r.name, r.corr_sharpness_loss, r.corr_sharpness_grad, r.peak_to_plateau]
                for r in self.rows
            ],
        )

    def to_markdown(self) -> str:
        """All tables, Markdown, four decimals as the paper prints them."""
        tables = (self.table1(), self.table2(), self.table3(), self.correlations_table())
        return "\n\n".join(tables) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()


def simulate_study(
    scales: Mapping[str, float] | Sequence[float | str] | None = None,
    *,
    n_checkpoints: int | None = None,
    seed: int | np.random.Generator | None = None,
    noise: bool = True,
    oscillation: bool = True,
    preset: str | SimulatorPreset = "paper",
) -> Study:
    """Simulate one run per scale, in order, all drawing from one generator.

    Args:
        scales: name -> N mapping, or sizes as numbers or strings (``[1e7, "70B"]``); default the
            preset's (the paper's six). The order matters: it is the order of the random draws.
        n_checkpoints, noise, oscillation, preset: as for :func:`simulate_run`.
        seed: seeds the one generator of the study (default: the preset's, 42).

    Returns:
        A :class:`Study`; with the defaults its tables are the paper's Tables 1-3.
    """
    preset = get_preset(preset)
    named = _named_scales(preset.scales if scales is None else scales)
    rng = np.random.default_rng(preset.seed if seed is None else seed)
    runs = tuple(
        simulate_run(
            n,
            n_checkpoints=n_checkpoints,
            seed=rng,
            noise=noise,
            oscillation=oscillation,
            preset=preset,
            name=name,
        )
        for name, n in named.items()
    )
    return Study(preset=preset, runs=runs, rows=tuple(ScaleSummary.from_run(r) for r in runs))


def _named_scales(scales: Mapping[str, float] | Sequence[float | str]) -> dict[str, float]:
    if isinstance(scales, Mapping):
        named = dict(scales)
    elif isinstance(scales, str):
        raise ValueError("scales must be a sequence of sizes, e.g. ['10M', '70B'], not one string")
    else:
        sizes = [parse_size(s) if isinstance(s, str) else s for s in scales]
        named = {format_size(n): n for n in sizes}
        if len(named) != len(sizes):
            raise ValueError(f"scales must be distinct, got {list(scales)!r}")
    if not named:
        raise ValueError("scales must name at least one model size")
    return named


def _markdown(title: str, header: list[str], rows: list[list]) -> str:
    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
