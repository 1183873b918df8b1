"""Measuring never changes training: every estimator leaves the model, its optimizer and the RNG
bit-identical (a GPT-2 with dropout on, mid-training, with gradients and Adam state)."""

from __future__ import annotations

import copy
import math
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


class _RescalesInEval(torch.nn.Module):
    """RWKV's pattern: an eval-mode forward divides a weight in place (under no_grad) and
    records it in a plain flag, which a train-mode forward undoes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4, dtype=torch.float64)
        self.rescaled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rescaled == self.training:
            with torch.no_grad():
                if self.training:
                    self.linear.weight.mul_(4)
                else:
                    self.linear.weight.div_(4)
            self.rescaled = not self.training
        return self.linear(x).pow(2).mean()


def _rescaling_model() -> tuple[_RescalesInEval, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = _RescalesInEval().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4, dtype=torch.float64)
    model(x).backward()
    return model, optimizer, x


def _loss(model, batch):
    return model(batch)


def test_a_model_that_writes_its_parameters_is_put_back_and_its_rows_are_errors():
    """The context put the flag back but not the weight, which stayed divided by 4: training
    changed, with every row ok."""
    model, optimizer, x = _rescaling_model()
    before = snapshot(model, optimizer)
    with pytest.warns(RuntimeWarning, match=r"written in place .*\(linear.weight\)"):
        meter = sm.SharpnessMeter(model, x, _loss)
    assert_same(before, snapshot(model, optimizer))
    for step in (1, 2):
        row = meter.measure(step, optimizer)
        assert row["status"] == "error" and "linear.weight" in row["error"]
        assert row["critical_status"] == row["spectral_status"] == "error"
        assert math.isnan(row["critical_sharpness"]) and math.isnan(row["lambda_max"])
        assert_same(before, snapshot(model, optimizer))
    assert meter.rewriting_modes == {False}
    train_mode = sm.SharpnessMeter(model, x, _loss, dropout="train")
    assert train_mode.measure(1, optimizer)["status"] == "ok"
    assert_same(before, snapshot(model, optimizer))
    # the same meter once the model is in eval mode (an evaluation ran): that mode is
    # checked anew, with a copy
    model.eval()
    before = snapshot(model, optimizer)
    assert train_mode.measure(2, optimizer)["status"] == "error"
    assert_same(before, snapshot(model, optimizer))


def test_a_row_on_a_model_that_writes_its_parameters_fails_and_training_is_unchanged():
    """probe='train' has no forward at construction: the first row copies the parameters."""
    model, optimizer, x = _rescaling_model()
    before = snapshot(model, optimizer)
    meter = sm.SharpnessMeter(model, None, _loss, probe="train")
    for step in (1, 2):
        row = meter.measure(step, optimizer, batch=x)
        assert row["status"] == "error" and "linear.weight" in row["error"]
        assert_same(before, snapshot(model, optimizer))


def test_a_write_of_the_same_values_keeps_the_copies_coming():
    """A zero weight divided in place stays 0 (a harmless write now, its version moved): the
    mode was taken for clean, and once training had moved the weight the next row divided it
    with no copy to put it back."""
    model, optimizer, x = _rescaling_model()
    with torch.no_grad():
        model.linear.weight.zero_()
    version = model.linear.weight._version
    meter = sm.SharpnessMeter(model, x, _loss)
    assert model.linear.weight._version == version
    assert meter.rewriting_modes == {False} and not meter.clean_modes
    optimizer.step()  # the weight is no longer 0
    before = snapshot(model, optimizer)
    row = meter.measure(1, optimizer)
    assert row["status"] == "error" and "put back" in row["error"]
    assert_same(before, snapshot(model, optimizer))


def test_without_a_copy_a_written_parameter_is_reported_not_hidden():
    model, _, x = _rescaling_model()
    with pytest.raises(sm.ParametersWrittenError, match="training has changed"):
        with sm.measurement(model):
            model(x)


def test_an_error_on_its_way_out_keeps_its_type_and_carries_the_write():
    model, _, x = _rescaling_model()
    with pytest.raises(KeyboardInterrupt) as caught:
        with sm.measurement(model, copy_parameters=True):
            model(x)
            raise KeyboardInterrupt
    assert any("linear.weight" in note for note in caught.value.__notes__)


def test_rwkv_is_put_back_in_eval_mode_and_measured_in_train_mode():
    """RWKV's eval forward divides block k's output weights by 2^(k // 6) in place: after one
    measurement blocks 6+ stayed at a quarter, the row ok (transformers' own model,
    defaults)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.RwkvConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=7,
        attention_hidden_size=16,
        intermediate_size=32,
        context_length=64,
        use_cache=False,
    )
    model = transformers.RwkvForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 8))
    batch = {"input_ids": ids, "labels": ids}
    model(**batch).loss.backward()
    before = snapshot(model, optimizer)
    with pytest.warns(RuntimeWarning, match=r"blocks\.6\.attention\.output\.weight"):
        meter = sm.SharpnessMeter(model, batch)
    assert meter.measure(1, optimizer)["status"] == "error"
    assert_same(before, snapshot(model, optimizer))
    row = sm.SharpnessMeter(model, batch, dropout="train").measure(1, optimizer)
    assert row["status"] == "ok"
    assert_same(before, snapshot(model, optimizer))
