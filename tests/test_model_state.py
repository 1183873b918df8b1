"""The model's state beside its parameters, under measurement: the parameters' gradient hooks
stay out of the Hessian, every measuring forward starts from the state the measurement found
(buffers, attributes, the model's own generators), and on exit everything a forward wrote is put
back, hooks that removed themselves included."""

from __future__ import annotations

import contextlib
import copy
import random

import numpy as np
import pytest
import torch
from conftest import dense_hessian, squared_error
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import sharpmeter as sm
from sharpmeter.measure.loss import ProbeLoss
from sharpmeter.measure.params import copy_into


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def regression_batch(n: int = 8, inputs: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, inputs, generator=generator, dtype=torch.float64)
    return x, torch.randn(n, 1, generator=generator, dtype=torch.float64)


GRADIENT_HOOKS = {
    "scale": lambda grad: grad * 0.5,
    "clamp": lambda grad: grad.clamp(-1e-3, 1e-3),
}


@pytest.mark.parametrize("inside", [True, False], ids=["measurement", "bare"])
@pytest.mark.parametrize("hook", GRADIENT_HOOKS.values(), ids=GRADIENT_HOOKS.keys())
def test_gradient_hooks_stay_out_of_the_hessian_and_come_back(hook, inside):
    model, batch = small_mlp(), regression_batch()
    params = list(model.parameters())
    exact = dense_hessian(model, squared_error, batch)
    handles = [p.register_hook(hook) for p in params]
    with sm.measurement(model) if inside else contextlib.nullcontext():
        op = sm.HessianOperator(model, squared_error, batch)
        columns = op @ torch.eye(op.dim, dtype=torch.float64)
    torch.testing.assert_close(columns, exact)
    hooked = torch.autograd.grad(squared_error(model, batch), params)  # training's, hooked
    for handle in handles:
        handle.remove()
    plain = torch.autograd.grad(squared_error(model, batch), params)
    assert all(torch.equal(h, hook(g)) for h, g in zip(hooked, plain, strict=True))


@pytest.mark.parametrize("inside", [True, False], ids=["measurement", "bare"])
def test_the_descent_check_takes_the_gradient_of_the_loss_not_of_the_hooks(inside):
    model, batch = small_mlp(), regression_batch()
    gradient = sm.HessianOperator(model, squared_error, batch).gradient
    for p in model.parameters():
        p.register_hook(torch.neg)  # a hook that turns descent into ascent
    with sm.measurement(model) if inside else contextlib.nullcontext():
        result = sm.critical_sharpness(model, squared_error, batch, gradient, eta0=0.1)
    assert result.status == "ok" and result.slope > 0


class CarriedState(nn.Module):
    """Carries a state from batch to batch (truncated BPTT): in an attribute it reassigns, a
    running sum in a plain tensor it updates in place, and a list it appends to."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1, dtype=torch.float64)
        self.hidden = torch.zeros(3, dtype=torch.float64)
        self.total = torch.zeros(3, dtype=torch.float64)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x + self.hidden + self.total)
        self.hidden = x.detach().mean(0)
        self.total.add_(x.detach().sum(0))
        self.seen.append(len(x))
        return out


def carried_state_model() -> CarriedState:
    torch.manual_seed(0)
    model = CarriedState()
    model(regression_batch(4)[0])  # a training forward has carried a state
    return model


def spectral_norm_model() -> nn.Module:
    torch.manual_seed(0)
    layer = parametrizations.spectral_norm(nn.Linear(3, 4))
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 1)).double()


@pytest.mark.parametrize("build", [carried_state_model, spectral_norm_model])
def test_every_measuring_forward_starts_from_the_state_the_measurement_found(build):
    """A stateful forward (spectral_norm's power iteration writes its buffers in train mode)
    evaluates one function over the whole measurement: the one of the entry state."""
    model, batch = build().train(), regression_batch()
    with sm.measurement(model, dropout="train"):
        probe = ProbeLoss(model, squared_error, batch)
        losses = [float(probe().detach()) for _ in range(3)]
    assert losses == [float(squared_error(model, batch).detach())] * 3


def test_what_a_forward_writes_in_attributes_is_put_back():
    model = carried_state_model()
    hidden, total, seen = model.hidden, model.total.clone(), list(model.seen)
    meter = sm.SharpnessMeter(model, regression_batch(), loss_fn=squared_error, measures=("trace",))
    row = meter.measure(0)
    assert row["status"] == "ok", row["error"]
    assert model.hidden is hidden and torch.equal(model.total, total) and model.seen == seen


class HeldTuple(nn.Module):
    """Keeps its last output as a tuple attribute (an LSTM's carried ``(h, c)``) and running
    means in a NumPy array it updates in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1, dtype=torch.float64)
        self.last = None
        self.means = np.zeros(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x - torch.as_tensor(self.means))
        self.means += x.detach().mean(0).numpy()
        self.last = (out.detach(), x.detach())
        return out


def test_a_tuple_attribute_and_an_array_updated_in_place_are_put_back():
    model = HeldTuple()
    model(regression_batch()[0])
    last, means = model.last, model.means.copy()
    meter = sm.SharpnessMeter(model, regression_batch(), loss_fn=squared_error, measures=("trace",))
    meter.measure(0)
    assert model.last is last and np.array_equal(model.means, means)


class ViewsItsWeight(nn.Module):
    """Holds a plain view of its own weight, which moves with it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1, dtype=torch.float64)
        self.weight_view = self.lin.weight.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_view.T + self.lin.bias


def test_an_attribute_viewing_a_parameter_moves_with_it_under_measurement():
    """Not put back before each forward, or the steps of the line search would be undone."""
    torch.manual_seed(0)
    model, batch = ViewsItsWeight(), regression_batch()
    params = list(model.parameters())
    theta, versions = [p.detach().clone() for p in params], [p._version for p in params]
    stepped = [t + 1 for t in theta]
    with sm.measurement(model):
        probe = ProbeLoss(model, squared_error, batch)
        copy_into(params, stepped)  # as the line search steps
        measured = float(probe().detach())
        copy_into(params, theta, versions)
    copy_into(params, stepped)
    assert measured == float(squared_error(model, batch).detach())


GENERATORS = {
    "torch": lambda: torch.Generator().manual_seed(3),
    "random": lambda: random.Random(3),
    "numpy": lambda: np.random.default_rng(3),
    "numpy_legacy": lambda: np.random.RandomState(3),
}


def uniform(generator, n: int) -> torch.Tensor:
    """``n`` uniform draws from any of :data:`GENERATORS`."""
    if isinstance(generator, torch.Generator):
        return torch.rand(n, generator=generator, dtype=torch.float64)
    if isinstance(generator, random.Random):
        return torch.tensor([generator.random() for _ in range(n)], dtype=torch.float64)
    return torch.as_tensor(generator.random(n))


class OwnMasks(nn.Module):
    """Drops units with masks drawn from a generator of its own (drop-path style)."""

    def __init__(self, generator) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(3, 8, dtype=torch.float64), nn.Linear(8, 1).double()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (uniform(self.generator, 8) > 0.3).double()
        return self.out(torch.tanh(self.lin(x)) * keep)


@pytest.mark.parametrize("make", GENERATORS.values(), ids=GENERATORS.keys())
def test_a_model_s_own_generator_draws_the_same_masks_and_is_put_back(make):
    torch.manual_seed(0)
    model, batch = OwnMasks(make()).train(), regression_batch()
    twin = make()
    with sm.measurement(model, dropout="train"):
        probe = ProbeLoss(model, squared_error, batch)
        losses = {float(probe().detach()) for _ in range(3)}
    assert len(losses) == 1
    assert torch.equal(uniform(model.generator, 4), uniform(twin, 4))


class OneShotInit(nn.Module):
    """An ActNorm-style data-dependent initialisation, by a pre-hook that removes itself."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1, dtype=torch.float64)
        self.handle = self.register_forward_pre_hook(OneShotInit.initialise)

    @staticmethod
    def initialise(module: OneShotInit, inputs: tuple[torch.Tensor]) -> None:
        with torch.no_grad():
            module.lin.bias.copy_(-inputs[0].mean())
        module.handle.remove()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_a_hook_that_removes_itself_is_put_back():
    model = OneShotInit()
    hooks = model._forward_pre_hooks
    with pytest.raises(sm.ParametersWrittenError), sm.measurement(model), torch.no_grad():
        squared_error(model, regression_batch())
    assert model._forward_pre_hooks is hooks and list(hooks.values()) == [OneShotInit.initialise]
    model.handle.remove()  # its handle still removes it
    assert not hooks


class RunningGain(nn.Module):
    """Updates a gain kept in a plain tensor in place, then multiplies its output by it (so the
    graph saves the gain)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1, dtype=torch.float64)
        self.gain = torch.ones(1, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.gain.mul_(0.5).add_(x.abs().mean())
        return self.lin(x).tanh() * self.gain


def test_a_tensor_written_in_place_stays_with_the_graph_that_saved_it():
    """Two probe batches, each from the state the measurement found: the first batch's graph
    keeps the gain its forward wrote. Written back in place before the second forward, with its
    version counter, the gain was overwritten under that graph without autograd noticing: the
    trace came out 67% high."""
    model = RunningGain()
    first, second = regression_batch(4), regression_batch(4)
    batches = [first, (second[0] * 5, second[1])]
    exact = sum(0.5 * dense_hessian(copy.deepcopy(model), squared_error, b) for b in batches)
    with sm.measurement(model):
        op = sm.HessianOperator(model, squared_error, batches)
        columns = op @ torch.eye(op.dim, dtype=torch.float64)
    torch.testing.assert_close(columns, exact)
    assert torch.equal(model.gain, torch.ones(1, dtype=torch.float64))


def test_a_measurement_inside_parametrize_cached_computes_its_weights_afresh():
    """The cache holds the weight of the parameters as they were: the line search moves them,
    and the first backward frees its graph (every measure was an error inside ``cached()``).
    The caller's cache is back afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.orthogonal(nn.Linear(3, 3)), nn.Tanh(), nn.Linear(3, 1))
    model = model.double()
    batch = regression_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    squared_error(model, batch).backward()

    def measured() -> dict:
        meter = sm.SharpnessMeter(model, batch, squared_error, measures=("critical", "spectral"))
        return meter.measure(0, optimizer=optimizer)

    outside = measured()
    with parametrize.cached():
        weight = model[0].weight
        inside = measured()
        assert model[0].weight is weight
    assert inside["status"] == outside["status"] == "ok"
    assert inside["lambda_max"] == outside["lambda_max"]
    assert inside["critical_sharpness"] == outside["critical_sharpness"]
