"""One simulated training run: the curves at one model size.

Example:
    >>> run = simulate_run(1e7)  # the paper's 10M run (seed 42, 200 checkpoints)
    >>> run.sharpness.shape, round(run.final_sharpness, 4)
    ((200,), 1.2765)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from sharpmeter.paper.sizes import format_size

from .model import log_scale, loss_trend, no_shape_reason, sharpness_trend
from .presets import SimulatorPreset, get_preset

MIN_CHECKPOINTS = 10
"""Fewer checkpoints leave the phases and the "final" window without a meaningful sample."""

QUANTITIES = ("sharpness", "loss", "grad_norm")
"""The curves a run exports, named as the measurement side names them in its records."""


@dataclass(frozen=True, eq=False)
class SimulatedRun:
    """Curves of one run at ``n_checkpoints`` evenly spaced training fractions ``t``.

    ``sharpness``, ``loss`` and ``grad_norm`` are what a measurement would see (oscillation and
    noise included). The deterministic components are kept beside them:
    ``sharpness_trend`` is eq. (1), ``oscillation`` the edge-of-stability term (zeros when off),
    ``loss_trend`` is eq. (6), ``grad_norm_trend`` the gradient-norm model on the noise-free
    sharpness. ``accuracy`` maps each downstream task to its simulated accuracy.
    """

    name: str
    n_params: float
    preset: SimulatorPreset
    step: NDArray[np.int64]
    t: NDArray[np.float64]
    sharpness: NDArray[np.float64]
    loss: NDArray[np.float64]
    grad_norm: NDArray[np.float64]
    sharpness_trend: NDArray[np.float64]
    oscillation: NDArray[np.float64]
    loss_trend: NDArray[np.float64]
    grad_norm_trend: NDArray[np.float64]
    accuracy: dict[str, float]

    @property
    def peak_sharpness(self) -> float:
        """Maximum of the observed sharpness curve (Table 1, "Peak S")."""
        return float(self.sharpness.max())

    @property
    def final_sharpness(self) -> float:
        """Mean sharpness over the last 10% of checkpoints (Table 1, "Final S")."""
        return float(self.sharpness[-self.preset.final_count(self.t.size) :].mean())

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 10% of checkpoints (Table 1, "Loss")."""
        return float(self.loss[-self.preset.final_count(self.t.size) :].mean())

    @property
    def mean_accuracy(self) -> float:
        """Mean over the tasks (Table 1, "Acc.")."""
        return float(np.mean(list(self.accuracy.values())))

    @property
    def phase_means(self) -> tuple[float, float, float]:
        """Mean sharpness in the rise, decay and plateau phases (Table 3)."""
        first, second, third = (
            float(self.sharpness[s].mean()) for s in self.preset.phase_slices(self.t.size)
        )
        return first, second, third

    @property
    def corr_sharpness_loss(self) -> float:
        """Pearson r of sharpness and loss over the checkpoints of this run (Section 3.3)."""
        return float(np.corrcoef(self.sharpness, self.loss)[0, 1])

    @property
    def corr_sharpness_grad(self) -> float:
        """Pearson r of sharpness and gradient norm over the checkpoints (Section 3.3)."""
        return float(np.corrcoef(self.sharpness, self.grad_norm)[0, 1])

    @property
    def peak_to_plateau(self) -> float:
        """Peak over final sharpness."""
        return self.peak_sharpness / self.final_sharpness

    def to_records(self, source: str = "simulated") -> list[dict[str, str | int | float]]:
        """Long rows in the measurement side's format, one per checkpoint and quantity.

        ``{"source", "n_params", "step", "fraction", "quantity", "value"}``, ordered by step;
        write them with :func:`sharpmeter.paper.records.write_records`.

        >>> simulate_run(1e7, n_checkpoints=10).to_records()[1]["quantity"]
        'loss'
        """
        # Integral sizes are written as ints so that JSONL and CSV rows read back identically.
        n_params = int(self.n_params) if self.n_params.is_integer() else self.n_params
        curves = {q: getattr(self, q) for q in QUANTITIES}
        return [
            {
                "source": source,
                "n_params": n_params,
                "step": int(step),
                "fraction": float(t),
                "quantity": quantity,
                "value": float(curve[i]),
            }
            for i, (step, t) in enumerate(zip(self.step, self.t, strict=True))
            for quantity, curve in curves.items()
        ]


def simulate_run(
    n_params: float,
    *,
    n_checkpoints: int | None = None,
    seed: int | np.random.Generator | None = None,
    noise: bool = True,
    oscillation: bool = True,
    preset: str | SimulatorPreset = "paper",
    name: str | None = None,
) -> SimulatedRun:
    """Simulate one run of a model with ``n_params`` parameters.

    Args:
        n_params: parameter count N > 0; any size, e.g. ``7e10`` for 70B.
        n_checkpoints: checkpoints at ``t = linspace(0, 1, n)``, at least 10 (default: the
            preset's, 200).
        seed: an int seeds a fresh ``np.random.default_rng``; a ``Generator`` is drawn from in
            place (how a study chains its scales); ``None`` uses the preset's seed (42), so a run
            is reproducible unless asked otherwise.
        noise: ``False`` drops every noise term (sharpness, loss, gradient norm, accuracy) and
            draws nothing.
        oscillation: ``False`` drops the edge-of-stability term.
        preset: ``"paper"`` or a :class:`SimulatorPreset`.
        name: label for tables and plots (default: the readable size, e.g. ``"70B"``).

    Raises:
        ValueError: N not a finite positive number, fewer than 10 checkpoints, unknown preset.

    >>> run = simulate_run(7e10, noise=False, oscillation=False)
    >>> bool(np.array_equal(run.sharpness, run.sharpness_trend))
    True
    """
    preset = get_preset(preset)
    log_scale(n_params)  # validates N before anything is drawn
    n = preset.n_checkpoints if n_checkpoints is None else n_checkpoints
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < MIN_CHECKPOINTS:
        raise ValueError(f"n_checkpoints must be an integer >= {MIN_CHECKPOINTS}, got {n!r}")
    _warn_outside_domain(n_params, preset)
    rng = np.random.default_rng(preset.seed if seed is None else seed)

    t = np.linspace(0.0, 1.0, n)
    s_trend = sharpness_trend(t, n_params)
    osc = preset.oscillation(t, n_params) if oscillation else np.zeros(n)
    l_trend = loss_trend(t, n_params, preset.initial_loss(log_scale(n_params)))
    if noise:
        z_sharp, z_loss, z_grad = (rng.standard_normal(n) for _ in range(3))
        z_acc = rng.standard_normal(len(preset.tasks))
        sharpness = s_trend + osc + preset.sharpness_noise * z_sharp
        loss = l_trend + preset.loss_noise * z_loss
        grad_norm = preset.grad_norm_trend(sharpness, t) + preset.grad_noise * z_grad
    else:
        sharpness, loss = s_trend + osc, l_trend
        grad_norm = preset.grad_norm_trend(sharpness, t)

    final = float(sharpness[-preset.final_count(n) :].mean())
    accuracy = preset.accuracy_trend(n_params, final)
    if noise:
        accuracy = accuracy + preset.accuracy_noise * z_acc
    return SimulatedRun(
        name=format_size(n_params) if name is None else name,
        n_params=float(n_params),
        preset=preset,
        step=np.arange(n),
        t=t,
        sharpness=sharpness,
        loss=loss,
        grad_norm=grad_norm,
        sharpness_trend=s_trend,
        oscillation=osc,
        loss_trend=l_trend,
        grad_norm_trend=preset.grad_norm_trend(s_trend + osc, t),
        accuracy=dict(zip(preset.tasks, accuracy.tolist(), strict=True)),
    )


def _warn_outside_domain(n_params: float, preset: SimulatorPreset) -> None:
    # The linear-in-log10(N) fits stay meaningful only over a range around the paper's 10M-7B;
    # beyond it the curve loses its shape, which a user extrapolating should hear about.
    problems = [reason] if (reason := no_shape_reason(n_params)) else []
    if preset.oscillation_damping(log_scale(n_params)) <= 0:
        problems.append("the oscillation grows instead of being damped")
    if problems:
        warnings.warn(
            f"N = {n_params:.3g} is outside the model's range: {'; '.join(problems)}",
            RuntimeWarning,
            stacklevel=3,
        )
