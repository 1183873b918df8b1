"""Schedule sensitivity (issue 16) on curves with a known answer: the simulator's curve under
cosine and linear, and under restarts with the spikes the paper describes at each restart (yes),
without them, with one spike between restarts, or with the others spiking as much at the same
steps (no); too little to compare leaves it undecided."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sharpmeter.paper.compare import RESTARTS, SPIKE_RATIO, schedule_verdict
from sharpmeter.paper.simulator import simulate_run

N_PARAMS = 125e6
T = simulate_run(N_PARAMS, seed=0).t
RESTART_TIMES = (0.25, 0.5, 0.75)


def restarts_lr(t: np.ndarray = T, peak: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """transformers' cosine with 4 hard restarts: back to the peak at 1/4, 1/2 and 3/4."""
    return t, peak * 0.5 * (1 + np.cos(np.pi * ((4 * t) % 1.0)))


def simulated(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's curve at one size: its noise and oscillation stand for a smooth schedule's."""
    run = simulate_run(N_PARAMS, seed=seed)
    return run.t, run.sharpness


def scaled_at(curve: tuple, times, factor: float) -> tuple:
    """``curve`` times ``factor`` at its first measurement at or after each of ``times``."""
    t, s = curve
    changed = s.copy()
    for time in times:
        changed[np.searchsorted(t, time)] *= factor
    return t, changed


def smooth_schedules() -> dict:
    return {"cosine": simulated(seed=1), "linear": simulated(seed=2)}


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_restarts_that_spike_are_a_yes(seed):
    spiked = scaled_at(simulated(seed), RESTART_TIMES, 3.0)
    verdict = schedule_verdict({**smooth_schedules(), RESTARTS: spiked}, restarts_lr())
    assert verdict.holds is True, verdict.line()
    assert verdict.p_value < 0.01
    assert "restarts at t = 0.25, 0.50, 0.75" in verdict.evidence


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_restarts_as_smooth_as_the_others_are_a_no(seed):
    verdict = schedule_verdict({**smooth_schedules(), RESTARTS: simulated(seed)}, restarts_lr())
    assert verdict.holds is False, verdict.line()


def test_one_spike_between_restarts_is_a_no():
    """The rule that once decided this (the largest jump anywhere past the rise, against the
    other schedules') said yes to it: the spike is the largest jump of all three curves."""
    spiked = scaled_at(simulated(3), [0.83], 5.0)
    largest = {
        name: np.max(np.abs(np.diff(np.log(s)))) for name, (_, s) in smooth_schedules().items()
    }
    assert np.max(np.abs(np.diff(np.log(spiked[1])))) > 2 * max(largest.values())
    verdict = schedule_verdict({**smooth_schedules(), RESTARTS: spiked}, restarts_lr())
    assert verdict.holds is False, verdict.line()


def test_the_others_spiking_at_the_same_steps_is_a_no():
    """One data order for every schedule: a spike all of them make is not the restarts'."""
    curves = {
        "cosine": scaled_at(simulated(1), RESTART_TIMES, 3.0),
        "linear": scaled_at(simulated(2), RESTART_TIMES, 3.0),
        RESTARTS: scaled_at(simulated(3), RESTART_TIMES, 3.0),
    }
    verdict = schedule_verdict(curves, restarts_lr())
    assert verdict.holds is False, verdict.line()


def test_a_collapse_at_the_restarts_is_a_no_that_says_so():
    collapsed = scaled_at(simulated(3), RESTART_TIMES, 1 / 3)
    verdict = schedule_verdict({**smooth_schedules(), RESTARTS: collapsed}, restarts_lr())
    assert verdict.holds is False, verdict.line()
    lowered = re.search(r"lower it to x(\S+) \(p = ([^)]+)\)", verdict.evidence)
    factor, p_value = map(float, lowered.groups())
    assert factor == pytest.approx(1 / 3, rel=0.1) and p_value < 0.01, verdict.evidence


def test_the_excess_decides_at_spike_ratio():
    t = np.linspace(0, 1, 101)
    wobble = np.where(np.arange(t.size) % 2, 1.001, 1.0)  # noise of ln 1.001
    for factor, holds in ((SPIKE_RATIO * 1.05, True), (SPIKE_RATIO * 0.95, False)):
        curves = {"cosine": (t, wobble), RESTARTS: scaled_at((t, wobble), RESTART_TIMES, factor)}
        verdict = schedule_verdict(curves, restarts_lr(t))
        assert verdict.holds is holds, verdict.line()


def test_a_spike_that_noise_makes_often_is_undecided():
    """Every tenth measurement of both curves spikes threefold, away from the restarts: a window
    of three catches such a spike at 3 in 10 positions, so a threefold rise at the restarts
    exceeds the noise's median but is no rarer than p ~ 0.3."""
    t = np.linspace(0, 1, 201)
    spiky = np.where(np.arange(t.size) % 10 == 3, 3.0, 1.0)
    restarted = scaled_at((t, spiky), RESTART_TIMES, 3.0)
    verdict = schedule_verdict({"cosine": (t, spiky), RESTARTS: restarted}, restarts_lr(t))
    assert verdict.holds is None and verdict.p_value > 0.1, verdict.line()


@pytest.mark.parametrize(
    "curves, lr, reason",
    [
        (smooth_schedules(), restarts_lr(), "needs a cosine_with_restarts curve"),
        ({RESTARTS: simulated(3)}, restarts_lr(), "needs a cosine_with_restarts curve and another"),
        ({**smooth_schedules(), RESTARTS: simulated(3)}, None, "logs no learning rate"),
        ({**smooth_schedules(), RESTARTS: simulated(3)}, (T, 1e-3 * (1 - T)), "never rises again"),
        (
            {**smooth_schedules(), RESTARTS: (np.linspace(0, 1, 6), np.ones(6))},
            restarts_lr(),
            "no restart with 3 measurements on each side past t = 0.2 in cosine_with_restarts",
        ),
    ],
)
def test_too_little_to_compare_is_undecided(curves, lr, reason):
    verdict = schedule_verdict(curves, lr)
    assert verdict.holds is None and reason in verdict.evidence, verdict.line()
