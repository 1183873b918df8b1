"""update_direction against the real optimizer step, taken on a deep copy of model + optimizer."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import sharpmeter as sm
from sharpmeter.measure import directions
from sharpmeter.measure.directions import (
    DirectionUnavailable,
    adam_denominator,
    learning_rate,
    update_direction,
)
from sharpmeter.measure.params import ParameterVector, as_flat_vector, flatten


class Net(nn.Module):
    """Two layers and a parameter the loss never touches (its .grad stays None)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)
        self.unused = nn.Parameter(torch.randn(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def backward(model: Net, seed: int) -> None:
    """Fresh gradients of a batch drawn from its own generator (the global RNG is untouched)."""
    generator = torch.Generator().manual_seed(seed)
    dtype = model.out.weight.dtype
    x = torch.randn(8, 4, generator=generator, dtype=dtype)
    y = torch.randn(8, 3, generator=generator, dtype=dtype)
    model.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()


def train(model: Net, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """Build optimizer state with ``steps`` real steps, then leave fresh gradients."""
    for step in range(steps):
        backward(model, seed=100 + step)
        optimizer.step()
    backward(model, seed=7)


def real_step(
    model: Net, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat parameters (in the optimizer's group order) before and after a real step on a copy."""
    memo = {}
    model_copy = copy.deepcopy(model, memo)
    # The optimizer's whole __dict__ (Optimizer pickles only its state and groups), so custom
    # optimizers keep their own attributes; the memo points them at the copied parameters.
    optimizer_copy = object.__new__(type(optimizer))
    optimizer_copy.__dict__ = copy.deepcopy(optimizer.__dict__, memo)
    for p, q in zip(model.parameters(), model_copy.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()  # deepcopy drops .grad
    params = [p for group in optimizer_copy.param_groups for p in group["params"]]
    before = flatten([p.detach().clone() for p in params])
    if max_grad_norm:
        nn.utils.clip_grad_norm_(model_copy.parameters(), max_grad_norm)
    # Through the class: an LR scheduler wraps the instance's step in a closure over the real one.
    type(optimizer_copy).step(optimizer_copy)
    return before, flatten([p.detach() for p in params])


def assert_matches_step(
    model: Net, optimizer: torch.optim.Optimizer, d: ParameterVector, max_grad_norm=None
) -> None:
    before, after = real_step(model, optimizer, max_grad_norm)
    if isinstance(d, ParameterVector):  # the default direction is in the optimizer's order
        owned = [p for group in optimizer.param_groups for p in group["params"]]
        assert [id(p) for p in d.params] == [id(p) for p in owned]
        d = d.vector
    lr0 = learning_rate(optimizer)
    torch.testing.assert_close(before - lr0 * d, after, rtol=1e-13, atol=1e-15)
    # The step itself, far more demanding than theta - lr0 * d: it sees errors of 1e-10 in d.
    torch.testing.assert_close(d, (before - after) / lr0, rtol=1e-10, atol=1e-12)


def snapshot(model: Net, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "state": copy.deepcopy(optimizer.state_dict()),
        "state_keys": [id(p) for p in optimizer.state],
        "versions": [p._version for p in model.parameters()],
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(model: Net, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Bit-identical params, grads, optimizer state and RNG; no parameter written at all."""
    now = snapshot(model, optimizer)
    for a, b in zip(saved["params"] + saved["grads"], now["params"] + now["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert saved["versions"] == now["versions"]
    assert saved["state_keys"] == now["state_keys"]  # no state created for a parameter
    assert torch.equal(saved["rng"], now["rng"])
    assert identical(saved["state"], now["state"])


def identical(a, b) -> bool:
    """Exact equality of nested state: tensors bit for bit (dtype included), the rest by ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


SGD_CASES = {
    "plain": ({}, 0),
    "momentum_first_step": ({"momentum": 0.9}, 0),
    "momentum_later": ({"momentum": 0.9}, 3),
    "dampening_first_step": ({"momentum": 0.8, "dampening": 0.3}, 0),
    "dampening": ({"momentum": 0.8, "dampening": 0.3}, 3),
    "nesterov": ({"momentum": 0.9, "nesterov": True}, 3),
    "weight_decay": ({"momentum": 0.9, "weight_decay": 0.1}, 2),
    "maximize": ({"momentum": 0.5, "weight_decay": 0.05, "maximize": True}, 2),
}


@pytest.mark.parametrize("case", SGD_CASES)
def test_sgd_matches_real_step(case: str) -> None:
    kwargs, steps = SGD_CASES[case]
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, **kwargs)
    train(model, optimizer, steps)
    saved = snapshot(model, optimizer)
    d = update_direction(optimizer)
    assert_unchanged(model, optimizer, saved)
    assert_matches_step(model, optimizer, d)


ADAM_CASES = {
    "first_step": ({}, 0),
    "later": ({}, 3),
    "betas_eps": ({"betas": (0.8, 0.95), "eps": 1e-3}, 2),
    "weight_decay": ({"weight_decay": 0.1}, 2),
    "amsgrad_first_step": ({"amsgrad": True}, 0),
    "amsgrad_later": ({"amsgrad": True, "weight_decay": 0.1}, 4),
    "maximize": ({"maximize": True, "weight_decay": 0.1}, 2),
}


@pytest.mark.parametrize("optimizer_type", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("case", ADAM_CASES)
def test_adam_matches_real_step(optimizer_type: type, case: str) -> None:
    kwargs, steps = ADAM_CASES[case]
    model = make_model()
    optimizer = optimizer_type(model.parameters(), lr=0.05, **kwargs)
    train(model, optimizer, steps)
    saved = snapshot(model, optimizer)
    d = update_direction(optimizer)
    assert_unchanged(model, optimizer, saved)
    assert_matches_step(model, optimizer, d)


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
@pytest.mark.parametrize("optimizer_type", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_foreach_and_fused_steps_agree(optimizer_type: type, implementation: str) -> None:
    """The rules follow the single-tensor code; the other kernels differ only in rounding."""
    model = make_model()
    if optimizer_type is torch.optim.SGD:
        kwargs = {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}
    else:
        kwargs = {"amsgrad": True, "weight_decay": 0.1}
    optimizer = optimizer_type(model.parameters(), lr=0.05, **kwargs, **{implementation: True})
    train(model, optimizer, 3)
    assert_matches_step(model, optimizer, update_direction(optimizer))


def test_adamw_weight_decay_is_decoupled() -> None:
    """AdamW's decay adds wd * theta to d, outside the moments (where there is a gradient)."""
    model = make_model()
    train(model, torch.optim.Adam(model.parameters(), lr=0.05), 2)
    directions = {}
    for name, wd in (("none", 0.0), ("decay", 0.3)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=wd)
        directions[name] = update_direction(optimizer)
    theta = flatten([p.detach() * (p.grad is not None) for p in model.parameters()])
    torch.testing.assert_close(directions["decay"].vector - directions["none"].vector, 0.3 * theta)


def test_several_groups_scale_by_their_lr() -> None:
    model = make_model()
    optimizer = torch.optim.AdamW(
        [
            {"params": model.hidden.parameters(), "lr": 0.02, "weight_decay": 0.1},
            {"params": model.out.parameters(), "lr": 0.2, "betas": (0.5, 0.9), "weight_decay": 0},
            {"params": [model.unused], "lr": 0.1, "amsgrad": True},
        ],
        lr=1.0,
    )
    train(model, optimizer, 3)
    d = update_direction(optimizer)
    assert learning_rate(optimizer) == 0.02
    assert_matches_step(model, optimizer, d)


def test_several_sgd_groups() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(
        [
            {"params": model.out.parameters(), "lr": 0.3, "momentum": 0.9, "nesterov": True},
            {"params": model.hidden.parameters(), "lr": 0.01, "weight_decay": 0.2},
        ],
        lr=0.1,
    )
    train(model, optimizer, 2)
    assert_matches_step(model, optimizer, update_direction(optimizer))


@pytest.mark.parametrize("max_grad_norm", [1e-2, 1e3])  # clipping active, and not
@pytest.mark.parametrize("optimizer_type", [torch.optim.SGD, torch.optim.AdamW])
def test_gradient_clipping(optimizer_type: type, max_grad_norm: float) -> None:
    model = make_model()
    kwargs = {"momentum": 0.9} if optimizer_type is torch.optim.SGD else {}
    optimizer = optimizer_type(model.parameters(), lr=0.05, **kwargs)
    train(model, optimizer, 2)
    saved = snapshot(model, optimizer)
    d = update_direction(optimizer, max_grad_norm=max_grad_norm)
    assert_unchanged(model, optimizer, saved)  # .grad is not clipped in place
    assert_matches_step(model, optimizer, d, max_grad_norm=max_grad_norm)
    clipped_differs = not torch.allclose(d.vector, update_direction(optimizer).vector)
    assert clipped_differs == (max_grad_norm < 1)


def test_parameters_without_gradient_are_zero() -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.1)
    train(model, optimizer, 1)
    assert model.unused.grad is None
    d = update_direction(optimizer)
    assert torch.equal(
        d.vector[:2], torch.zeros(2, dtype=d.vector.dtype)
    )  # own parameters come first
    assert_matches_step(model, optimizer, d)


def test_params_select_and_order_the_entries() -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    train(model, optimizer, 2)
    full = update_direction(optimizer)
    sizes = [p.numel() for p in model.parameters()]
    parts = dict(zip(["u", "hw", "hb", "ow", "ob"], full.vector.split(sizes)))
    outsider = nn.Parameter(torch.ones(3, dtype=torch.float64))  # not optimized: zeros
    chosen = [model.out.bias, outsider, model.hidden.weight]
    d = update_direction(optimizer, chosen)
    zeros = torch.zeros(3, dtype=d.vector.dtype)
    assert torch.equal(d.vector, torch.cat([parts["ob"], zeros, parts["hw"]]))
    assert [id(p) for p in d.params] == [id(p) for p in chosen]


def test_float32_parameters_give_a_float32_direction() -> None:
    model = make_model(dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    train(model, optimizer, 2)
    d = update_direction(optimizer)
    assert d.vector.dtype == torch.float32
    before, after = real_step(model, optimizer)
    torch.testing.assert_close(before - 0.05 * d.vector, after, rtol=1e-6, atol=1e-7)


def test_the_check_rejects_a_wrong_direction() -> None:
    """The comparison can fail: the raw gradient is not Adam's direction."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    train(model, optimizer, 2)
    gradient = flatten(
        [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    )
    with pytest.raises(AssertionError):
        assert_matches_step(model, optimizer, gradient)


FALLBACK_CASES = {
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.9, "centered": True}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "weight_decay": 0.1}),
    "adam_subclass": (type("MyAdam", (torch.optim.Adam,), {}), {"lr": 0.05}),
}


@pytest.mark.parametrize("max_grad_norm", [None, 1e-2])
@pytest.mark.parametrize("case", FALLBACK_CASES)
def test_fallback_steps_a_shadow_and_leaves_everything_alone(case, max_grad_norm) -> None:
    optimizer_type, kwargs = FALLBACK_CASES[case]
    model = make_model()
    optimizer = optimizer_type(model.parameters(), **kwargs)
    train(model, optimizer, 2)
    state_tensors = [id(t) for s in optimizer.state.values() for t in s.values()]
    groups = [id(g) for g in optimizer.param_groups]
    saved = snapshot(model, optimizer)
    d = update_direction(optimizer, max_grad_norm=max_grad_norm)
    assert_unchanged(model, optimizer, saved)
    assert state_tensors == [id(t) for s in optimizer.state.values() for t in s.values()]
    assert groups == [id(g) for g in optimizer.param_groups]
    assert_matches_step(model, optimizer, d, max_grad_norm=max_grad_norm)


def test_fallback_bypasses_the_lr_schedulers_step_counter() -> None:
    model = make_model()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01)
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    optimizer._opt_called = False
    train(model, optimizer, 0)
    update_direction(optimizer)
    assert optimizer._opt_called is False


class Wrapper:
    """accelerate's AcceleratedOptimizer exposes the torch optimizer as ``.optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer


def test_wrapped_optimizer_is_unwrapped() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, 1)
    assert learning_rate(Wrapper(optimizer)) == 0.1
    assert torch.equal(
        update_direction(Wrapper(optimizer)).vector, update_direction(optimizer).vector
    )


def test_errors() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no parameter of the optimizer has a gradient"):
        update_direction(optimizer)
    backward(model, seed=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        update_direction(optimizer, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="none of params"):
        update_direction(optimizer, [nn.Parameter(torch.ones(2))])
    with pytest.raises(TypeError):
        update_direction(object())
    two_groups = torch.optim.SGD(
        [{"params": model.hidden.parameters(), "lr": 0.0}, {"params": model.out.parameters()}],
        lr=0.1,
    )
    with pytest.raises(ValueError, match="learning rate is 0"):
        update_direction(two_groups)
    with pytest.raises(ValueError, match="one tensor per parameter"):
        update_direction(optimizer, gradients=[torch.ones(1)])


@pytest.mark.parametrize("optimizer_type", [torch.optim.AdamW, torch.optim.RMSprop])
def test_all_rates_zero_gives_the_update_per_unit_rate(optimizer_type: type) -> None:
    """At the end of a linear decay every rate is 0; d is then the step at rate 1."""
    model = make_model()
    optimizer = optimizer_type(model.parameters(), lr=0.05)
    train(model, optimizer, 2)
    for group in optimizer.param_groups:
        group["lr"] = 1.0
    expected = update_direction(optimizer)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    d = update_direction(optimizer)
    torch.testing.assert_close(d.vector, expected.vector, rtol=1e-13, atol=1e-15)
    assert optimizer.param_groups[0]["lr"] == 0.0


@pytest.mark.parametrize("optimizer_type", [torch.optim.AdamW, torch.optim.RMSprop])
def test_a_warm_up_from_zero_keeps_the_groups_rates_in_proportion(optimizer_type: type) -> None:
    """Groups at 1e-3 and 1e-5 warmed up from 0 by a scheduler: at step 0 every rate is 0,
    and d is the update per unit of the first group's rate with the groups in the proportion
    the schedule keeps (it was taken with both at rate 1: another direction)."""
    model = make_model()
    optimizer = optimizer_type(
        [{"params": model.hidden.parameters(), "lr": 1e-3}, {"params": model.out.parameters()}],
        lr=1e-5,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step / 10)
    backward(model, seed=0)
    assert [group["lr"] for group in optimizer.param_groups] == [0.0, 0.0]
    d = update_direction(optimizer)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * 0.5
    expected = update_direction(optimizer)
    torch.testing.assert_close(d.vector, expected.vector, rtol=1e-12, atol=1e-15)
    assert schedule.get_last_lr() == [0.0, 0.0]


def test_given_gradients_replace_grad() -> None:
    """A measurement steps with the probe gradient; the result is as if .grad held it."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    train(model, optimizer, 2)
    params = list(model.parameters())
    probe = [torch.randn_like(p) for p in params]
    d = update_direction(optimizer, params, gradients=probe, max_grad_norm=0.5)
    saved = [p.grad for p in params]
    for p, g in zip(params, probe):
        p.grad = g
    expected = update_direction(optimizer, params, max_grad_norm=0.5)
    for p, g in zip(params, saved):
        p.grad = g
    torch.testing.assert_close(d.vector, expected.vector, rtol=0, atol=0)


def test_adam_denominator_is_the_preconditioner() -> None:
    """sqrt(v) / sqrt(1 - beta2^t) + eps equals sqrt(v_hat) + eps."""
    v = torch.rand(10, dtype=torch.float64)
    expected = (v / (1 - 0.99**3)).sqrt() + 1e-8
    torch.testing.assert_close(adam_denominator(v, 3.0, 0.99, 1e-8), expected)


class CountingSGD(torch.optim.Optimizer):
    """A custom optimizer whose step depends on a counter kept outside ``state``."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.steps_taken = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.steps_taken += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] / self.steps_taken)


class OwnListSGD(torch.optim.Optimizer):
    """A custom optimizer that steps its own list of parameters, not ``param_groups``."""

    def __init__(self, params, lr: float) -> None:
        self.own = list(params)
        super().__init__(self.own, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for p in self.own:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.param_groups[0]["lr"])


@pytest.mark.parametrize("optimizer_type", [CountingSGD, OwnListSGD])
def test_custom_optimizer_state_outside_param_groups(optimizer_type) -> None:
    """The shadow step runs on a deep copy: the real counter, list and parameters stay."""
    model = make_model()
    optimizer = optimizer_type(model.parameters(), lr=0.1)
    train(model, optimizer, 2)
    counter = getattr(optimizer, "steps_taken", None)
    saved = snapshot(model, optimizer)
    d = update_direction(optimizer)
    assert_unchanged(model, optimizer, saved)
    assert getattr(optimizer, "steps_taken", None) == counter
    assert_matches_step(model, optimizer, d)


class DataTensorSGD(torch.optim.Optimizer):
    """Steps ``p.data`` tensors it keeps itself: a copy cannot point them at the shadows."""

    def __init__(self, params, lr: float) -> None:
        params = list(params)
        super().__init__(params, {"lr": lr})
        self.pairs = [(p.data, p) for p in params]

    @torch.no_grad()
    def step(self, closure=None):
        for data, p in self.pairs:
            if p.grad is not None:
                data.add_(p.grad, alpha=-self.defaults["lr"])


class LockedSGD(torch.optim.SGD):
    """An optimizer holding something deepcopy refuses."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.lock = threading.Lock()


@pytest.mark.parametrize("optimizer_type", [DataTensorSGD, LockedSGD])
def test_no_faithful_copy_means_no_direction(optimizer_type) -> None:
    """Never a silently wrong direction, never a stepped model: DirectionUnavailable."""
    model = make_model()
    optimizer = optimizer_type(model.parameters(), lr=0.1)
    train(model, optimizer, 1)
    saved = snapshot(model, optimizer)
    with pytest.raises(DirectionUnavailable):
        update_direction(optimizer)
    assert_unchanged(model, optimizer, saved)


def test_a_direction_is_read_by_parameter_not_by_position() -> None:
    """Decay / no-decay groups order the optimizer's parameters apart from the model's: the
    direction carries its parameters, and a mismatch raises instead of mixing them up."""
    model = make_model()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.05,
    )
    train(model, optimizer, 2)
    d = update_direction(optimizer)
    model_order = list(model.parameters())
    assert [id(p) for p in d.params] != [id(p) for p in model_order]
    before, after = real_step(model, optimizer)  # in the optimizer's order
    steps = ((before - after) / 0.05).split([p.numel() for p in d.params])
    real = {id(p): part for p, part in zip(d.params, steps)}
    expected = torch.cat([real[id(p)] for p in model_order])
    torch.testing.assert_close(
        as_flat_vector(d, model_order, "d"), expected, rtol=1e-10, atol=1e-12
    )
    with pytest.raises(ValueError, match="other parameters"):
        as_flat_vector(d, decay, "d")
    torch.testing.assert_close(d.over(decay), torch.cat([real[id(p)] for p in decay]))


class FakeRanks:
    """Pretends the parameters are FSDP2-sharded in one process: records every
    ``all_reduce_sum`` the shadow step makes and adds what the other ranks would contribute
    (one entry per reduction, in order; zeros when none is given)."""

    def __init__(self, monkeypatch, *others) -> None:
        self.calls: list[torch.Tensor] = []
        self.others = list(others)
        monkeypatch.setattr(directions, "is_sharded", lambda params: True)
        monkeypatch.setattr(directions, "all_reduce_sum", self.reduce)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append(tensor.clone())
        if len(self.calls) <= len(self.others):
            tensor.add_(torch.as_tensor(self.others[len(self.calls) - 1], dtype=tensor.dtype))
        return tensor


class RaisingSGD(torch.optim.Optimizer):
    """A custom optimizer whose step fails."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        raise ValueError("this optimizer cannot step here")


class Shared:
    """Something a deep copy shares with the original."""

    def __init__(self) -> None:
        self.steps = 0

    def __deepcopy__(self, memo):
        return self


class SharedCounterSGD(torch.optim.SGD):
    """Counts its steps in an object a copy shares: stepping the copy changes the original."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.shared = Shared()

    def step(self, closure=None):
        self.shared.steps += 1
        return super().step(closure)


def test_a_copy_that_changes_the_real_optimizer_is_a_runtime_error() -> None:
    model = make_model()
    optimizer = SharedCounterSGD(model.parameters(), lr=0.1)
    train(model, optimizer, 1)
    with pytest.raises(RuntimeError, match="changed the real optimizer") as raised:
        update_direction(optimizer)
    assert not isinstance(raised.value, DirectionUnavailable)


def test_a_failing_step_is_no_direction_with_its_reason() -> None:
    model = make_model()
    optimizer = RaisingSGD(model.parameters(), lr=0.1)
    train(model, optimizer, 0)
    with pytest.raises(DirectionUnavailable, match="ValueError: this optimizer cannot step"):
        update_direction(optimizer)


def test_lbfgs_leaves_the_measures_without_a_direction_standing() -> None:
    """LBFGS steps with a closure a copy is not given (a TypeError): the row's direction
    measures say so, the others are taken (the whole row was an error)."""
    model = make_model()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1)
    batch = (torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64))

    def loss_fn(m, b):
        return nn.functional.mse_loss(m(b[0]), b[1])

    loss_fn(model, batch).backward()
    meter = sm.SharpnessMeter(model, batch, loss_fn=loss_fn, measures=("critical", "trace"))
    row = meter.measure(0, optimizer=optimizer)
    assert row["trace_status"] == "ok"
    assert row["critical_status"].startswith("no_direction: LBFGS.step() failed on a copy")


SHARDED_FAILURES = {
    "no_deepcopy": (LockedSGD, DirectionUnavailable, "cannot be deep-copied"),
    "step_raises": (RaisingSGD, DirectionUnavailable, "ValueError: this optimizer cannot step"),
    "real_changed": (SharedCounterSGD, RuntimeError, "changed the real optimizer"),
}


@pytest.mark.parametrize("case", SHARDED_FAILURES)
def test_a_sharded_failure_is_reduced_before_it_is_raised(monkeypatch, case) -> None:
    """A rank that fails tells the others through the same all_reduce they all make, so none
    is left waiting in a collective; it raises its own reason."""
    optimizer_type, error_type, message = SHARDED_FAILURES[case]
    model = make_model()
    optimizer = optimizer_type(model.parameters(), lr=0.1)
    ranks = FakeRanks(monkeypatch)
    train(model, optimizer, 0)
    with pytest.raises(error_type, match=message) as raised:
        update_direction(optimizer)
    assert (error_type is DirectionUnavailable) == isinstance(raised.value, DirectionUnavailable)
    assert [float(t) for t in ranks.calls] == [1.0]


def test_another_ranks_failure_stops_this_one(monkeypatch) -> None:
    model = make_model()
    optimizer = CountingSGD(model.parameters(), lr=0.1)
    train(model, optimizer, 2)
    saved = snapshot(model, optimizer)
    ranks = FakeRanks(monkeypatch, 1.0)
    with pytest.raises(DirectionUnavailable, match="another rank failed"):
        update_direction(optimizer)
    assert [float(t) for t in ranks.calls] == [0.0]
    assert_unchanged(model, optimizer, saved)


@pytest.mark.parametrize(
    ("others", "moved"), [([0.0, 0.0], True), ([1.0, 1.0], True), ([1.0, 0.0], False)]
)
def test_a_sharded_rank_without_gradients_still_reduces(monkeypatch, others, moved) -> None:
    """A rank whose shards all have zero gradients takes part in the moved-check's reduction:
    the other ranks decide whether the copy moved anything."""
    model = make_model()
    optimizer = CountingSGD(model.parameters(), lr=0.1)
    train(model, optimizer, 1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ranks = FakeRanks(monkeypatch, 0.0, others)
    if moved:
        assert not update_direction(optimizer).vector.any()
    else:
        with pytest.raises(DirectionUnavailable, match="did not move"):
            update_direction(optimizer)
    # Failure and moved checks: one each per shadow step (at the rates, then at half of them)
    # and one for the proportionality check, when the first did not raise.
    assert len(ranks.calls) == (5 if moved else 2)
    assert ranks.calls[1].tolist() == [0.0, 0.0]


def test_a_sharded_moved_check_is_one_reduction(monkeypatch) -> None:
    model = make_model()
    optimizer = CountingSGD(model.parameters(), lr=0.1)
    train(model, optimizer, 1)
    ranks = FakeRanks(monkeypatch)
    update_direction(optimizer)
    # No rank failed; this rank has gradients, and the copy moved its 4 parameters with one;
    # so did the copy at half the rates; then the proportionality check's three sums.
    assert [t.tolist() for t in ranks.calls[:4]] == [0.0, [1.0, 4.0]] * 2
    assert len(ranks.calls) == 5 and ranks.calls[4].shape == (3,)


@pytest.mark.parametrize("warmup_init", [False, True])
def test_adafactor_without_a_rate_steps_with_its_relative_step_size(warmup_init: bool) -> None:
    """Hugging Face's Adafactor with ``lr=None`` (T5 recipes) computes its rate inside step():
    rho_{t+1} = min(1e-2 or 1e-6 (t+1), 1/sqrt(t+1)). The unit of d is that rate, so d is the
    one an Adafactor given rho_{t+1} as its rate would have. The rate AdafactorSchedule writes
    into the groups for logging (the last step's, scaled; 0 before the first) is not it."""
    from transformers.optimization import Adafactor, AdafactorSchedule

    model = make_model()
    relative = Adafactor(model.parameters(), lr=None, relative_step=True, warmup_init=warmup_init)
    schedule = AdafactorSchedule(relative)
    assert relative.param_groups[0]["lr"] == 0.0
    train(model, relative, 3)
    schedule.step()
    rho = min(1e-6 * 4 if warmup_init else 1e-2, 4**-0.5)
    assert learning_rate(relative) == pytest.approx(rho, rel=1e-15)
    d = update_direction(relative)
    assert_matches_step(model, relative, d)
    given = Adafactor(model.parameters(), lr=rho, relative_step=False)
    given.load_state_dict(relative.state_dict())
    for group in given.param_groups:
        group.update(lr=rho, relative_step=False)
    torch.testing.assert_close(update_direction(given).vector, d.vector, rtol=1e-12, atol=0)


def test_a_rate_that_is_not_a_number_is_refused() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    backward(model, seed=0)
    optimizer.param_groups[0]["lr"] = None
    with pytest.raises(ValueError, match="lr=None, not a number"):
        learning_rate(optimizer)


class ScheduleFreeLike(torch.optim.Optimizer):
    """Moves toward an average whose weight does not scale with the rate, as schedule-free
    AdamW's interpolation does: its step does not halve with the rate."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(0.9).add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize(
    "make",
    [
        lambda params: ScheduleFreeLike(params, lr=0.1),
        lambda params: torch.optim.Rprop(params, lr=0.1),  # step sizes of its own after the first
        lambda params: torch.optim.ASGD(params, lr=0.1),  # steps with the last step's rate
        lambda params: torch.optim.Adafactor(params, lr=1.0),  # rate min(lr, 1/sqrt(t))
    ],
)
def test_a_step_that_does_not_scale_with_the_rate_has_no_direction(make) -> None:
    """theta - c lr0 d would be no step the optimizer takes at rate c lr0: d per unit rate
    means nothing, and critical sharpness along it scaled like 1/lr (schedule-free AdamW:
    2.1 at lr 1e-2, 156 at 1e-4, from the same state)."""
    model = make_model()
    optimizer = make(model.parameters())
    train(model, optimizer, 3)
    saved = snapshot(model, optimizer)
    with pytest.raises(DirectionUnavailable, match="does not scale with its learning rate"):
        update_direction(optimizer)
    assert_unchanged(model, optimizer, saved)


@pytest.mark.parametrize(("dtype", "lr"), [(torch.bfloat16, 1e-4), (torch.float32, 1e-9)])
def test_steps_the_storage_rounds_are_not_taken_for_disproportion(dtype, lr) -> None:
    """A step of a few ulps of the parameters halves only to rounding: a good step, followed."""
    model = make_model(dtype=dtype)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=lr)
    train(model, optimizer, 2)
    assert update_direction(optimizer).vector.any()
