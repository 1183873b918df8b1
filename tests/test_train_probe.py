"""probe="train": each row on its step's training batch, along the step's own update, reusing
the step's gradient (Kalra et al.'s definition), checked against a brute-force line search."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_same, causal_lm_loss, float64_gpt2, snapshot, token_batch
from test_hf import make_trainer, read_rows, training_record
from transformers import TrainerCallback

import sharpmeter as sm
from sharpmeter.integrations.hf import SharpnessCallback
from sharpmeter.measure.loss import ProbeLoss
from sharpmeter.measure.params import unflatten

MICRO_BATCHES = [token_batch(batch_size=2, seed=11), token_batch(batch_size=3, seed=12)]


def accumulated_step(model, optimizer, batches, max_grad_norm=None):
    """The gradient of a step over ``batches`` (loss-token weighted, as one batch), clipped;
    the state just before ``optimizer.step()``."""
    optimizer.zero_grad()
    probe = ProbeLoss(model, causal_lm_loss, batches, seed=None)
    probe().backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)


def trained_model():
    """A model with an AdamW state of a few steps, at the backward of the next one."""
    model = float64_gpt2().eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for seed in range(3):
        accumulated_step(model, optimizer, [token_batch(batch_size=4, seed=seed)])
        optimizer.step()
    accumulated_step(model, optimizer, MICRO_BATCHES, max_grad_norm=0.5)
    return model, optimizer


def train_meter(model, **changes):
    """A meter on training batches, with the exact float64 loss."""
    changes.setdefault("measures", ("critical",))
    return sm.SharpnessMeter(model, None, causal_lm_loss, probe="train", **changes)


def first_rise(model, batches, direction, eta_from, eta_to, ratio=1.0005):
    """The smallest step on a geometric grid from ``eta_from`` where the loss rises above
    L(theta): brute force, one forward per grid point."""
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    steps = unflatten(direction, params)
    probe = ProbeLoss(model, causal_lm_loss, batches, seed=0)
    with torch.no_grad():
        base = float(probe())
        eta = eta_from
        try:
            while eta <= eta_to:
                for p, p0, d in zip(params, start, steps, strict=True):
                    p.copy_(p0 - eta * d)
                if float(probe()) > base:
                    return eta
                eta *= ratio
        finally:
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
    return math.nan


def test_critical_sharpness_on_the_step_batch_is_the_first_rise_along_the_step_update():
    model, optimizer = trained_model()
    meter = train_meter(
        model,
        measures=("critical",),
        critical_precision_bits=12,
    )
    before = snapshot(model, optimizer)
    row = meter.measure(3, optimizer, batch=MICRO_BATCHES)
    assert_same(before, snapshot(model, optimizer))  # .grad included: it was only read
    assert row["probe"] == "train" and row["critical_status"] == "ok", row
    # The step's own update: what AdamW subtracts from the clipped .grad, per unit lr.
    direction = sm.update_direction(optimizer).vector
    lo, hi = row["critical_eta_lo"], row["critical_eta_hi"]
    crossing = first_rise(model, MICRO_BATCHES, direction, lo / 64, hi * 2)
    assert lo < crossing <= hi * 1.0005
    assert row["critical_sharpness"] == pytest.approx(2 / crossing, rel=2e-3)
    probe = ProbeLoss(model, causal_lm_loss, MICRO_BATCHES, seed=0)
    with torch.no_grad():
        assert row["loss"] == float(probe())  # both micro-batches, token weighted
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert row["grad_norm"] == pytest.approx(float(grads.norm()), rel=1e-12)
    assert row["grad_norm"] <= 0.5 * (1 + 1e-9)  # the clipped gradient the step uses


def backward_count(monkeypatch, action) -> int:
    """How many backward passes ``action`` runs: its calls of ``torch.autograd.grad`` (a hook on
    a parameter would not tell, since a measurement suspends the parameters' gradient hooks)."""
    calls = []
    grad = torch.autograd.grad
    with monkeypatch.context() as patch:
        patch.setattr(
            torch.autograd, "grad", lambda *args, **kw: calls.append(1) or grad(*args, **kw)
        )
        action()
    return len(calls)


def test_the_training_batch_mode_spends_no_backward_on_critical_sharpness(monkeypatch):
    model, optimizer = trained_model()
    # The plain search: its steps depend on the losses alone, not on the gradient's slope.
    train = train_meter(model, critical_predictions=0)
    fixed = sm.SharpnessMeter(
        model, MICRO_BATCHES, causal_lm_loss, measures=("critical",), critical_predictions=0
    )
    assert (
        backward_count(monkeypatch, lambda: train.measure(1, optimizer, batch=MICRO_BATCHES)) == 0
    )
    assert backward_count(monkeypatch, lambda: fixed.measure(1, optimizer)) == 1
    # On the same batch and with the same gradient the two modes agree: the fixed probe's own
    # gradient is the step's when the probe is the step's batch (no clipping here).
    accumulated_step(model, optimizer, MICRO_BATCHES)
    by_train = train.measure(2, optimizer, batch=MICRO_BATCHES)
    by_fixed = fixed.measure(2, optimizer)
    for column in ("critical_eta_lo", "critical_eta_hi", "loss"):
        assert by_train[column] == pytest.approx(by_fixed[column], rel=1e-9), column
    assert (by_train["probe"], by_fixed["probe"]) == ("train", "fixed")
    # With predicted steps (the default) the steps taken depend on the slope, which the two
    # modes compute apart; both brackets hold the one first crossing, so they overlap.
    predicted = [
        train_meter(model).measure(3, optimizer, batch=MICRO_BATCHES),
        sm.SharpnessMeter(model, MICRO_BATCHES, causal_lm_loss, measures=("critical",)).measure(
            3, optimizer
        ),
    ]
    assert all(row["critical_status"] == "ok" for row in predicted)
    lo = max(row["critical_eta_lo"] for row in predicted)
    assert lo < min(row["critical_eta_hi"] for row in predicted)


def test_hvp_measures_run_on_the_step_batch_too():
    model, optimizer = trained_model()
    meter = train_meter(
        model,
        measures=("critical", "spectral"),
        lanczos_max_iter=60,
        lanczos_tol=1e-8,
    )
    row = meter.measure(1, optimizer, batch=MICRO_BATCHES)
    operator = sm.HessianOperator(model, causal_lm_loss, MICRO_BATCHES)
    exact = sm.lanczos(operator, k=1, max_iter=80, tol=1e-10).value
    assert row["status"] == "ok" and row["lambda_max"] == pytest.approx(exact, rel=1e-6)


def real_step_direction(model, optimizer) -> torch.Tensor:
    """What ``optimizer.step()`` subtracts per unit lr, by stepping a deep copy of both."""
    twin_model, twin_optimizer = copy.deepcopy((model, optimizer))
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    twin_optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    moved = [(p - q.detach()) / lr for p, q in zip(model.parameters(), twin_model.parameters())]
    return torch.cat([m.detach().reshape(-1) for m in moved])


def test_a_parameter_without_a_gradient_is_one_the_step_leaves_alone():
    model, optimizer = trained_model()
    unused = model.transformer.wpe.weight
    unused.grad = None  # as if it took no part in the step: AdamW skips it (zeros would not)
    meter = train_meter(
        model,
        measures=("critical",),
        critical_precision_bits=12,
    )
    row = meter.measure(1, optimizer, batch=MICRO_BATCHES)
    assert row["critical_status"] == "ok" and unused.grad is None
    real = real_step_direction(model, optimizer)
    moved = unflatten(real, list(model.parameters()))
    position = [id(p) for p in model.parameters()].index(id(unused))
    assert torch.count_nonzero(moved[position]) == 0 and torch.count_nonzero(real) > 0
    lo, hi = row["critical_eta_lo"], row["critical_eta_hi"]
    assert lo < first_rise(model, MICRO_BATCHES, real, lo / 64, hi * 2) <= hi * 1.0005


def test_arguments_that_do_not_match_the_probe_option_are_refused():
    model, optimizer = trained_model()
    with pytest.raises(ValueError, match="give no probe_batch"):
        sm.SharpnessMeter(model, MICRO_BATCHES, causal_lm_loss, probe="train")
    with pytest.raises(ValueError, match="probe must be one of"):
        sm.SharpnessMeter(model, None, causal_lm_loss, probe="training")
    train = train_meter(model)
    with pytest.raises(ValueError, match="pass measure\\(step, optimizer, batch"):
        train.measure(1, optimizer)
    with pytest.raises(ValueError, match="gradients for"):
        train.measure(1, optimizer, batch=MICRO_BATCHES, gradients=[None])
    fixed = sm.SharpnessMeter(model, MICRO_BATCHES, causal_lm_loss, measures=("critical",))
    with pytest.raises(ValueError, match="are for probe='train'"):
        fixed.measure(1, optimizer, batch=MICRO_BATCHES)


class StepWitness(TrainerCallback):
    """What a training-batch row must be measured on, recorded independently of the meter: at
    each optimizer step, the parameters, the step's micro-batches and its clipped gradient."""

    def __init__(self, model) -> None:
        self.batches: list[dict] = []
        self.at_step: dict[int, tuple] = {}
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.batches.append({k: kwargs[k].clone() for k in ("input_ids", "labels")})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = [p.detach().clone() for p in model.parameters()]
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        self.at_step[state.global_step] = (params, self.batches, grads)
        self.batches = []


def test_the_trainer_callback_measures_each_step_on_its_micro_batches(tmp_path):
    """Gradient accumulation over 3 micro-batches, clipping, dropout on: each row is the loss
    of that step's 3 micro-batches at that step's parameters, with its clipped gradient, and
    training is bit-identical to a run without the callback."""
    options = {"max_steps": 5, "logging_steps": 1, "gradient_accumulation_steps": 3}
    options.update(max_grad_norm=0.5, weight_decay=0.01)
    reference = make_trainer(tmp_path / "a", **options)
    reference.train()
    measured = make_trainer(tmp_path / "b", **options)
    witness = StepWitness(measured.model)
    measured.add_callback(witness)
    SharpnessCallback.attach(
        measured,
        probe="train",
        schedule=sm.Schedule(every=1),
        measures=("critical", "spectral"),
        lanczos_max_iter=40,
    )
    measured.train()
    rows = read_rows(tmp_path / "b" / "out" / "sharpness.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["probe"] == "train" and r["critical_status"] == "ok" for r in rows), rows
    model = copy.deepcopy(measured.model).eval()
    for row in rows:
        params, batches, grads = witness.at_step[row["step"]]
        assert len(batches) == 3
        with torch.no_grad():
            for p, value in zip(model.parameters(), params, strict=True):
                p.copy_(value)
            loss = float(ProbeLoss(model, None, batches, seed=0)())
        assert row["loss"] == pytest.approx(loss, rel=1e-6)
        assert row["grad_norm"] == pytest.approx(float(grads.norm()), rel=1e-6)
        assert row["grad_norm"] <= 0.5 * (1 + 1e-5)
    params, losses = training_record(measured)
    reference_params, reference_losses = training_record(reference)
    assert len(losses) == 5 and losses == reference_losses
    assert all(torch.equal(a, b) for a, b in zip(params, reference_params, strict=True))


def test_the_trainer_callback_refuses_a_probe_batch_with_probe_train():
    with pytest.raises(ValueError, match="give no probe_batch"):
        SharpnessCallback(MICRO_BATCHES[0], probe="train")


@pytest.mark.parametrize("unscaled_through", [None, "optimizer", "wrapper"])
def test_gradients_an_fp16_loss_scaler_still_scales_are_measured_unscaled(unscaled_through):
    """Under fp16 the Trainer's optimizer is accelerate's wrapper with a loss scaler: ``.grad``
    holds the gradient times the scale (2**16) until the scaler unscales it, for clipping or in
    step(). The row is the one of the unscaled gradient, unscaled once. Before, a run without
    clipping measured along 2**16 times the step, with 2**16 times its gradient norm."""
    from accelerate.optimizer import AcceleratedOptimizer

    model, optimizer = trained_model()
    expected = train_meter(model).measure(3, optimizer, batch=MICRO_BATCHES)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    # As Accelerator.prepare makes it under fp16 (whose state a CPU cannot set up).
    wrapped = object.__new__(AcceleratedOptimizer)
    wrapped.optimizer, wrapped.scaler = optimizer, scaler
    for p in model.parameters():
        p.grad = scaler.scale(p.grad)  # what scaler.scale(loss).backward() leaves
    if unscaled_through is not None:  # for clipping, by accelerate or by hand
        scaler.unscale_(optimizer if unscaled_through == "optimizer" else wrapped)
    row = train_meter(model).measure(3, wrapped, batch=MICRO_BATCHES)
    assert row["critical_status"] == "ok"
    for column in ("grad_norm", "critical_sharpness", "critical_eta_lo", "critical_eta_hi"):
        assert row[column] == pytest.approx(expected[column], rel=1e-12), column


@pytest.mark.parametrize("unscaled", [False, True])
def test_a_plain_loop_s_grad_scaler_given_to_measure_is_seen_through(unscaled):
    """A plain torch.amp loop: the optimizer does not know its GradScaler, so the loop passes
    it; the row is the one of the unscaled gradient, whether or not unscale_ came first."""
    model, optimizer = trained_model()
    expected = train_meter(model).measure(3, optimizer, batch=MICRO_BATCHES)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for p in model.parameters():
        p.grad = scaler.scale(p.grad)
    if unscaled:
        scaler.unscale_(optimizer)
    row = train_meter(model).measure(3, optimizer, batch=MICRO_BATCHES, scaler=scaler)
    assert row["critical_status"] == "ok"
    for column in ("grad_norm", "critical_sharpness", "critical_eta_lo", "critical_eta_hi"):
        assert row[column] == pytest.approx(expected[column], rel=1e-12), column


def test_directional_sharpness_is_the_probe_losss_own_curvature_over_its_slope():
    """d'Hd / d'g with H and g of the same loss: the step's gradient is clipped (to norm 0.5),
    so its slope is not the loss's, and the ratio was 1/c too large."""
    model, optimizer = trained_model()
    row = train_meter(model, measures=("directional",)).measure(3, optimizer, batch=MICRO_BATCHES)
    direction = sm.update_direction(optimizer).vector
    reference = sm.HessianOperator(model, causal_lm_loss, MICRO_BATCHES)
    expected = float(direction @ (reference @ direction)) / float(direction @ reference.gradient)
    assert row["directional_sharpness"] == pytest.approx(expected, rel=1e-9)
    clipped = float(direction @ (reference @ direction)) / float(direction @ row_gradient(model))
    assert clipped > 1.1 * expected  # the clipping this test must see through


def row_gradient(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])
