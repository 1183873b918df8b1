"""Schedules: the grid, log spacing, the time budget, and the meter's use of them."""

from __future__ import annotations

import pytest
import torch
from conftest import causal_lm_loss, tiny_gpt2, token_batch

import sharpmeter as sm


def test_every_n_steps():
    assert [s for s in range(35) if sm.Schedule(every=10).is_due(s)] == [0, 10, 20, 30]
    assert not sm.Schedule(every=3).is_due(-3)


def test_log_spaced_steps():
    due = [s for s in range(1001) if sm.Schedule(per_decade=3).is_due(s)]
    assert due == [0, 1, 2, 5, 10, 22, 46, 100, 215, 464, 1000]
    dense = [s for s in range(200) if sm.Schedule(per_decade=8).is_due(s)]
    assert dense[:8] == [0, 1, 2, 3, 4, 6, 7, 10] and 178 in dense


def test_time_budget():
    budget = sm.Schedule(every=1, max_fraction=0.05)
    assert budget.within_budget(measuring_seconds=4.9, training_seconds=100)
    assert not budget.within_budget(measuring_seconds=5.1, training_seconds=100)
    assert sm.Schedule().within_budget(1e9, 0.0)
    # the next measurement's expected cost counts against the budget too
    assert not budget.within_budget(measuring_seconds=4.0, training_seconds=100, next_cost=1.5)
    assert budget.within_budget(measuring_seconds=4.0, training_seconds=100, next_cost=0.9)


def test_meter_skips_measured_and_over_budget_steps():
    model = tiny_gpt2().eval()
    meter = sm.SharpnessMeter(
        model,
        token_batch(),
        causal_lm_loss,
        measures=("critical",),
        schedule=sm.Schedule(every=1, max_fraction=0.05),
    )
    assert meter.is_due(1)
    meter.measure(1)
    assert not meter.is_due(1)  # already measured
    meter.measuring_seconds = 1e6  # far over 5% of the training time so far
    assert not meter.is_due(2) and not meter.is_due(3)
    meter.measuring_seconds = meter.last_cost = 0.0  # back within budget
    assert meter.is_due(4)
    assert meter.measure(4)["skipped_for_budget"] == 2  # the row says what the budget left out
    assert meter.measure(5)["skipped_for_budget"] == 0
    assert sm.SharpnessMeter(model, token_batch(), causal_lm_loss).schedule.max_fraction == 0.05


def test_budget_clock_survives_a_resume():
    model = tiny_gpt2().eval()
    options = {"measures": ("critical",), "schedule": sm.Schedule(every=1, max_fraction=0.05)}
    meter = sm.SharpnessMeter(model, token_batch(), causal_lm_loss, **options)
    meter.measure(1)
    meter._started -= 100.0  # as if it had trained for 100 s
    meter.skipped_for_budget = 3  # and left out three grid steps since its last measurement
    state = meter.state_dict()
    assert state["training_seconds"] == pytest.approx(100, abs=1)
    resumed = sm.SharpnessMeter(model, token_batch(), causal_lm_loss, **options)
    resumed.load_state_dict(state)
    assert resumed.last_cost == meter.last_cost > 0
    assert resumed.skipped_for_budget == 3
    assert resumed.measuring_seconds == meter.measuring_seconds
    # a fresh clock would give ~0 s of training and refuse every measurement after a resume
    assert resumed.training_seconds == pytest.approx(state["training_seconds"], abs=0.5)
    assert resumed.training_seconds >= state["training_seconds"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every"),
        ({"per_decade": 0}, "per_decade"),
        ({"max_fraction": 1.5}, "max_fraction"),
    ],
)
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sm.Schedule(**kwargs)


def test_meter_bad_settings():
    model = torch.nn.Linear(2, 1)
    batch = {"input_ids": torch.zeros(1, 2), "labels": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match="measures"):
        sm.SharpnessMeter(model, batch, measures=("hessian",))
    with pytest.raises(ValueError, match="trace_num_matvecs"):
        sm.SharpnessMeter(model, batch, trace_num_matvecs=2)
    with pytest.raises(ValueError, match="hvp_mode"):
        sm.SharpnessMeter(model, batch, hvp_mode="jacrev")


def test_progress_bar_shows_only_when_asked(monkeypatch, capsys):
    monkeypatch.setattr("sharpmeter.measure.meter.PROGRESS_DELAY", 0.0)
    model = tiny_gpt2().eval()
    for progress in (False, True):
        meter = sm.SharpnessMeter(
            model, token_batch(), causal_lm_loss, measures=("trace",), progress=progress
        )
        row = meter.measure(1)
        assert row["status"] == "ok"
        shown = capsys.readouterr().err
        assert ("measuring" in shown) is progress, shown
