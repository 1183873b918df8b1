"""Figure 1: sharpness curves across scales, coloured by log model size (needs matplotlib).

Example:
    >>> from sharpmeter.paper.simulator import simulate_study
    >>> fig = plot_sharpness_curves(simulate_study().runs)  # doctest: +SKIP
    >>> fig.savefig("figure1.png")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .run import SimulatedRun

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_sharpness_curves(runs: Sequence[SimulatedRun], path: str | Path | None = None) -> Figure:
    """Plot the sharpness of each run against the training fraction; save to ``path`` if given.

    Colour encodes ``log10(N)`` (viridis), with a colour bar in parameters. Uses a bare
    ``Figure`` rather than pyplot, so it works headless and leaves no global state behind.
    """
    try:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'sharpmeter[plot]'") from error
    if not runs:
        raise ValueError("nothing to plot: no runs given")

    sizes = [run.n_params for run in runs]
    low, high = min(sizes), max(sizes)
    # LogNorm needs a non-empty range; widen it symmetrically when all runs share one size.
    norm = LogNorm(vmin=low / 2, vmax=high * 2) if low == high else LogNorm(vmin=low, vmax=high)
    colours = ScalarMappable(norm=norm, cmap="viridis")

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for run in runs:
        ax.plot(run.t, run.sharpness, color=colours.to_rgba(run.n_params), lw=1.2, label=run.name)
    ax.set_xlabel("training fraction t")
    ax.set_ylabel("critical sharpness S")
    ax.set_title("Sharpness evolution across scales (simulated)")
    ax.legend(fontsize="small", ncols=2)
    fig.colorbar(colours, ax=ax, label="parameters N")
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig
