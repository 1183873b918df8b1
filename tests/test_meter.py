"""SharpnessMeter's promises in the setups users have: subsets with clipping, custom and
non-Adam optimizers, question-answering heads, failed rows, every RNG stream."""

from __future__ import annotations

import math
import random
import threading

import numpy as np
import pytest
import torch
import transformers
from conftest import assert_same, float64_gpt2, snapshot, token_batch
from torch import nn

import sharpmeter as sm
import sharpmeter.measure.distributed as distributed_module
import sharpmeter.measure.measures as measures_module
import sharpmeter.measure.meter as meter_module
from sharpmeter.integrations.hf import SharpnessCallback
from sharpmeter.measure import schema
from sharpmeter.measure.estimators.krylov import TraceAndTopResult
from sharpmeter.measure.loss import ProbeLoss, probe_loss_and_gradient
from sharpmeter.measure.measures import MEASURE_TABLE, MEASURES
from sharpmeter.measure.operators import NonFiniteLossError
from sharpmeter.measure.params import unflatten


def trained(model, optimizer, batch, steps: int = 2):
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model, optimizer


def test_a_measured_subset_is_clipped_by_the_global_norm():
    """The Trainer clips every gradient by their joint norm; a subset's own norm is smaller
    and would clip the measured update too little."""
    model = float64_gpt2().float().eval()
    batch = token_batch(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trained(model, optimizer, batch)
    subset = [model.transformer.wte.weight]
    every = list(model.parameters())
    _, full_gradient = probe_loss_and_gradient(ProbeLoss(model, None, batch), every)
    _, subset_gradient = probe_loss_and_gradient(ProbeLoss(model, None, batch), subset)
    clip = float(subset_gradient.norm()) / 4  # active for the subset's norm, and the global one
    full = sm.update_direction(
        optimizer, every, gradients=unflatten(full_gradient, every), max_grad_norm=clip
    )
    expected = sm.critical_sharpness(
        model, None, batch, full.over(subset), params=subset, eta0=1e-3, check_below=2
    )
    meter = sm.SharpnessMeter(
        model, batch, params=subset, measures=("critical",), max_grad_norm=clip
    )
    row = meter.measure(1, optimizer=optimizer)
    assert row["critical_status"] == "ok" and expected.status == "ok"
    assert row["critical_eta_lo"] == pytest.approx(expected.lo, rel=1e-6)
    assert row["critical_eta_hi"] == pytest.approx(expected.hi, rel=1e-6)


class LockedAdam(torch.optim.Adam):
    """A custom optimizer that cannot be copied: no faithful shadow step exists."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.lock = threading.Lock()


def test_no_direction_is_a_status_and_the_rest_is_measured():
    model = float64_gpt2().eval()
    batch = token_batch(3)
    optimizer = LockedAdam(model.parameters(), lr=1e-3)
    trained(model, optimizer, batch)
    meter = sm.SharpnessMeter(model, batch, measures=("critical", "directional", "trace"))
    before = snapshot(model, optimizer)
    row = meter.measure(1, optimizer=optimizer)
    assert_same(before, snapshot(model, optimizer))
    assert row["critical_status"].startswith("no_direction: LockedAdam cannot be deep-copied")
    assert row["directional_status"].startswith("no_direction")
    assert row["trace_status"] == "ok" and np.isfinite(row["hessian_trace"])
    assert row["status"] == "incomplete: critical,directional"
    assert np.isnan(row["critical_sharpness"]) and meter.warm.eta_c is None


def test_a_loss_that_never_rises_does_not_seed_the_warm_start():
    """The loss along d falls, flattens below the start and turns NaN far away: no value, and
    the next measurement does not start from a meaningless eta_c."""

    class Flattening(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.tensor([0.0], dtype=torch.float64))

        def forward(self, _batch):
            eta = -self.theta[0]  # d = gradient = -1 per unit step
            return torch.where(eta < 1e6, torch.exp(-eta) - 1, torch.nan) + 0 * self.theta[0]

    model = Flattening()
    meter = sm.SharpnessMeter(model, None, loss_fn=lambda m, b: m(b), measures=("critical",))
    row = meter.measure(1)
    assert row["critical_status"] in ("no_increase", "nonfinite")
    assert row["status"].startswith("incomplete") and np.isnan(row["critical_sharpness"])
    assert meter.warm.eta_c is None


def test_question_answering_heads_measure_with_their_own_loss_keys():
    """No ``labels``: BERT's QA head takes start/end positions and returns its loss."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    model = transformers.BertForQuestionAnswering(config).eval()
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 32, (3, 10), generator=generator),
        "start_positions": torch.tensor([1, 2, 3]),
        "end_positions": torch.tensor([4, 5, 6]),
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trained(model, optimizer, batch)
    meter = sm.SharpnessMeter(model, batch, measures=("critical", "trace"))
    row = meter.measure(1, optimizer=optimizer)
    assert row["status"] == "ok", row
    without_loss = {k: v for k, v in batch.items() if k == "input_ids"}
    with pytest.raises(ValueError, match="no .loss"):
        sm.SharpnessMeter(model, without_loss)


def test_the_preconditioned_measure_refuses_a_non_adam_optimizer_once():
    model = float64_gpt2().eval()
    batch = token_batch(2)
    meter = sm.SharpnessMeter(model, batch, measures=("critical", "preconditioned"))
    with pytest.raises(ValueError, match="Adam-type"):
        meter.check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    meter.check_optimizer(torch.optim.AdamW(model.parameters()))
    sm.SharpnessMeter(model, batch, measures=("critical",)).check_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.1)
    )


def test_every_rng_stream_is_left_alone():
    """A loss that draws from Python's and NumPy's generators (user code does) changes none."""
    model = float64_gpt2(dropout=0.1).train()
    batch = token_batch(2)

    def noisy_loss(model, batch):
        random.random()
        np.random.rand()
        return model(**batch).loss

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    meter = sm.SharpnessMeter(model, batch, loss_fn=noisy_loss, measures=("critical", "trace"))
    meter.measure(1)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def test_checking_options_builds_nothing_and_draws_nothing():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    sm.MeterOptions(measures=("critical", "trace"), schedule=sm.Schedule(every=5))
    SharpnessCallback(token_batch(2), measures=("critical",))
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    with pytest.raises(ValueError, match="did you mean 'max_grad_norm'"):
        sm.MeterOptions().replace(max_grad_nrom=1.0)
    with pytest.raises(ValueError, match="lanczos_tol"):
        sm.MeterOptions(lanczos_tol=-1)
    with pytest.raises(ValueError, match="loss_fn"):
        sm.MeterOptions(loss_fn="mse")
    for name in ("probe_size", "lanczos_max_iter", "seed"):  # True is no count, here too
        with pytest.raises(ValueError, match=name):
            sm.MeterOptions(**{name: True})


@pytest.mark.parametrize("trace_method", ["hutchinson", "auto"])
def test_a_nan_estimate_is_never_ok(monkeypatch, trace_method):
    """An HVP that overflowed gives NaN: the row says nonfinite (separate estimators, or the
    default's one Krylov run)."""
    model = float64_gpt2().eval()
    batch = token_batch(2)
    meter = sm.SharpnessMeter(
        model, batch, measures=("trace", "spectral"), trace_method=trace_method
    )
    meter.measure(1)

    def nan_trace(operator, num_matvecs, seed):
        return sm.TraceResult(float("nan"), float("nan"), num_matvecs, torch.zeros(1))

    def nan_lanczos(operator, **kwargs):
        values = torch.full((1,), float("nan"), dtype=torch.float64)
        vectors = torch.full((operator.dim, 1), float("nan"), dtype=torch.float64)
        return sm.LanczosResult(values, vectors, values, 1, 1, True)

    def nan_krylov(operator, num_matvecs, seed, **kwargs):
        top = nan_lanczos(operator)
        return TraceAndTopResult(top, nan_trace(operator, num_matvecs, seed), math.nan, 1, 1)

    monkeypatch.setitem(measures_module.TRACE_METHODS, "hutchinson", nan_trace)
    monkeypatch.setattr(measures_module, "lanczos", nan_lanczos)
    monkeypatch.setattr(measures_module, "trace_and_top", nan_krylov)
    row = meter.measure(2)
    assert row["trace_status"] == "nonfinite" and row["spectral_status"] == "nonfinite"
    assert row["status"] == "incomplete: trace,spectral"


def test_the_global_gradient_norm_is_taken_only_for_a_measure_that_follows_the_optimizer(
    monkeypatch,
):
    """Clipping a measured subset by the global norm costs a backward over every parameter (a
    collective under sharding): only the measures that follow the optimizer's update need it,
    and only when there is an optimizer to follow."""
    model = float64_gpt2().eval()
    batch = token_batch(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trained(model, optimizer, batch)
    subset = [model.transformer.wte.weight]
    calls = []
    original = meter_module.SharpnessMeter._total_gradient_norm

    def counted(self, *args, **kwargs):
        calls.append(self.measures)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(meter_module.SharpnessMeter, "_total_gradient_norm", counted)

    def calls_for(measures, optimizer):
        meter = sm.SharpnessMeter(
            model, batch, params=subset, measures=measures, max_grad_norm=1e-3
        )
        calls.clear()
        assert meter.measure(1, optimizer=optimizer)["status"] != "error"
        return len(calls)

    assert calls_for(("trace",), optimizer) == 0
    assert calls_for(("critical",), None) == 0
    assert calls_for(("critical",), optimizer) == 1


def test_a_first_group_without_a_learning_rate_leaves_the_other_measures_standing():
    """The direction is the update per unit of the first group's rate: with that rate 0 and
    another group's not, it has no unit. The direction measures say so; trace and Lanczos,
    which do not need it, are measured as usual."""
    model = float64_gpt2().eval()
    batch = token_batch(3)
    frozen = [p for p in model.parameters() if p.dim() < 2]
    trained_fast = [p for p in model.parameters() if p.dim() >= 2]
    optimizer = torch.optim.AdamW(
        [{"params": frozen, "lr": 0.0}, {"params": trained_fast}], lr=1e-3
    )
    trained(model, optimizer, batch)
    meter = sm.SharpnessMeter(
        model,
        batch,
        measures=("critical", "directional", "trace", "spectral"),
        lanczos_max_iter=80,
    )
    before = snapshot(model, optimizer)
    row = meter.measure(1, optimizer=optimizer)
    assert_same(before, snapshot(model, optimizer))
    for measure in ("critical", "directional"):
        assert row[f"{measure}_status"].startswith("no_direction: "), row[f"{measure}_status"]
        assert "learning rate" in row[f"{measure}_status"]
    assert np.isnan(row["critical_sharpness"]) and meter.warm.eta_c is None
    assert row["trace_status"] == "ok" and np.isfinite(row["hessian_trace"])
    assert row["spectral_status"] == "ok" and np.isfinite(row["lambda_max"])
    assert row["status"] == "incomplete: critical,directional"
    assert row["lr"] == 0.0 and np.isfinite(row["loss"])


def _rows_of_every_kind(monkeypatch) -> dict[str, dict]:
    """One meter measuring everything, and rows where it went well and where it did not."""
    model = float64_gpt2().eval()
    batch = token_batch(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trained(model, optimizer, batch)
    meter = sm.SharpnessMeter(
        model, batch, measures=MEASURES, lanczos_max_iter=80, trace_method="hutchinson"
    )
    rows = {"ok": meter.measure(1, optimizer=optimizer)}
    rows["no_direction"] = meter.measure(2, optimizer=LockedAdam(model.parameters(), lr=1e-3))
    with monkeypatch.context() as patch:

        def raising(*args, **kwargs):
            raise RuntimeError("boom")

        for name in ("critical_sharpness", "directional_sharpness", "lanczos"):
            patch.setattr(measures_module, name, raising)
        patch.setitem(measures_module.TRACE_METHODS, "hutchinson", raising)
        rows["estimators_raise"] = meter.measure(3, optimizer=optimizer)
    with monkeypatch.context() as patch:

        def nonfinite(*args, **kwargs):
            raise NonFiniteLossError("the probe loss or its gradient is not finite (loss = nan)")

        patch.setattr(meter_module, "HessianOperator", nonfinite)
        rows["nonfinite_loss"] = meter.measure(4, optimizer=optimizer)
    return rows


def test_the_measure_table_is_the_torch_free_schema():
    """The paper side reads the measures' columns from the schema without torch: the table the
    meter loops over is built from it, measure by measure, in its order."""
    assert MEASURES == schema.MEASURES
    assert {measure.name: measure.columns for measure in MEASURE_TABLE} == schema.MEASURE_COLUMNS
    assert schema.VALUE_COLUMNS == tuple(measure.value_column for measure in MEASURE_TABLE)


def test_every_row_has_the_same_keys_whatever_failed(monkeypatch):
    """The row schema is the measure table's: rows that failed (an estimator raising, a probe
    loss that is not finite, no update direction) have exactly the keys of an ok row."""
    rows = _rows_of_every_kind(monkeypatch)
    assert rows["ok"]["status"] == "ok", rows["ok"]
    assert rows["no_direction"]["critical_status"].startswith("no_direction")
    assert rows["estimators_raise"]["status"] == "error: " + ",".join(MEASURES)
    assert rows["nonfinite_loss"]["status"] == "nonfinite"
    assert all(rows["nonfinite_loss"][f"{m}_status"] == "nonfinite" for m in MEASURES)
    columns = [column for measure in MEASURE_TABLE for column in measure.columns]
    assert len(columns) == len(set(columns))  # no column is spelled by two measures
    expected = list(rows["ok"])
    assert set(columns) | {f"{m}_status" for m in MEASURES} <= set(expected)
    for kind, row in rows.items():
        assert list(row) == expected, kind
    assert rows["ok"]["lambda_max_converged"] is True
    assert rows["ok"]["preconditioned_lambda_max_converged"] is True
    assert rows["ok"]["error"] is None and "boom" not in str(rows["ok"])


@pytest.mark.parametrize("failed_elsewhere", [0, 1])
def test_under_data_parallelism_an_estimator_that_raises_on_one_rank_ends_the_run(
    monkeypatch, failed_elsewhere
):
    """One process: a raising estimator is a status. Several ranks that all failed there: a
    status too (they are still in step). Only some ranks: their collectives are out of step
    with the others', so the run ends with a CollectiveError naming the rank."""
    model = float64_gpt2().eval()
    meter = sm.SharpnessMeter(
        model, token_batch(2), measures=("trace", "spectral"), trace_method="hutchinson"
    )

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory on this rank's larger shard")

    monkeypatch.setitem(measures_module.TRACE_METHODS, "hutchinson", out_of_memory)
    row = meter.measure(1)
    assert row["trace_status"].startswith("error: RuntimeError: out of memory")
    assert row["spectral_status"] == "ok"
    monkeypatch.setattr(distributed_module, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed_module, "world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    failures = []

    def sum_over_two_ranks(tensor):  # the other rank adds its own failure, or is elsewhere
        failures.append(float(tensor))
        return tensor + failed_elsewhere

    monkeypatch.setattr(distributed_module, "all_reduce_sum", sum_over_two_ranks)
    if failed_elsewhere:
        assert meter.measure(2)["trace_status"].startswith("error: RuntimeError: out of memory")
    else:
        with pytest.raises(distributed_module.RankDivergence, match="trace failed on rank 1"):
            meter.measure(2)
    assert failures == [1.0]
    assert issubclass(distributed_module.RankDivergence, distributed_module.CollectiveError)


def test_a_probe_with_fewer_examples_than_ranks_is_refused_on_every_rank(monkeypatch):
    batch = token_batch(3)
    monkeypatch.setattr(distributed_module, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    with pytest.raises(ValueError, match="3 examples, fewer than the 4 ranks"):
        distributed_module.local_shard(batch)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 2)
    assert distributed_module.local_shard(batch)["input_ids"].shape[0] == 1
    # a multi-batch probe: every batch needs a row per rank, not only the first
    with pytest.raises(ValueError, match="2 examples, fewer than the 3 ranks"):
        distributed_module.local_shard([batch, token_batch(2)])


def test_the_deflated_trace_shares_one_krylov_run_with_the_spectral_measure():
    """trace_method="deflated": the top eigenvalue is the one Lanczos finds alone, the trace
    agrees with Hutchinson's within their errors, and no HVP is spent twice."""
    model = float64_gpt2().eval()
    batch = token_batch(3)
    options = {"measures": ("trace", "spectral"), "trace_num_matvecs": 16}
    separate = sm.SharpnessMeter(model, batch, trace_method="hutchinson", **options).measure(1)
    meter = sm.SharpnessMeter(model, batch, trace_method="deflated", **options)
    spent = []
    real_matmul = sm.HessianOperator.__matmul__

    def counting(operator, vector):
        spent.append(1)
        return real_matmul(operator, vector)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sm.HessianOperator, "__matmul__", counting)
        shared = meter.measure(1)
    assert shared["status"] == "ok" and separate["status"] == "ok"
    assert shared["lambda_max"] == pytest.approx(separate["lambda_max"], rel=1e-6)
    spread = math.hypot(shared["hessian_trace_stderr"], separate["hessian_trace_stderr"])
    assert abs(shared["hessian_trace"] - separate["hessian_trace"]) < 4 * spread
    assert shared["hessian_trace_num_matvecs"] == 16
    assert len(spent) == 16 + shared["lambda_max_num_matvecs"]
    # Lanczos' basis takes the top of the spectrum out of the probes' variance (19 against 33)
    assert shared["hessian_trace_stderr"] < 0.7 * separate["hessian_trace_stderr"]
    with pytest.raises(ValueError, match="trace_method"):
        sm.MeterOptions(trace_method="deflate")


@pytest.mark.parametrize(
    "measures, method", [(("trace", "spectral"), "deflated"), (("trace",), "hutchinson")]
)
def test_the_default_trace_is_deflated_beside_the_spectral_measure_and_hutchinson_alone(
    measures, method
):
    model = float64_gpt2().eval()
    batch = token_batch(3)
    default = sm.SharpnessMeter(model, batch, measures=measures).measure(1)
    chosen = sm.SharpnessMeter(model, batch, measures=measures, trace_method=method).measure(1)
    assert sm.MeterOptions().trace_method == "auto"
    assert default["status"] == "ok"
    for column in ("hessian_trace", "hessian_trace_stderr", "hessian_trace_num_matvecs"):
        assert default[column] == chosen[column], column


def test_a_model_with_lazy_parameters_not_yet_initialized_is_refused():
    model = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    batch = (torch.randn(8, 3), torch.randn(8, 1))

    def loss_fn(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"lazy parameters not yet initialized \(0.weight"):
        sm.SharpnessMeter(model, batch, loss_fn=loss_fn)
    assert torch.nn.parameter.is_lazy(model[0].weight) and torch.equal(torch.get_rng_state(), state)
    model(batch[0])  # one forward: the meter takes it now
    sm.SharpnessMeter(model, batch, loss_fn=loss_fn)


def test_a_dataloader_s_list_batch_is_refused_rather_than_read_as_two_batches():
    """A DataLoader over a TensorDataset gives [inputs, targets]; read as a list of two
    batches, the loss scored the inputs' rows against each other."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 4)), batch_size=8
    )
    batch = next(iter(loader))
    assert isinstance(batch, list)

    def loss_fn(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    with pytest.raises(ValueError, match=r"list of 2 tensors.*pass tuple\(batch\)"):
        sm.SharpnessMeter(model, batch, loss_fn=loss_fn)
    row = sm.SharpnessMeter(model, tuple(batch), loss_fn=loss_fn, measures=("trace",)).measure(0)
    assert row["loss"] == pytest.approx(float(loss_fn(model, batch)))


class _CrossingTop(nn.Module):
    """0.5 t'At + (u2't)^4 / 12: the Hessian A + (u2't)^2 u2 u2' has top eigenvalue 5 along u1
    until the position along u2 passes sqrt(5), then (u2't)^2 along u2."""

    def __init__(self, n: int = 30) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
        self.u1, self.u2 = q[:, 0], q[:, 1]
        spectrum = torch.tensor([5.0, 0.0, *torch.linspace(0, 4, n - 2).tolist()])
        self.a = q @ torch.diag(spectrum.double()) @ q.T
        self.theta = nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        t = self.theta
        return 0.5 * t @ (self.a @ t) + (self.u2 @ t) ** 4 / 12 - 0.1 * t.sum()

    def top_eigenvalue(self) -> float:
        t = self.theta.detach()
        return max(5.0, float(self.u2 @ t) ** 2)


@pytest.mark.parametrize("measures", [("spectral",), ("trace", "spectral")])
def test_lambda_max_follows_a_new_direction_that_grows_past_the_old_top(measures):
    """Started from the last top eigenvector, Lanczos stopped on it after one product once the
    u2 direction had grown sharper: 4.99999 against 9.0, converged, ok."""
    model = _CrossingTop()
    meter = sm.SharpnessMeter(model, torch.zeros(1), loss_fn=lambda m, b: m(b), measures=measures)
    for step, position in enumerate([0.0, 1.0, 2.0, 3.0]):
        with torch.no_grad():
            model.theta.copy_(position * model.u2)
        row = meter.measure(step)
        assert row["spectral_status"] == "ok"
        assert row["lambda_max"] == pytest.approx(model.top_eigenvalue(), rel=1e-3)


def test_a_compiled_model_in_train_mode_measures_under_its_own_dropout_masks():
    """Every forward of a compiled model runs compiled: the one eager forward that watches the
    modules' output dtypes is thrown away. It used to be the line search's base loss, under
    eager dropout masks that the compiled steps do not draw, and every row was unresolved."""
    torch.manual_seed(0)
    model = torch.compile(
        nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.1), nn.Tanh(), nn.Linear(16, 3))
    )
    generator = torch.Generator().manual_seed(1)
    probe = (torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator))

    def loss_fn(m: nn.Module, batch: tuple) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    meter = sm.SharpnessMeter(
        model, probe, loss_fn=loss_fn, dropout="train", measures=("critical",), seed=5
    )
    loss_fn(model, probe).backward()
    row = meter.measure(0, optimizer=optimizer)
    assert row["critical_status"] == "ok"

    params = list(model.parameters())
    compiled_loss = ProbeLoss(model, loss_fn, probe, seed=5)
    direction = torch.autograd.grad(compiled_loss(), params)  # SGD's, on the probe
    theta = [p.detach().clone() for p in params]

    def loss_at(eta: float) -> float:
        with torch.no_grad():
            for p, t, d in zip(params, theta, direction, strict=True):
                p.copy_(t - eta * d)
            value = float(compiled_loss())
            for p, t in zip(params, theta, strict=True):
                p.copy_(t)
        return value

    base = loss_at(0.0)
    assert loss_at(row["critical_eta_lo"]) <= base < loss_at(row["critical_eta_hi"])
