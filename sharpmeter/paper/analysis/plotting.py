"""The scaling-law figure: final values vs model size, both fits, the log-linear band.

matplotlib is an optional dependency (``sharpmeter[plot]``), imported only when a figure is made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sharpmeter.paper.analysis.scaling import FitComparison


def plot_scaling_fit(
    comparison: FitComparison, path: str | Path, quantity: str = "final sharpness"
) -> Path:
    """Save a PNG (or any format matplotlib knows by ``path``'s suffix) and return its path.

    Points: the per-scale values; solid line and shaded band: the log-linear fit and its t-based
    confidence band at the fit's level; dashed line: the power law.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'sharpmeter[plot]'") from exc

    log_linear, power_law = comparison.log_linear, comparison.power_law
    n = log_linear.n_params
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 200)
    lo, hi = log_linear.predict_interval(grid)

    # Figure without pyplot: no global state, no GUI backend needed
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.fill_between(
        grid, lo, hi, alpha=0.25, label=f"log-linear {log_linear.level:.0%} confidence band"
    )
    ax.plot(
        grid,
        log_linear.predict(grid),
        label=f"log-linear: {log_linear.slope:.4f} log10 N + {log_linear.intercept:.4f} "
        f"(R² {log_linear.r2:.4f}, AIC {log_linear.aic:.2f})",
    )
    ax.plot(
        grid,
        power_law.predict(grid),
        linestyle="--",
        label=f"power law: {power_law.coefficient:.3f} N^{power_law.exponent:.4f} "
        f"(R² {power_law.r2:.4f}, AIC {power_law.aic:.2f})",
    )
    ax.scatter(n, log_linear.values, color="black", zorder=3, label="runs")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(quantity)
    ax.legend(fontsize="small")
    path = Path(path)
    fig.savefig(path, dpi=150)
    return path
