"""Schedules: the grid, log spacing, the time budget, and the meter's use of them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import causal_lm_loss, float64_gpt2, token_batch

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
    model = float64_gpt2().eval()
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
    (ledger,) = meter.ledgers
    ledger.measuring_seconds = 1e6  # far over 5% of the training time so far
    assert not meter.is_due(2) and not meter.is_due(3)
    ledger.measuring_seconds = ledger.last_cost = 0.0  # back within budget
    assert meter.is_due(4)
    assert meter.measure(4)["skipped_for_budget"] == 2  # the row says what the budget left out
    assert meter.measure(5)["skipped_for_budget"] == 0


def test_budget_clock_survives_a_resume():
    model = float64_gpt2().eval()
    options = {"measures": ("critical",), "schedule": sm.Schedule(every=1, max_fraction=0.05)}
    meter = sm.SharpnessMeter(model, token_batch(), causal_lm_loss, **options)
    meter.measure(1)
    meter._started -= 100.0  # as if it had trained for 100 s
    meter.skipped_for_budget = 3  # and left out three grid steps since its last measurement
    state = json.loads(json.dumps(meter.state_dict()))  # as the Trainer's state keeps it
    assert state["training_seconds"] == pytest.approx(100, abs=1)
    resumed = sm.SharpnessMeter(model, token_batch(), causal_lm_loss, **options)
    resumed.load_state_dict(state)
    assert resumed.ledgers[0].last_cost == meter.ledgers[0].last_cost > 0
    assert resumed.ledgers[0].last_step == 1 and not resumed.is_due(1)
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
    model = float64_gpt2().eval()
    for progress in (False, True):
        meter = sm.SharpnessMeter(
            model, token_batch(), causal_lm_loss, measures=("trace",), progress=progress
        )
        row = meter.measure(1)
        assert row["status"] == "ok"
        shown = capsys.readouterr().err
        assert ("measuring" in shown) is progress, shown


def _meter(**changes):
    return sm.SharpnessMeter(float64_gpt2().eval(), token_batch(), causal_lm_loss, **changes)


def _run(meter, steps):
    return [meter.measure(step) for step in steps if meter.is_due(step)]


def test_the_defaults_measure_critical_densely_and_hvp_measures_sparsely_within_five_percent():
    options = sm.MeterOptions()
    dense, sparse = options.schedule_of("critical"), options.schedule_of("trace")
    assert (dense.every, sparse.every) == (10, 50)
    assert all(options.schedule_of(name) == sparse for name in ("spectral", "directional"))
    assert dense.max_fraction + sparse.max_fraction == pytest.approx(0.05)
    meter = _meter()
    assert [ledger.measures for ledger in meter.ledgers] == [("critical",), ("trace", "spectral")]


def test_each_measure_is_taken_on_its_own_grid_and_rows_keep_one_schema():
    dense, sparse = sm.Schedule(every=2), sm.Schedule(every=4)
    meter = _meter(
        measures=("critical", "trace", "spectral"),
        schedule=dense,
        schedules={"trace": sparse, "spectral": sparse},
    )
    rows = _run(meter, range(9))
    assert [row["step"] for row in rows] == [0, 2, 4, 6, 8]
    assert {tuple(row) for row in rows} == {tuple(rows[0])}
    for row in rows:
        hvp_due = row["step"] % 4 == 0
        assert row["critical_status"] == "ok" and math.isfinite(row["critical_sharpness"])
        assert row["status"] == "ok"  # a measure not due is not a failure
        for name, column in (("trace", "hessian_trace"), ("spectral", "lambda_max")):
            assert (row[f"{name}_status"] == "ok") is hvp_due
            assert math.isfinite(row[column]) is hvp_due
            if not hvp_due:
                assert row[f"{name}_status"] == "not_due"
    # the measures taken alone equal the same measures of a meter that takes every one
    alone = _meter(measures=("critical",), schedule=dense)
    assert [r["critical_sharpness"] for r in _run(alone, range(9))] == [
        r["critical_sharpness"] for r in rows
    ]


def test_a_measure_without_its_own_schedule_follows_the_default_one():
    meter = _meter(
        measures=("critical", "trace"),
        schedule=sm.Schedule(every=3),
        schedules={"spectral": sm.Schedule(every=2)},  # not chosen: ignored
    )
    assert [ledger.measures for ledger in meter.ledgers] == [("critical", "trace")]
    assert [row["step"] for row in _run(meter, range(7))] == [0, 3, 6]


def test_each_schedule_spends_its_own_budget():
    meter = _meter(
        measures=("critical", "trace"),
        schedule=sm.Schedule(every=1, max_fraction=0.05),
        schedules={"trace": sm.Schedule(every=1, max_fraction=0.04)},
    )
    critical, trace = meter.ledgers
    meter._started -= 100.0  # 100 s of training so far
    trace.measuring_seconds = 3.99  # the trace's share is spent, critical's is not
    assert meter.is_due(1)
    row = meter.measure(1)
    assert row["critical_status"] == "ok" and row["trace_status"] == "not_due"
    assert critical.last_step == 1 and trace.last_step is None
    assert trace.measuring_seconds == 3.99  # charged nothing: not taken
    assert meter.is_due(2) and meter.measure(2)["skipped_for_budget"] == 1


def test_a_row_is_charged_to_its_schedules_by_what_their_measures_took():
    meter = _meter(
        measures=("critical", "trace"),
        schedules={"trace": sm.Schedule(every=1, max_fraction=1.0)},  # its own ledger
        schedule=sm.Schedule(every=1),
        trace_num_matvecs=32,
    )
    critical, trace = meter.ledgers
    row = meter.measure(0)  # no is_due: every measure
    assert row["status"] == "ok"
    assert critical.measuring_seconds + trace.measuring_seconds == pytest.approx(
        row["wall_seconds"]
    )
    assert trace.measuring_seconds > critical.measuring_seconds  # 32 HVPs against ~7 forwards
    assert critical.last_step == trace.last_step == 0


def test_a_deflated_trace_due_without_the_spectral_measure_runs_its_krylov_alone():
    meter = _meter(
        measures=("trace", "spectral"),
        trace_method="deflated",
        schedule=sm.Schedule(every=1),
        schedules={"spectral": sm.Schedule(every=2)},
    )
    both, trace_only = _run(meter, range(2))
    assert both["status"] == trace_only["status"] == "ok"
    assert trace_only["spectral_status"] == "not_due"
    # alone, the trace reports the Lanczos steps it spent too
    spent = trace_only["hessian_trace_num_matvecs"]
    assert spent > both["hessian_trace_num_matvecs"]
    assert math.isfinite(trace_only["hessian_trace"])


def test_a_state_saved_with_one_account_resumes_every_schedule_from_it():
    meter = _meter(measures=("critical", "trace"), schedules={"trace": sm.Schedule(every=50)})
    old = {
        "eta_c": 0.1,
        "last_step": 40,
        "measuring_seconds": 3.0,
        "last_cost": 1.0,
        "training_seconds": 90.0,
        "skipped_for_budget": 0,
    }
    meter.load_state_dict(old)
    assert [ledger.last_step for ledger in meter.ledgers] == [40, 40]
    assert [ledger.last_cost for ledger in meter.ledgers] == [1.0, 1.0]
    assert not meter.is_due(40) and meter.is_due(50)


@pytest.mark.parametrize(
    ("schedules", "match"),
    [
        ({"hessian": sm.Schedule()}, "unknown measures"),
        ({"trace": 50}, "schedules\\['trace'\\]"),
        ([sm.Schedule()], "must be a dict"),
    ],
)
def test_bad_per_measure_schedules(schedules, match):
    with pytest.raises(ValueError, match=match):
        sm.MeterOptions(schedules=schedules)
