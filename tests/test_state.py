"""Measuring never changes training: every estimator leaves the model, its optimizer and the RNG
bit-identical (a GPT-2 with dropout on, mid-training, with gradients and Adam state)."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from conftest import assert_same, causal_lm_loss, float64_gpt2, snapshot, token_batch

import sharpmeter as sm
from sharpmeter.measure.estimators import trace_and_top
from sharpmeter.measure.loss import ProbeLoss


def start_training() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A GPT-2 with dropout in train mode after two Adam steps, gradients of a third pending."""
    torch.manual_seed(0)
    model = float64_gpt2(dropout=0.1).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for seed in range(3):
        optimizer.zero_grad()
        causal_lm_loss(model, token_batch(seed=seed)).backward()
        if seed < 2:
            optimizer.step()
    return model, optimizer


@pytest.fixture
def training():
    return *start_training(), token_batch(seed=10)


def run_every_estimator(model, optimizer, batch) -> None:
    for mode in ("double_backward", "fwd", "fd"):
        op = sm.HessianOperator(model, causal_lm_loss, batch, mode=mode)
        op @ torch.ones(op.dim, dtype=torch.float64)
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    sm.power_iteration(op, max_iter=5)
    sm.lanczos(op, k=2, max_iter=6)
    sm.hutchinson(op, num_matvecs=3)
    sm.hutchpp(op, num_matvecs=6)
    trace_and_top(op, lanczos_max_iter=5, num_matvecs=3)
    trace_and_top(op, lanczos_max_iter=5, num_matvecs=3, rel_stderr=0.5, max_matvecs=12)
    sm.directional_sharpness(op, op.gradient)
    preconditioner = sm.adam_preconditioner(optimizer, list(model.parameters()))
    sm.lanczos(sm.PreconditionedOperator(op, preconditioner), max_iter=5)
    sm.critical_sharpness(model, causal_lm_loss, batch, op.gradient, eta0=0.1)
    sm.critical_sharpness(
        model, None, [batch, token_batch(seed=11)], op.gradient, check_descent=False
    )


@pytest.mark.parametrize("dropout", ["eval", "train"])
def test_every_estimator_inside_the_measurement_context(training, dropout):
    model, optimizer, batch = training
    before = snapshot(model, optimizer)
    with sm.measurement(model, dropout=dropout):
        if dropout == "eval":
            assert not any(m.training for m in model.modules())
        run_every_estimator(model, optimizer, batch)
    assert_same(before, snapshot(model, optimizer))


def test_every_estimator_on_its_own(training):
    """Even without the context the operators fork the RNG and leave mode and grads alone."""
    model, optimizer, batch = training
    before = snapshot(model, optimizer)
    run_every_estimator(model, optimizer, batch)
    assert_same(before, snapshot(model, optimizer))


def test_training_after_a_measurement_is_bit_identical(training):
    model, optimizer, batch = training
    twin, twin_optimizer = start_training()

    def continue_training(model, optimizer):
        optimizer.step()
        optimizer.zero_grad()
        causal_lm_loss(model, token_batch(seed=20)).backward()  # dropout draws from the RNG
        optimizer.step()

    torch.manual_seed(123)
    with sm.measurement(model):
        run_every_estimator(model, optimizer, batch)
    continue_training(model, optimizer)
    torch.manual_seed(123)
    continue_training(twin, twin_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_batchnorm_statistics_and_mode_restored():
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Dropout(0.5), torch.nn.Linear(6, 1)
    ).train()
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    buffers = [b.clone() for b in model.buffers()]

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    with sm.measurement(model, dropout="train"):
        op = sm.HessianOperator(model, loss_fn, (x, y))
        sm.lanczos(op, max_iter=5)
        sm.critical_sharpness(model, loss_fn, (x, y), op.gradient, eta0=0.1)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(m.training for m in model.modules())


class EvalCache(torch.nn.Module):
    """Keeps a fused weight as a buffer in eval mode, dropped by every training forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(5, 8), torch.nn.Linear(8, 3)
        self.drop = torch.nn.Dropout(0.5)
        self.register_buffer("fused", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.fused = None
            return self.b(self.drop(self.a(x)))
        if self.fused is None:
            self.fused = self.b.weight.detach() @ self.a.weight.detach()
        return x @ self.fused.T + self.b(self.a.bias)


def mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


@pytest.mark.parametrize("dropout", ["eval", "train"])
def test_a_buffer_a_forward_creates_or_drops_is_put_back_with_the_mode(dropout):
    """In eval mode the measuring forward fills the empty cache; in train mode it drops the
    one a validation pass filled. Either way the module gets back the buffer it held."""
    torch.manual_seed(0)
    model, batch = EvalCache().train(), (torch.randn(8, 5), torch.randn(8, 3))
    meter = sm.SharpnessMeter(
        model, batch, loss_fn=mse, measures=("critical", "trace"), dropout=dropout
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mse(model, batch).backward()  # a training forward: the cache is dropped
    if dropout == "train":
        with torch.no_grad():
            model.eval()(batch[0])  # a validation pass fills it
        model.train()
    cache = model.fused
    assert (cache is None) == (dropout == "eval")
    row = meter.measure(0, optimizer=optimizer)
    assert row["status"] == "ok", row["error"]
    assert model.fused is cache and all(m.training for m in model.modules())


@pytest.mark.parametrize("measures", [("critical",), ("trace",)])
def test_a_row_between_the_training_forward_and_its_backward_leaves_the_backward_working(
    measures,
):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    )
    model[1].train()  # running statistics written by every measuring forward
    batch = (torch.randn(16, 5), torch.randn(16, 3))
    twin = copy.deepcopy(model)
    meter = sm.SharpnessMeter(model, batch, loss_fn=mse, measures=measures, dropout="train")
    loss = mse(model, batch)  # the training forward, its backward still to come
    row = meter.measure(0, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    loss.backward()  # raised "modified by an inplace operation" before
    mse(twin, batch).backward()
    assert row["status"] == "ok", row["error"]
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), twin.buffers()))


def test_unknown_dropout_policy():
    with pytest.raises(ValueError, match="dropout"):
        with sm.measurement(torch.nn.Linear(2, 2), dropout="sometimes"):
            pass


class PythonLayerDrop(torch.nn.Module):
    """Skips each block when Python's ``random`` says so (and NumPy scales the rest)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(6))

    def forward(self, x):
        for block in self.blocks:
            if not self.training or random.random() > 0.5:
                x = x + torch.tanh(block(x)) * float(np.random.uniform(0.5, 1.5))
        return x


def test_a_forward_drawing_from_python_and_numpy_sees_the_same_draws_in_every_evaluation():
    model, batch = PythonLayerDrop().train(), (torch.randn(8, 4), torch.randn(8, 4))
    states = random.getstate(), np.random.get_state()[1].copy()
    with sm.measurement(model, dropout="train"):
        probe = ProbeLoss(model, mse, batch, seed=0)
        losses = {float(probe()) for _ in range(5)}
    assert len(losses) == 1  # five evaluations of one network, not five networks
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()


class FirstBufferInEval(torch.nn.Module):
    """Registers its first buffer in its first eval-mode forward (an input-mean cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if not self.training:
            if "cache" not in self._buffers:
                self.register_buffer("cache", x.mean(0).detach())
            x = x - self.cache
        return self.lin(x)


class CachedLength(torch.nn.Module):
    """Keeps the longest input seen as a plain attribute, and a table recomputed from it (as a
    dynamic rotary embedding keeps ``max_seq_len_cached``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.longest = 0

    def forward(self, x):
        if x.shape[0] > self.longest or (self.longest > 16 and x.shape[0] <= 16):
            self.longest = x.shape[0]  # resets to the short length, as dynamic RoPE does
        return self.lin(x) * (1 + self.longest / 100)


@pytest.mark.parametrize("build", [FirstBufferInEval, CachedLength])
def test_what_a_measuring_forward_sets_on_a_module_is_put_back(build):
    torch.manual_seed(0)
    model, batch = build().train(), (torch.randn(8, 4), torch.randn(8, 4))
    mse(model, (torch.randn(24, 4), torch.randn(24, 4))).backward()  # a long training batch
    before = dict(vars(model)), dict(model._buffers)
    meter = sm.SharpnessMeter(model, batch, loss_fn=mse, measures=("critical", "trace"))
    row = meter.measure(0, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert row["status"] == "ok", row["error"]
    assert (dict(vars(model)), dict(model._buffers)) == before
