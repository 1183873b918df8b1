"""Schedule sensitivity (issue 16) on curves with a known answer: the simulator's curve under
cosine and linear, and under restarts with the spikes the paper describes (yes) or without
them (no); too little to compare leaves it undecided."""

from __future__ import annotations

import numpy as np
import pytest

from sharpmeter.paper.compare import RESTARTS, SPIKE_RATIO, schedule_verdict
from sharpmeter.paper.simulator import simulate_run

N_PARAMS = 125e6


def simulated(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's curve at one size: its noise and oscillation stand for a smooth schedule's."""
    run = simulate_run(N_PARAMS, seed=seed)
    return run.t, run.sharpness


def with_spikes(curve: tuple[np.ndarray, np.ndarray], height: float) -> tuple:
    """``curve`` raised ``height``-fold just after restarts at t = 1/4, 1/2 and 3/4."""
    t, s = curve
    spiked = s.copy()
    for restart in (0.25, 0.5, 0.75):
        spiked[np.searchsorted(t, restart)] *= height
    return t, spiked


def smooth_schedules() -> dict:
    return {"cosine": simulated(seed=1), "linear": simulated(seed=2)}


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_restarts_that_spike_are_a_yes(seed):
    verdict = schedule_verdict({**smooth_schedules(), RESTARTS: with_spikes(simulated(seed), 1.5)})
    assert verdict.holds is True, verdict.line()
    assert "cosine_with_restarts" in verdict.evidence and "linear" in verdict.evidence


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_restarts_as_smooth_as_the_others_are_a_no(seed):
    verdict = schedule_verdict({**smooth_schedules(), RESTARTS: simulated(seed)})
    assert verdict.holds is False, verdict.line()


def test_a_smooth_schedule_that_spikes_as_much_is_a_no():
    spiked = with_spikes(simulated(3), 1.5)
    curves = {"cosine": spiked, "linear": simulated(2), RESTARTS: with_spikes(simulated(4), 1.5)}
    verdict = schedule_verdict(curves)
    assert verdict.holds is False, verdict.line()


def test_the_ratio_decides_at_spike_ratio():
    t = np.linspace(0, 1, 101)
    flat = np.ones_like(t)
    wobble = flat * np.where(np.arange(t.size) % 2, 1.01, 1.0)  # |Δ ln S| = ln 1.01 each step
    for ratio, holds in ((SPIKE_RATIO * 1.1, True), (SPIKE_RATIO * 0.9, False)):
        spike = flat.copy()
        spike[60] = np.exp(ratio * np.log(1.01))
        verdict = schedule_verdict({"cosine": (t, wobble), RESTARTS: (t, spike)})
        assert verdict.holds is holds, verdict.line()


@pytest.mark.parametrize(
    "curves, reason",
    [
        (smooth_schedules(), "needs a cosine_with_restarts curve"),
        ({RESTARTS: simulated(3)}, "needs a cosine_with_restarts curve and another"),
        (
            {**smooth_schedules(), RESTARTS: (np.linspace(0, 1, 6), np.ones(6))},
            "fewer than 5 jumps past t = 0.2 in cosine_with_restarts",
        ),
    ],
)
def test_too_little_to_compare_is_undecided(curves, reason):
    verdict = schedule_verdict(curves)
    assert verdict.holds is None and reason in verdict.evidence, verdict.line()
