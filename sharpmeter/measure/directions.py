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

Any other optimizer (RMSprop, Adagrad, subclasses of the above, custom ones, ...)
    Exact by construction: a deep copy of the optimizer, whose parameters are shadow clones,
    takes one step, and :math:`s = \theta - \theta_{\text{shadow}}`. The copy carries every
    attribute (a step counter, the optimizer's own list of parameters), so the real optimizer is
    never stepped; that it was left alone is checked afterwards. A second copy steps at half
    the rates: the step must halve with them (to 10%), or :math:`\theta - c\,\eta_0 d` would be
    no step the optimizer takes at rate :math:`c\,\eta_0` (schedule-free AdamW; torch's Adafactor
    once its rate exceeds :math:`1/\sqrt{t}`); a difference the parameters' storage can round
    to is never taken for one, and Adafactor's relative step is linear in its own rate. When
    no faithful copy can be made (the optimizer cannot be deep-copied, or its copy does not
    move the shadow parameters) or the step does not scale with the rate,
    :class:`DirectionUnavailable` is raised, never a wrong direction. It costs two optimizer
    steps, and memory for a copy of the parameters, gradients and state. On sharded
    (FSDP2) parameters a failure on one rank is all-reduced first, so every rank raises.

Gradient clipping as the Hugging Face Trainer does it (``max_grad_norm``, through
``torch.nn.utils.clip_grad_norm_``) scales every gradient by
:math:`\min(1, c / (\lVert g \rVert_2 + 10^{-6}))` first. The norm is the one the training
loop clips by, over *every* gradient (the Trainer clips ``model.parameters()``); when ``d`` is
taken over a subset of the parameters, pass that global norm as ``total_grad_norm``, or the
subset's own norm would clip too little. ``.grad`` itself is left alone.

Parameters without a gradient are skipped by the optimizer, so their entries of :math:`d` are 0.
The analytic rules ignore ``foreach``/``fused``/``capturable``, which change the rounding of the
real step, not its value.

The direction is a :class:`~sharpmeter.measure.params.ParameterVector`: it carries the parameters it
belongs to, so the optimizer's group order can never be read as the model's order.

Example::

    loss.backward()
    d = sm.update_direction(optimizer, max_grad_norm=1.0)
    eta0 = sm.learning_rate(optimizer)          # theta - eta0 * d is the next step's result
    r = sm.critical_sharpness(model, loss_fn, probe_batch, d)
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.amp.grad_scaler import OptState

from sharpmeter.measure.distributed import all_reduce_sum, is_sharded, local
from sharpmeter.measure.params import ParameterVector, bit_identical, flatten, vector_dtype
from sharpmeter.measure.rng import fork_rng

# Added to the total norm by ``torch.nn.utils.clip_grad_norm_`` before dividing by it.
_CLIP_EPS = 1e-6
ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)


class DirectionUnavailable(RuntimeError):
    """The optimizer's update cannot be computed faithfully without stepping it."""


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or a similar wrapper)."""
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")


def pending_gradient_scale(optimizer: Any, scaler: torch.amp.GradScaler | None = None) -> float:
    """The factor by which ``.grad`` is still multiplied for fp16 mixed precision, 1 if none.

    A loss scaler (``scaler``, else the wrapper's: accelerate's ``AcceleratedOptimizer`` under
    fp16, as the Trainer uses it) leaves the gradients scaled until it unscales them: in
    ``step()``, or earlier for clipping (``scaler.unscale_``, or accelerate's
    ``clip_grad_norm_``, which the Trainer calls when ``max_grad_norm`` > 0). Between the
    backward and then, the gradient the optimizer will step with is ``.grad / scale``.
    """
    scaler = scaler if scaler is not None else getattr(optimizer, "scaler", None)
    if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
        return 1.0
    # Torch keeps no public record of whether this step's gradients were unscaled; the
    # wrapper's own id too, for a user who unscaled through it.
    for unscaled in (unwrap_optimizer(optimizer), optimizer):
        state = scaler._per_optimizer_states.get(id(unscaled))
        if state is not None and state["stage"] is OptState.UNSCALED:
            return 1.0
    return float(scaler.get_scale())


# How far a step at half the rates may be from half the step, in norm relative to the step,
# beyond the parameters' storage rounding (bounded apart): schedule-free AdamW is off by 76%.
PROPORTIONAL = 0.1


def learning_rate(optimizer: Any) -> float:
    r"""The first parameter group's learning rate :math:`\eta_0`, the unit of :math:`d`.

    A group with ``relative_step=True`` (Hugging Face's and fairseq's ``Adafactor`` with
    ``lr=None``, as T5 recipes use it) steps with no rate of its own: its ``lr`` is ignored by
    the step (``AdafactorSchedule`` writes the last step's scaled rate there, 0 before the
    first). Its rate is Adafactor's relative step size for the next step :math:`t + 1`
    (Shazeer & Stern 2018; :math:`t` the step count of the group's first parameter that has
    one), the factor that plays the rate's part:

    .. math:: \rho_{t+1} = \min\bigl(10^{-2},\ 1 / \sqrt{t + 1}\bigr)
              \quad (\text{``warmup_init``: } \min(10^{-6}\,(t + 1),\ 1 / \sqrt{t + 1})).

    Its per-parameter scale :math:`\max(\epsilon_2, \operatorname{RMS}(\theta))` then stays in
    :math:`d`, as it does when the group is given a rate.

    Raises:
        ValueError: a rate that is neither a number nor Adafactor's relative step.
    """
    optimizer = unwrap_optimizer(optimizer)
    return group_rate(optimizer, optimizer.param_groups[0])


def group_rate(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> float:
    """The rate a parameter group steps with next (see :func:`learning_rate`)."""
    if group.get("relative_step"):
        return _relative_step_size(optimizer, group)
    rate = group.get("lr")
    try:
        return float(rate)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{type(optimizer).__name__}'s parameter group has lr={rate!r}, not a number: the "
            "update direction has no unit"
        ) from error


def _relative_step_size(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> float:
    # The first parameter that has stepped: one that never had a gradient has no count.
    counts = (optimizer.state.get(p, {}).get("step") for p in group["params"])
    step = float(next((count for count in counts if count is not None), 0)) + 1
    bound = 1e-6 * step if group.get("warmup_init") else 1e-2
    return min(bound, step**-0.5)


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
    gradients: Sequence[torch.Tensor | None] | None = None,
    max_grad_norm: float | None = None,
    total_grad_norm: float | torch.Tensor | None = None,
) -> ParameterVector:
    r"""What ``optimizer.step()`` would subtract from the parameters, per unit of :math:`\eta_0`.

    Args:
        optimizer: a ``torch.optim.Optimizer``, or a wrapper with one as ``.optimizer``
            (accelerate's ``AcceleratedOptimizer``). Its gradients must be populated.
        params: the parameters :math:`d` covers, in this order (default: every parameter of
            the optimizer, group by group, in each group's order). A parameter the optimizer
            does not hold is not stepped, so its entries are 0.
        gradients: the gradients to step with, one per entry of ``params`` (default: the
            ``.grad`` of each parameter; ``None`` for one the step leaves alone). A measurement
            passes the probe gradient here: the update the optimizer would make on the probe
            batch, from its current state.
        max_grad_norm: clip the gradients' total L2 norm to this before the update, as the
            Trainer's ``max_grad_norm`` does; ``None`` or 0 (the Trainer's "off") do not clip.
        total_grad_norm: the norm clipping divides by, over every gradient the training loop
            clips (default: the norm of the optimizer's gradients given here).

    Returns:
        The direction :math:`d` over ``params`` with :math:`\theta - \eta_0 d` equal to the
        parameters after ``optimizer.step()``, in :func:`~sharpmeter.measure.params.vector_dtype` of
        the parameters (float64 stays float64). For FSDP2 parameters it is this rank's shard,
        and ``gradients`` are ``DTensor`` objects sharded like the parameters.

    Raises:
        ValueError: :math:`\eta_0 = 0` while another group's rate is not, no gradients, a
            negative ``max_grad_norm``, or ``params`` of which the optimizer holds none.
        DirectionUnavailable: an optimizer without an analytic rule that cannot be stepped
            faithfully on a copy, or whose copy's step raises (LBFGS without its closure). On
            FSDP2-sharded parameters the reason is given on the rank where the step raised,
            and every other rank raises "another rank failed": all ranks raise together, none
            is left in a collective.
        RuntimeError: stepping the copy changed the real optimizer or its parameters (it
            reaches them through something a deep copy shares). On sharded parameters only the
            rank where that happened raises this; the others raise DirectionUnavailable.
    """
    optimizer = unwrap_optimizer(optimizer)
    lr0 = learning_rate(optimizer)
    unit_rates = rates_at_zero(optimizer)
    if lr0 == 0 and unit_rates is None:
        raise ValueError("the first parameter group's learning rate is 0, the unit of d")
    groups = (
        [{**g, "lr": rate} for g, rate in zip(optimizer.param_groups, unit_rates, strict=True)]
        if unit_rates
        else None
    )
    group_of = {id(p): group for group in groups or optimizer.param_groups for p in group["params"]}
    selected, grad_of, coef = _step_inputs(
        optimizer, params, gradients, max_grad_norm, total_grad_norm
    )

    dtype = vector_dtype(selected)
    rule = _RULES.get(type(optimizer))
    if rule is None:
        steps = _steps_by_shadow_step(optimizer, grad_of, coef, dtype, unit_rates)
        if _rates_are_knobs(optimizer):
            halves = _steps_by_shadow_step(optimizer, grad_of, coef, dtype, unit_rates, 0.5)
            _check_proportional(optimizer, steps, halves)
    else:
        steps = {
            id(p): rule(
                group_of[id(p)], optimizer.state.get(p, {}), p, _clipped(grad_of[id(p)], coef)
            )
            for p in selected
            if id(p) in group_of and id(p) in grad_of
        }
    parts = [steps[id(p)] if id(p) in steps else torch.zeros_like(p) for p in selected]
    return ParameterVector(flatten(parts, dtype) / (1.0 if unit_rates else lr0), tuple(selected))


def rates_at_zero(optimizer: torch.optim.Optimizer) -> list[float] | None:
    """Where every group's rate is 0 (the end of a linear decay, the start of a warm-up), the
    rates to take the update per unit rate with: each group's over the first's, as the
    schedule scales them all (its ``initial_lr``, which torch's schedulers record), or 1 for
    every group without that record. None when some rate is not 0.

    >>> sgd = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 0.0, "initial_lr": 1e-3},
    ...                        {"params": [torch.zeros(1)], "lr": 0.0, "initial_lr": 1e-5}])
    >>> rates_at_zero(sgd)
    [1.0, 0.01]
    """
    groups = optimizer.param_groups
    if any(group_rate(optimizer, group) != 0 for group in groups):
        return None
    initial = [group.get("initial_lr") for group in groups]
    if any(not isinstance(rate, (int, float)) for rate in initial) or not initial[0]:
        return [1.0] * len(groups)
    return [float(rate) / float(initial[0]) for rate in initial]


def _step_inputs(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter] | None,
    gradients: Sequence[torch.Tensor] | None,
    max_grad_norm: float | None,
    total_grad_norm: float | torch.Tensor | None,
) -> tuple[list[nn.Parameter], dict[int, torch.Tensor], torch.Tensor | None]:
    """The selected parameters, the gradient each steps with, and the clipping factor."""
    if max_grad_norm is not None and max_grad_norm < 0:
        raise ValueError(f"max_grad_norm must be non-negative or None, got {max_grad_norm}")
    owned = _owned(optimizer)
    selected = owned if params is None else list(params)
    held = {id(p) for p in owned}
    if not any(id(p) in held for p in selected):
        raise ValueError("none of params is optimized by this optimizer")
    grad_of = _gradients_by_parameter(owned, selected, gradients)
    grads = [grad_of[id(p)] for p in owned if id(p) in grad_of]
    if not grads:
        raise ValueError("no parameter of the optimizer has a gradient: call backward() first")
    coef = _clip_coefficient(grads, max_grad_norm, total_grad_norm) if max_grad_norm else None
    return selected, grad_of, coef


@torch.no_grad()
def adam_preconditioner(
    optimizer: Any,
    params: Iterable[nn.Parameter] | None = None,
    *,
    gradients: Sequence[torch.Tensor] | None = None,
    max_grad_norm: float | None = None,
    total_grad_norm: float | torch.Tensor | None = None,
) -> ParameterVector:
    r"""The diagonal preconditioner :math:`P` of the Adam step :func:`update_direction` measures.

    The next step :math:`t + 1` on gradient :math:`g` (clipped, negated for ``maximize``, with
    Adam's coupled weight decay, exactly as that step) divides by

    .. math:: P = \sqrt{\hat v} + \epsilon, \qquad
              \hat v = \frac{\beta_2 v_t + (1 - \beta_2) g^2}{1 - \beta_2^{t+1}}

    (``amsgrad``: the maximum with :math:`v_{\max}` first), so :math:`P` and :math:`d` belong to
    the same update, as in the reference implementation (facebookresearch/scalable-curvature).
    Before the first step :math:`v_0 = 0` and :math:`P = |g| + \epsilon`.

    Args and defaults are those of :func:`update_direction` (``gradients``: the probe
    gradient the measured step would take; default ``.grad``).

    Raises:
        ValueError: not ``torch.optim.Adam``/``AdamW``, a parameter the optimizer does not
            hold, or one without a gradient.
    """
    optimizer = unwrap_optimizer(optimizer)
    check_adam_type(optimizer)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    selected, grad_of, coef = _step_inputs(
        optimizer, params, gradients, max_grad_norm, total_grad_norm
    )
    parts = []
    for index, p in enumerate(selected):
        if id(p) not in group_of or id(p) not in grad_of:
            raise ValueError(
                f"params[{index}] is not optimized by this optimizer or has no gradient"
            )
        group = group_of[id(p)]
        grad = _adam_gradient(
            group, p, _clipped(grad_of[id(p)], coef), _decoupled(type(optimizer), group)
        )
        parts.append(_adam_next_denominator(group, optimizer.state.get(p, {}), p, grad))
    return ParameterVector(flatten(parts, vector_dtype(selected)), tuple(selected))


def check_adam_type(optimizer: Any) -> None:
    """Raise ``ValueError`` unless ``optimizer`` is (or wraps) ``torch.optim.Adam``/``AdamW``
    itself: a subclass may step with another rule (its update is then followed by a shadow
    step), and :math:`P` read from Adam's formula would belong to no update it takes."""
    inner = unwrap_optimizer(optimizer)
    if type(inner) not in ADAM_TYPES:
        kind = (
            "a subclass of Adam, which may step differently"
            if isinstance(inner, ADAM_TYPES)
            else "not Adam"
        )
        raise ValueError(
            f"the preconditioned measure needs an Adam-type optimizer, torch.optim.Adam or AdamW "
            f"itself, got "
            f"{type(inner).__name__} ({kind}): drop 'preconditioned' from measures"
        )


def _gradients_by_parameter(
    owned: Sequence[nn.Parameter],
    selected: Sequence[nn.Parameter],
    gradients: Sequence[torch.Tensor | None] | None,
) -> dict[int, torch.Tensor]:
    """The gradient each parameter steps with: given ones, else ``.grad`` (absent or ``None``:
    no step, as the optimizer skips a parameter whose ``.grad`` is ``None``)."""
    if gradients is None:
        return {id(p): p.grad for p in owned if p.grad is not None}
    gradients = list(gradients)
    if len(gradients) != len(selected) or any(
        g is not None and g.shape != p.shape for g, p in zip(gradients, selected, strict=True)
    ):
        raise ValueError("gradients must hold one tensor per parameter, shaped like it")
    return {id(p): g for p, g in zip(selected, gradients, strict=True) if g is not None}


def _clip_coefficient(
    grads: Sequence[torch.Tensor],
    max_norm: float,
    total: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``clip_grad_norm_``'s factor min(1, max_norm / (norm + 1e-6)), without touching grads."""
    if total is None:
        norms = [torch.linalg.vector_norm(g).to(grads[0].device) for g in grads]
        total = torch.linalg.vector_norm(torch.stack(norms))
    total = torch.as_tensor(total, device=grads[0].device)
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
    grad = _adam_gradient(group, param, grad, decoupled)
    exp_avg = _moment(state, "exp_avg", param).lerp(grad, 1 - beta1)
    step = float(state.get("step", 0)) + 1
    denom = _adam_next_denominator(group, state, param, grad)
    update = (exp_avg / denom).mul_(lr / (1 - beta1**step))
    if weight_decay != 0 and decoupled:
        # AdamW scales theta by (1 - lr * wd) before the Adam step: lr * wd * theta of the step.
        update.add_(param, alpha=lr * weight_decay)
    return update


def _adam_gradient(
    group: dict[str, Any], param: torch.Tensor, grad: torch.Tensor, decoupled: bool
) -> torch.Tensor:
    """The gradient both Adam moments see, as torch forms it: negated for ``maximize``, then
    with the coupled weight decay added (AdamW's decoupled decay acts on theta instead)."""
    if group["maximize"]:
        grad = -grad
    if group["weight_decay"] != 0 and not decoupled:
        grad = grad.add(param, alpha=group["weight_decay"])
    return grad


def _adam_next_denominator(
    group: dict[str, Any], state: dict[str, Any], param: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """The denominator of the next Adam step on ``grad``, as :func:`_adam_gradient` forms it."""
    beta2 = float(group["betas"][1])
    exp_avg_sq = _moment(state, "exp_avg_sq", param).mul(beta2)
    exp_avg_sq.addcmul_(grad, grad, value=1 - beta2)
    if group["amsgrad"]:
        exp_avg_sq = torch.maximum(_moment(state, "max_exp_avg_sq", param), exp_avg_sq)
    step = float(state.get("step", 0)) + 1
    return adam_denominator(exp_avg_sq, step, beta2, group["eps"])


def _moment(state: dict[str, Any], key: str, param: torch.Tensor) -> torch.Tensor:
    """A moment from the state, or the zeros torch starts it from before the first step."""
    value = state.get(key)
    return torch.zeros_like(param, memory_format=torch.preserve_format) if value is None else value


def _decoupled(optimizer_type: type, group: dict[str, Any]) -> bool:
    # Older torch has no decoupled_weight_decay key: there AdamW is a class of its own.
    return issubclass(optimizer_type, torch.optim.AdamW) or bool(
        group.get("decoupled_weight_decay")
    )


def _adam_rule(optimizer_type: type) -> Callable[..., torch.Tensor]:
    def rule(
        group: dict[str, Any], state: dict[str, Any], param: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        return _adam_step(group, state, param, grad, _decoupled(optimizer_type, group))

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
    unit_rates: list[float] | None,
    rate_scale: float = 1.0,
) -> dict[int, torch.Tensor]:
    """Each parameter's step, taken by a deep copy of the optimizer on shadow parameters.

    The deep copy's memo maps every real parameter to its shadow (a clone carrying a clipped
    copy of its gradient), so the copied groups, state and any attribute of the optimizer's own
    (a list of parameters, a step counter) refer to the shadows or to copies. ``step`` is called
    through the class, bypassing instance patches such as the LR scheduler's call counter, with
    the copy's own step hooks removed (they belong to the training loop) and every RNG forked.
    Afterwards the real optimizer is checked to be untouched.

    On sharded parameters every rank makes the same collectives whatever happens locally: a
    rank whose copy fails says so in an all-reduce before anyone raises, so no rank is left
    waiting in a collective the failing one never reaches.
    """
    owned = _owned(optimizer)
    shadows = {}
    for p in owned:
        shadow = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        if id(p) in grad_of:
            shadow.grad = _clipped(grad_of[id(p)], coef).clone()
        shadows[id(p)] = shadow
    sharded = is_sharded(owned)
    failure = None
    try:
        _step_a_copy(optimizer, owned, shadows, unit_rates, rate_scale)
    except Exception as error:
        if sharded:
            failure = error
        elif isinstance(error, (DirectionUnavailable, _RealOptimizerChanged)):
            raise
        else:
            # a step that needs what a copy is not given (LBFGS's closure): no direction,
            # which the measures that read one record, while the others are taken
            raise DirectionUnavailable(
                f"{type(optimizer).__name__}.step() failed on a copy "
                f"({type(error).__name__}: {error})"
            ) from error
    if sharded:
        _raise_if_any_rank_failed(optimizer, owned, failure)
    if not _moved_any(owned, shadows, sharded):
        raise DirectionUnavailable(
            f"a copy of {type(optimizer).__name__} did not move any parameter with a gradient: "
            "it keeps its parameters where a copy cannot redirect them (tensors other than "
            "the Parameter objects of param_groups)"
        )
    return {id(p): p.detach().to(dtype) - shadows[id(p)].detach().to(dtype) for p in owned}


class _RealOptimizerChanged(RuntimeError):
    """Stepping a copy wrote the real optimizer or its parameters."""


def _step_a_copy(
    optimizer: torch.optim.Optimizer,
    owned: Sequence[nn.Parameter],
    shadows: dict[int, nn.Parameter],
    unit_rates: list[float] | None,
    rate_scale: float = 1.0,
) -> None:
    """Step a deep copy of ``optimizer`` whose parameters are the shadows.

    Raises DirectionUnavailable when no copy can be made, :class:`_RealOptimizerChanged` when
    the real optimizer or its parameters were written (checked even when the step failed), and
    otherwise whatever the copy's step raises.
    """
    before = _fingerprint((optimizer, [p._version for p in owned]))
    # Through __dict__: Optimizer.__getstate__ keeps only defaults, state and param_groups, so a
    # deepcopy would drop the optimizer's own attributes, and its __setstate__ writes into the
    # defaults (which copy.copy would share with the real optimizer).
    copied = object.__new__(type(optimizer))
    try:
        copied.__dict__ = copy.deepcopy(optimizer.__dict__, dict(shadows))
    except Exception as error:
        raise DirectionUnavailable(
            f"{type(optimizer).__name__} cannot be deep-copied ({type(error).__name__}: "
            f"{error}), so its update cannot be computed without stepping it"
        ) from error
    copied._optimizer_step_pre_hooks = OrderedDict()
    copied._optimizer_step_post_hooks = OrderedDict()
    if unit_rates or rate_scale != 1.0:
        rates = unit_rates or [group["lr"] for group in copied.param_groups]
        for group, rate in zip(copied.param_groups, rates, strict=True):
            group["lr"] = rate * rate_scale
    try:
        with fork_rng(owned):
            type(optimizer).step(copied)
    finally:
        if _fingerprint((optimizer, [p._version for p in owned])) != before:
            raise _RealOptimizerChanged(
                f"{type(optimizer).__name__}.step() on a deep copy changed the real optimizer "
                "or its parameters: it reaches them through something a copy shares"
            )


def _raise_if_any_rank_failed(
    optimizer: torch.optim.Optimizer,
    owned: Sequence[nn.Parameter],
    failure: Exception | None,
) -> None:
    """Sum a failure flag over the ranks (every rank calls this); raise on every rank if any
    rank's copy failed: this rank's own error, or DirectionUnavailable naming another rank."""
    flag = torch.tensor(float(failure is not None), device=local(owned[0]).device)
    failed = int(float(all_reduce_sum(flag)))
    if failure is None:
        if failed:
            raise DirectionUnavailable(
                f"another rank failed to step a copy of {type(optimizer).__name__} ({failed} "
                "rank(s)), so no rank has the update direction"
            )
        return
    if isinstance(failure, (DirectionUnavailable, _RealOptimizerChanged)):
        raise failure
    raise DirectionUnavailable(
        f"{type(optimizer).__name__}.step() failed on a copy ({type(failure).__name__}: "
        f"{failure}), so its update cannot be computed without stepping it"
    ) from failure


def _owned(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The optimizer's parameters, group by group, in each group's order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _rates_are_knobs(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step at other rates can be tried to check that the step scales with them: the
    groups' rates are what the step uses (not Adafactor's relative step, linear in its own
    rate by construction)."""
    return not any(group.get("relative_step") for group in optimizer.param_groups)


def _check_proportional(
    optimizer: torch.optim.Optimizer,
    steps: dict[int, torch.Tensor],
    halves: dict[int, torch.Tensor],
) -> None:
    """Raise :class:`DirectionUnavailable` unless the step at half the rates is half the step,
    to ``PROPORTIONAL`` of the step beyond what storing the parameters can round (each step is
    a difference of stored parameters, so ``s - 2 s_half`` is off by at most 1.5 epsilons of
    each parameter): otherwise a step along d at rate c * lr0 is no step the optimizer would
    take at that rate, and d per unit rate means nothing (schedule-free AdamW, whose averaging
    does not scale with the rate; torch's Adafactor once its rate is above 1/sqrt(t))."""
    params = _owned(optimizer)
    device = local(params[0]).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for p in params:
        step, half = local(steps[id(p)]).double(), local(halves[id(p)]).double()
        stored = local(p).detach().double() * torch.finfo(p.dtype).eps
        sums += torch.stack(
            [(step - 2 * half).square().sum(), step.square().sum(), stored.square().sum()]
        )
    if is_sharded(params):
        sums = all_reduce_sum(sums)
    off, size, rounding = (float(x) for x in sums.sqrt())
    if size > 0 and off > PROPORTIONAL * size + 1.5 * rounding:
        raise DirectionUnavailable(
            f"{type(optimizer).__name__}'s step does not scale with its learning rate (at half "
            f"the rate it is off half the step by {off / size:.0%} of the step): the update "
            "has no direction per unit rate"
        )


def _moved_any(
    owned: Sequence[nn.Parameter], shadows: dict[int, nn.Parameter], sharded: bool
) -> bool:
    """Whether the shadow step moved a parameter that has a non-zero gradient (or none has
    one), decided over all ranks of a sharded model.

    When sharded, every rank takes part in one all-reduce of ``[has a gradient, moved]``, even a
    rank whose shards all have zero gradients.
    """
    with_gradient = [p for p in owned if _nonzero(shadows[id(p)].grad)]
    moved = sum(not bit_identical(local(shadows[id(p)]), local(p)) for p in with_gradient)
    if sharded:
        counts = torch.tensor(
            [float(bool(with_gradient)), float(moved)], device=local(owned[0]).device
        )
        has_gradient, moved = (float(x) for x in all_reduce_sum(counts))
        return has_gradient == 0 or moved > 0
    return not with_gradient or moved > 0


def _nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(local(grad).any())


def _fingerprint(value: Any, depth: int = 5) -> Any:
    """A structural summary of an object that changes when anything in it is written: tensor
    version counters, plain values, containers and instance attributes (to ``depth``)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), value._version)
    if isinstance(value, (int, float, str, bool, bytes, type(None))):
        return value
    if depth == 0:
        return ("object", id(value))
    if isinstance(value, dict):
        return tuple((_key(k), _fingerprint(v, depth - 1)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_fingerprint(v, depth - 1) for v in value)
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict) and not callable(value):
        return (type(value).__name__, _fingerprint(attributes, depth - 1))
    return ("object", id(value))


def _key(key: Any) -> Any:
    return ("tensor", id(key)) if isinstance(key, torch.Tensor) else key
