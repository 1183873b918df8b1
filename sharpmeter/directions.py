r"""The optimizer's update direction, computed without stepping the optimizer.

:func:`update_direction` returns the flat vector :math:`d` that ``optimizer.step()`` would
subtract from the parameters per unit of learning rate:

.. math:: \theta_{\text{after}} = \theta - \eta_0\, d,

where :math:`\eta_0` is the learning rate of the *first* parameter group
(:func:`learning_rate`). A group :math:`g` with its own rate :math:`\eta_g` enters :math:`d`
scaled by :math:`\eta_g / \eta_0`, so a line search along :math:`d` at :math:`\eta = \eta_0`
reproduces the real step exactly, and :math:`\eta = c\,\eta_0` scales every group's step by
:math:`c`, as a learning-rate schedule does. Nothing is modified: parameters, gradients,
optimizer state and the RNG are left as they were.

The rules below are torch's own arithmetic (``torch/optim/sgd.py``, ``adam.py``), with the
gradient :math:`g` of the step about to be taken, :math:`\lambda` the weight decay and the
``maximize`` flag negating :math:`g` first. Each returns the step :math:`s_g` of one parameter,
and :math:`d = s_g / \eta_0`.

``torch.optim.SGD``
    :math:`g \leftarrow g + \lambda\theta`; with momentum :math:`\mu` the buffer becomes
    :math:`b = g` on the first step and :math:`b = \mu b + (1 - \tau) g` later (dampening
    :math:`\tau`); then :math:`g \leftarrow g + \mu b` (Nesterov) or :math:`g \leftarrow b`;
    :math:`s = \eta_g g`.
``torch.optim.Adam`` / ``torch.optim.AdamW``
    At the next step :math:`t + 1` (state ``step`` = :math:`t`, 0 before the first step), with
    :math:`\lambda` added to the gradient for Adam (:math:`g \leftarrow g + \lambda\theta`):
    :math:`m = \beta_1 m + (1 - \beta_1) g`, :math:`v = \beta_2 v + (1 - \beta_2) g^2`
    (``amsgrad``: :math:`v \leftarrow \max(v_{\max}, v)`),

    .. math:: s = \frac{\eta_g}{1 - \beta_1^{t+1}}\,
              \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^{t+1}} + \epsilon}
              \; [+\; \eta_g \lambda \theta \text{ for AdamW's decoupled decay}].

Any other optimizer (RMSprop, Adagrad, subclasses of the above, ...)
    Exact by construction: the optimizer steps a shadow copy of its parameters and state, and
    :math:`s = \theta - \theta_{\text{shadow}}`. It costs one optimizer step, and memory for a
    copy of the parameters, gradients and state.

Gradient clipping as the Hugging Face Trainer does it (``max_grad_norm``, through
``torch.nn.utils.clip_grad_norm_``) scales every gradient by
:math:`\min(1, c / (\lVert g \rVert_2 + 10^{-6}))` first, with the norm over all the
optimizer's gradients (the Trainer clips ``model.parameters()``: the same set when the optimizer
holds every parameter that has a gradient); ``.grad`` itself is left alone.

Parameters without a gradient are skipped by the optimizer, so their entries of :math:`d` are 0.
The analytic rules ignore ``foreach``/``fused``/``capturable``, which change the rounding of the
real step, not its value.

Example::

    loss.backward()
    d = sm.update_direction(optimizer, max_grad_norm=1.0)
    eta0 = sm.learning_rate(optimizer)          # theta - eta0 * d is the next step's result
    r = sm.critical_sharpness(model, loss_fn, probe_batch, d)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from sharpmeter.params import cuda_device_indices, flatten, vector_dtype

# Added to the total norm by ``torch.nn.utils.clip_grad_norm_`` before dividing by it.
_CLIP_EPS = 1e-6


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or a similar wrapper)."""
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")


def learning_rate(optimizer: Any) -> float:
    r"""The first parameter group's learning rate :math:`\eta_0`, the unit of :math:`d`."""
    return float(unwrap_optimizer(optimizer).param_groups[0]["lr"])


def adam_denominator(
    second_moment: torch.Tensor, step: float, beta2: float, eps: float
) -> torch.Tensor:
    r"""Adam's :math:`\sqrt{v} / \sqrt{1 - \beta_2^{t}} + \epsilon` at step ``t``, in torch's order.

    Shared by the update rule and the preconditioner :math:`\sqrt{\hat v} + \epsilon`, so both
    round as ``torch.optim.Adam`` does.
    """
    return (second_moment.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)


@torch.no_grad()
def update_direction(
    optimizer: Any,
    params: Iterable[nn.Parameter] | None = None,
    *,
    gradients: Sequence[torch.Tensor] | None = None,
    max_grad_norm: float | None = None,
) -> torch.Tensor:
    r"""What ``optimizer.step()`` would subtract from the parameters, per unit of :math:`\eta_0`.

    Args:
        optimizer: a ``torch.optim.Optimizer``, or a wrapper with one as ``.optimizer``
            (accelerate's ``AcceleratedOptimizer``). Its gradients must be populated.
        params: the parameters :math:`d` covers, in this order (default: every parameter of
            the optimizer, group by group, in each group's order). A parameter the optimizer
            does not hold is not stepped, so its entries are 0.
        gradients: the gradients to step with, one per entry of ``params`` (default: the
            ``.grad`` of each parameter). A measurement passes the probe gradient here: the
            update the optimizer would make on the probe batch, from its current state.
        max_grad_norm: clip the gradients' total L2 norm to this before the update, as the
            Trainer's ``max_grad_norm`` does; ``None`` or 0 (the Trainer's "off") do not clip.

    Returns:
        The flat direction :math:`d` with :math:`\theta - \eta_0 d` equal to the parameters
        after ``optimizer.step()``, in :func:`~sharpmeter.params.vector_dtype` of the
        parameters (float64 stays float64). For FSDP2 parameters it is this rank's shard, and
        ``gradients`` are ``DTensor`` objects sharded like the parameters.

    Raises:
        ValueError: :math:`\eta_0 = 0` while another group's rate is not, no gradients, a
            negative ``max_grad_norm``, or ``params`` of which the optimizer holds none.
    """
    optimizer = unwrap_optimizer(optimizer)
    lr0 = learning_rate(optimizer)
    # Every rate 0 (the end of a linear decay, the start of a warm-up): the update per unit rate
    # is still defined, so take it with every group at rate 1.
    unit_rates = all(float(group["lr"]) == 0 for group in optimizer.param_groups)
    if lr0 == 0 and not unit_rates:
        raise ValueError("the first parameter group's learning rate is 0, the unit of d")
    if max_grad_norm is not None and max_grad_norm < 0:
        raise ValueError(f"max_grad_norm must be non-negative or None, got {max_grad_norm}")
    groups = [{**g, "lr": 1.0} for g in optimizer.param_groups] if unit_rates else None
    group_of = {id(p): group for group in groups or optimizer.param_groups for p in group["params"]}
    owned = [p for group in optimizer.param_groups for p in group["params"]]
    selected = owned if params is None else list(params)
    if not any(id(p) in group_of for p in selected):
        raise ValueError("none of params is optimized by this optimizer")
    grad_of = _gradients_by_parameter(owned, selected, gradients)
    grads = [grad_of[id(p)] for p in owned if id(p) in grad_of]
    if not grads:
        raise ValueError("no parameter of the optimizer has a gradient: call backward() first")
    coef = _clip_coefficient(grads, max_grad_norm) if max_grad_norm else None

    dtype = vector_dtype(selected)
    rule = _RULES.get(type(optimizer))
    if rule is None:
        steps = _steps_by_shadow_step(optimizer, grad_of, coef, dtype, unit_rates)
    else:
        steps = {
            id(p): rule(
                group_of[id(p)], optimizer.state.get(p, {}), p, _clipped(grad_of[id(p)], coef)
            )
            for p in selected
            if id(p) in group_of and id(p) in grad_of
        }
    parts = [steps[id(p)] if id(p) in steps else torch.zeros_like(p) for p in selected]
    return flatten(parts, dtype) / (1.0 if unit_rates else lr0)


def _gradients_by_parameter(
    owned: Sequence[nn.Parameter],
    selected: Sequence[nn.Parameter],
    gradients: Sequence[torch.Tensor] | None,
) -> dict[int, torch.Tensor]:
    """The gradient each parameter steps with: given ones, else ``.grad`` (absent: no step)."""
    if gradients is None:
        return {id(p): p.grad for p in owned if p.grad is not None}
    gradients = list(gradients)
    if len(gradients) != len(selected) or any(
        g.shape != p.shape for g, p in zip(gradients, selected, strict=True)
    ):
        raise ValueError("gradients must hold one tensor per parameter, shaped like it")
    return {id(p): g for p, g in zip(selected, gradients, strict=True)}


def _clip_coefficient(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_``'s factor min(1, max_norm / (norm + 1e-6)), without touching grads."""
    norms = [torch.linalg.vector_norm(g).to(grads[0].device) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    return torch.clamp(max_norm / (total + _CLIP_EPS), max=1.0)


def _clipped(grad: torch.Tensor, coef: torch.Tensor | None) -> torch.Tensor:
    return grad if coef is None else grad * coef.to(grad.device)


def _sgd_step(
    group: dict[str, Any], state: dict[str, Any], param: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    if group["maximize"]:
        grad = -grad
    if group["weight_decay"] != 0:
        grad = grad.add(param, alpha=group["weight_decay"])
    momentum = group["momentum"]
    if momentum != 0:
        buffer = state.get("momentum_buffer")
        # The first step seeds the buffer with the gradient itself (no dampening), as torch does.
        if buffer is None:
            buffer = grad
        else:
            buffer = buffer.mul(momentum).add_(grad, alpha=1 - group["dampening"])
        grad = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
    return grad * float(group["lr"])


def _adam_step(
    group: dict[str, Any],
    state: dict[str, Any],
    param: torch.Tensor,
    grad: torch.Tensor,
    decoupled: bool,
) -> torch.Tensor:
    lr = float(group["lr"])
    beta1, beta2 = (float(beta) for beta in group["betas"])
    weight_decay = group["weight_decay"]
    if group["maximize"]:
        grad = -grad
    if weight_decay != 0 and not decoupled:
        grad = grad.add(param, alpha=weight_decay)
    exp_avg = _moment(state, "exp_avg", param).lerp(grad, 1 - beta1)
    exp_avg_sq = _moment(state, "exp_avg_sq", param).mul(beta2)
    exp_avg_sq.addcmul_(grad, grad, value=1 - beta2)
    if group["amsgrad"]:
        exp_avg_sq = torch.maximum(_moment(state, "max_exp_avg_sq", param), exp_avg_sq)
    step = float(state.get("step", 0)) + 1
    denom = adam_denominator(exp_avg_sq, step, beta2, group["eps"])
    update = (exp_avg / denom).mul_(lr / (1 - beta1**step))
    if weight_decay != 0 and decoupled:
        # AdamW scales theta by (1 - lr * wd) before the Adam step: lr * wd * theta of the step.
        update.add_(param, alpha=lr * weight_decay)
    return update


def _moment(state: dict[str, Any], key: str, param: torch.Tensor) -> torch.Tensor:
    """A moment from the state, or the zeros torch starts it from before the first step."""
    value = state.get(key)
    return torch.zeros_like(param, memory_format=torch.preserve_format) if value is None else value


def _adam_rule(optimizer_type: type) -> Callable[..., torch.Tensor]:
    def rule(
        group: dict[str, Any], state: dict[str, Any], param: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        # Older torch has no decoupled_weight_decay key: there AdamW is a class of its own.
        decoupled = optimizer_type is torch.optim.AdamW or group.get("decoupled_weight_decay")
        return _adam_step(group, state, param, grad, bool(decoupled))

    return rule


# Exact types only: a subclass may override step(), so it takes the shadow step instead.
_RULES: dict[type, Callable[..., torch.Tensor]] = {
    torch.optim.SGD: _sgd_step,
    torch.optim.Adam: _adam_rule(torch.optim.Adam),
    torch.optim.AdamW: _adam_rule(torch.optim.AdamW),
}


def _steps_by_shadow_step(
    optimizer: torch.optim.Optimizer,
    grad_of: dict[int, torch.Tensor],
    coef: torch.Tensor | None,
    dtype: torch.dtype,
    unit_rates: bool,
) -> dict[int, torch.Tensor]:
    """Each parameter's step, taken by the optimizer itself on copies of parameters and state.

    The optimizer's ``param_groups`` and ``state`` are swapped for deep copies whose parameters
    are clones (carrying clipped copies of the gradients) for the duration of one ``step()``, so
    the real parameters, gradients and state tensors are never written (not even their version
    counters move) and keep their identity. ``step`` is called through the class, bypassing
    instance patches such as the LR scheduler's call counter; the RNG is forked.
    """
    owned = [p for group in optimizer.param_groups for p in group["params"]]
    shadows = {}
    for p in owned:
        shadow = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        if id(p) in grad_of:
            shadow.grad = _clipped(grad_of[id(p)], coef).clone()
        shadows[id(p)] = shadow
    # The memo maps every real parameter to its shadow, so the copied groups and the copied
    # state (keyed by parameter) refer to the shadows.
    shadow_groups, shadow_state = copy.deepcopy(
        (optimizer.param_groups, optimizer.state), dict(shadows)
    )
    if unit_rates:
        for group in shadow_groups:
            group["lr"] = 1.0
    versions = [p._version for p in owned]
    real_groups, real_state = optimizer.param_groups, optimizer.state
    try:
        optimizer.param_groups, optimizer.state = shadow_groups, shadow_state
        with torch.random.fork_rng(devices=cuda_device_indices(owned)):
            type(optimizer).step(optimizer)
    finally:
        optimizer.param_groups, optimizer.state = real_groups, real_state
    if [p._version for p in owned] != versions:
        raise RuntimeError(
            f"{type(optimizer).__name__}.step() wrote the real parameters, which it does not "
            "reach through param_groups: they have been stepped, and its update direction "
            "cannot be computed by a shadow step"
        )
    return {id(p): p.detach().to(dtype) - shadows[id(p)].detach().to(dtype) for p in owned}
