"""Restarts read from the logged learning rate (transformers' own scheduler), and the response
statistics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import get_cosine_with_hard_restarts_schedule_with_warmup

from sharpmeter.paper.analysis.restarts import restart_response, restart_times


def logged_lr(steps: int, warmup: int, cycles: int, every: int) -> tuple[np.ndarray, np.ndarray]:
    """The rate transformers' scheduler sets, as a meter measuring every ``every`` steps logs it."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    scheduler = get_cosine_with_hard_restarts_schedule_with_warmup(
        optimizer, warmup, steps, num_cycles=cycles
    )
    logged = []
    for step in range(1, steps + 1):
        if step % every == 0:
            logged.append((step / steps, scheduler.get_last_lr()[0]))
        optimizer.step()
        scheduler.step()
    return tuple(np.array(column) for column in zip(*logged, strict=True))


def test_the_restarts_of_transformers_scheduler_are_found_and_its_warmup_is_not():
    steps, warmup, cycles, every = 3000, 150, 4, 10
    t, lr = logged_lr(steps, warmup, cycles, every)
    cycle = (steps - warmup) / cycles
    expected = [warmup + k * cycle for k in range(1, cycles)]  # steps 862.5, 1575, 2287.5
    found = restart_times(t, lr) * steps
    assert found.size == cycles - 1
    assert all(0 <= f - e < every for f, e in zip(found, expected, strict=True)), found


def test_a_rate_that_only_decays_or_is_never_positive_has_no_restart():
    t = np.linspace(0, 1, 50)
    assert restart_times(t, 1e-3 * (1 - t)).size == 0
    assert restart_times(t, np.zeros_like(t)).size == 0
    assert restart_times(t[:1], np.ones(1)).size == 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: restart_times(np.zeros(3), np.zeros(4)), "one length"),
        (lambda: restart_times(np.zeros(3), np.zeros(3), jump=0), "jump must be in"),
        (lambda: restart_response({"a": ([0, 1], [1, 1])}, "a", [0.5], window=0), "at least 1"),
    ],
)
def test_bad_arguments_are_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_statistics_against_hand_computed_values():
    """One restart at t = 0.5 (index 20 of 41), a doubling there in an otherwise flat curve.
    Null positions: i in [11, 38] (window 3 inside, t[i - 3] >= 0.2) less |i - 20| < 6, 17 per
    curve; none rises, so the rank p-value is 1 / (1 + 34) and Fisher's of one p is itself."""
    t = np.linspace(0, 1, 41)
    flat = np.ones_like(t)
    restarted = flat.copy()
    restarted[20] = 2.0
    response = restart_response({"flat": (t, flat), "r": (t, restarted)}, "r", [0.5])
    (shift,) = response.shifts
    assert shift.t == 0.5
    assert shift.rise == pytest.approx(math.log(2)) and shift.fall == 0
    assert shift.control_rise == 0 and shift.control_fall == 0
    assert response.null_size == 34 and response.null_rise == 0 == response.null_fall
    assert shift.p_rise == pytest.approx(1 / 35) and response.p_rise == pytest.approx(1 / 35)
    assert shift.p_fall == 1 and response.p_fall == pytest.approx(1)
    assert response.spike_factor == pytest.approx(2) and response.collapse_factor == 1


def test_the_level_before_is_a_median_and_missing_values_are_dropped():
    """One noisy point before the restart does not set the level; NaN and non-positive values
    and an unsorted time axis are what a log of failed measurements looks like."""
    t = np.linspace(0, 1, 41)
    s = np.ones_like(t)
    s[18] = 10.0  # in the window before the restart
    s[21] = 4.0
    s[30], s[33] = np.nan, -1.0
    order = np.random.default_rng(0).permutation(t.size)
    response = restart_response({"a": (t, np.ones_like(t)), "r": (t[order], s[order])}, "r", [0.5])
    assert response.shifts[0].rise == pytest.approx(math.log(4))


def test_too_few_positions_for_the_null_is_a_value_error():
    t = np.linspace(0, 1, 21)
    with pytest.raises(ValueError, match="fewer than 20"):
        restart_response({"r": (t, np.ones_like(t))}, "r", [0.5])


def test_a_rise_over_two_measurements_is_one_restart_and_time_need_not_be_sorted():
    t = np.linspace(0, 1, 11)
    lr = np.array([1.0, 0.8, 0.6, 0.4, 0.1, 0.6, 1.0, 0.8, 0.6, 0.4, 0.2])  # 0.1 -> 0.6 -> 1.0
    order = np.random.default_rng(1).permutation(t.size)
    t_logged, lr_logged = np.append(t[order], np.nan), np.append(lr[order], 1.0)
    assert restart_times(t_logged, lr_logged, jump=0.4).tolist() == [0.5]


def test_restarts_whose_windows_overlap_count_once_and_fisher_combines_the_others():
    """Doublings at t = 0.3 and 0.7 (indices 12 and 28 of 41) and a restart at 0.35 (index 14,
    windows overlapping the first: left out). Two rank p-values p = 1 / (1 + n) combine by
    Fisher's method into X = -4 ln p, chi^2 with 4 degrees of freedom: e^(-X/2) (1 + X/2)."""
    t = np.linspace(0, 1, 41)
    flat = np.ones_like(t)
    restarted = flat.copy()
    restarted[[12, 28]] = 2.0
    curves = {"flat": (t, flat), "r": (t, restarted)}
    response = restart_response(curves, "r", [0.3, 0.35, 0.7], start=0.0)
    assert [shift.t for shift in response.shifts] == [0.3, 0.7]
    p = 1 / (1 + response.null_size)
    assert [shift.p_rise for shift in response.shifts] == pytest.approx([p, p])
    x = -4 * math.log(p)
    assert response.p_rise == pytest.approx(math.exp(-x / 2) * (1 + x / 2))
