r"""Hessian-vector products of a model's loss on a fixed probe batch.

:class:`HessianOperator` is the square operator :math:`H = \nabla^2_\theta L(\theta)` of the
probe loss (see :mod:`sharpmeter.measure.loss`) over the selected parameters, flattened in
``model.parameters()`` order. It never forms :math:`H`; ``op @ v`` returns :math:`Hv`:

``mode="double_backward"`` (default)
    :math:`Hv = \nabla_\theta (\nabla_\theta L \cdot v)`, as the vector-Jacobian product of the
    gradient with ``create_graph=True``. The gradient's graph is built once at construction and
    reused by every product on the fixed probe (``reuse_graph=False`` rebuilds it per product to
    save memory), so an HVP costs one extra backward pass.
``mode="fwd"``
    Forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``. (Never ``jacrev`` under
    ``jvp``/``vmap``: that composition is 5-18% wrong on LayerNorm with learnable affine
    parameters, pytorch issue 196700.) A loss through ``F.mse_loss`` with its mean reduction
    raises "ZeroTensors are immutable" in this mode (pytorch issue 123996, torch 2.13): write
    the squared error out, or use another mode (``tests/test_cases.py`` pins it).
``mode="fd"``
    Central differences of the gradient,
    :math:`Hv \approx (g(\theta + h v) - g(\theta - h v)) / 2h` with
    :math:`h = \epsilon^{1/3}\max(1, \lVert\theta\rVert) / \lVert v\rVert` and :math:`\epsilon`
    the machine epsilon of the parameters' dtype: error :math:`O(h^2)` from truncation plus
    :math:`O(\epsilon/h)` from rounding. Parameters are set by copy from a saved snapshot and
    restored the same way, never by add-then-subtract.

The Hessian is over the rows training moves. An embedding's ``padding_idx`` row (of an
``nn.Embedding`` or ``nn.EmbeddingBag``) always gets a zero gradient, so it is held fixed: the
operator is :math:`MHM`, with :math:`M` the projector that zeroes that row (the rows are
:attr:`HessianOperator.padding_rows`), exact also where the probe never holds the padding id
(the row's Hessian is then zero). Double backward masks the row in each backward, so it gives
:math:`MHM` by itself; ``fwd`` and ``fd`` move the row and give the Jacobian of the masked
gradient, :math:`MH`, which is not symmetric (Lanczos took it at a false residual and a 10%
larger top eigenvalue on Gemma, whose padding id 0 is a token). So every mode applies
:math:`M` on both sides, :math:`M(H(Mv))`, and the three give the same symmetric operator,
also for a weight tied to an output layer, whose gradient reaches the row (its update then
follows no symmetric Hessian; double backward alone would give another one there).

A matrix ``op @ V`` multiplies its columns one at a time, or, with ``products_per_call=k > 1``
(``double_backward`` only), ``k`` at a time in one backward through the same graph,
``torch.autograd.grad(..., is_grads_batched=True)`` (vmap over the columns): the same products
to rounding, at up to ``k`` times one product's backward memory. It can pay where one product
leaves the hardware idle (a GPU and a small probe, to be measured: ``benchmarks/gpu_checks.sh``).
On a CPU it does only on tiny models: ``k = 8`` takes 0.60x the speed per product on the 1M
GPT-2 and 0.46x on the 10M, at 4x and 3.6x the memory over the process's own, and is 3x faster
on a 1K one (``benchmarks/results/hvp.md``). Independent products (Hutchinson's probes,
Hutch++'s sketch) reach it as matrices; Lanczos' are sequential and stay single.

Attention runs through :func:`sharpmeter.measure.context.attention_guard` (SDPA math backend), so a
Hugging Face model with default (fused SDPA) attention works in every mode, and the parameters'
own gradient hooks are suspended (:func:`sharpmeter.measure.context.hessian_guard`), so that the
products are of the loss's Hessian, not of what the hooks make of its gradient.

Example::

    op = sm.HessianOperator(model, None, {"input_ids": x, "labels": x})
    hv = op @ torch.randn(op.dim)
    top = sm.lanczos(op, k=1)
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import BackwardCFunction, once_differentiable

from sharpmeter.measure.checks import check_positive_int
from sharpmeter.measure.context import hessian_guard
from sharpmeter.measure.distributed import NO_FSDP_HVP, is_sharded
from sharpmeter.measure.loss import LossFn, ProbeLoss, loss_and_gradient
from sharpmeter.measure.params import (
    ParameterVector,
    as_flat_vector,
    copy_into,
    flatten,
    num_elements,
    resolve_params,
    unflatten,
    vector_dtype,
    zeros_for_unused,
)

MODES = ("double_backward", "fwd", "fd")


def check_products_per_call(name: str, value: Any, mode_name: str, mode: str) -> None:
    """A ValueError unless ``value`` is a positive integer, and 1 unless ``mode`` is
    ``double_backward``, the one mode a batched product exists for."""
    check_positive_int(name, value)
    if value > 1 and mode != "double_backward":
        raise ValueError(f"{name} > 1 batches double backward: {mode_name} {mode!r} takes 1")


# Backward nodes whose own derivative torch does not give right, found in a gradient's graph:
# a custom autograd.Function marked @once_differentiable leaves a DelayedError node, which
# autograd.grad(..., allow_unused=True) prunes without a word instead of raising (its
# contribution to every product is silently dropped); the fused weight_norm kernel's double
# backward is wrong (its Hessian comes out asymmetric).
ONCE_DIFFERENTIABLE = "a custom autograd.Function marked @once_differentiable"
WRONG_SECOND_DERIVATIVE = {
    "Error": ONCE_DIFFERENTIABLE,
    "WeightNormInterfaceBackward0": "weight_norm's fused kernel, whose double backward is wrong",
}

# Every wrapper once_differentiable returns runs this one code object (a closure over the
# user's backward), whatever the backward is called: a marker that no renaming can hide.
_ONCE_DIFFERENTIABLE_CODE = once_differentiable(lambda ctx: None).__code__


def second_derivative_problem(
    loss: torch.Tensor, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> str | None:
    """Why double backward through the graph of ``grads`` (the gradient of ``loss`` with
    respect to ``params``, taken with ``create_graph=True``) would give wrong Hessian-vector
    products, or None."""
    found = _wrong_nodes_in_gradient_graph(grads)
    if _runs_once_differentiable_backward(loss, params):
        found.add(ONCE_DIFFERENTIABLE)
    if not found:
        return None
    return (
        f"the loss's graph holds {' and '.join(sorted(found))}: double-backward Hessian-vector "
        "products would be wrong; measure with hvp_mode='fd'"
    )


def _wrong_nodes_in_gradient_graph(grads: Sequence[torch.Tensor]) -> set[str]:
    """What the :data:`WRONG_SECOND_DERIVATIVE` nodes of the gradient's graph stand for."""
    seen: set[int] = set()
    stack = [g.grad_fn for g in grads if g.grad_fn is not None]
    found: set[str] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ in WRONG_SECOND_DERIVATIVE:
            found.add(WRONG_SECOND_DERIVATIVE[type(node).__name__])
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _runs_once_differentiable_backward(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    """Whether the gradient of ``loss`` with respect to ``params`` runs the backward of a
    custom autograd.Function marked @once_differentiable.

    That backward runs under ``no_grad``: whatever it computes from its saved tensors is a
    constant to the second differentiation, so its part of :math:`H` is lost. It leaves a
    DelayedError node in the gradient's graph only when its ``grad_output`` requires grad;
    as the loss's last operation (a fused cross-entropy) it gets the constant 1 and leaves
    nothing there, so the loss's own (forward) graph is searched: a Function's node counts
    where some parameter is reached from it (only then does its backward run).
    """
    if loss.grad_fn is None:
        return False
    return any(
        _marked_once_differentiable(node)
        for node in _nodes_reaching(loss.grad_fn, {id(p) for p in params})
    )


def _nodes_reaching(root: Any, targets: set[int]) -> list[Any]:
    """The nodes of the graph under ``root`` from which the AccumulateGrad node of a tensor
    whose ``id`` is in ``targets`` is reached: one post-order walk, each node once."""
    # Keyed by the nodes themselves, which keeps them alive: an id could be reused otherwise.
    reaches: dict[Any, bool | None] = {}  # None: entered, its inputs not all walked yet
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, inputs_walked = stack.pop()
        if not inputs_walked and node in reaches:
            continue
        inputs = [next_node for next_node, _ in node.next_functions if next_node is not None]
        if inputs_walked:
            is_target = id(getattr(node, "variable", None)) in targets
            reaches[node] = is_target or any(reaches[next_node] for next_node in inputs)
        else:
            reaches[node] = None
            stack.append((node, True))
            stack.extend((next_node, False) for next_node in inputs if next_node not in reaches)
    return [node for node, reached in reaches.items() if reached]


def _marked_once_differentiable(node: Any) -> bool:
    """Whether ``node`` is the node of a custom autograd.Function whose backward (or ``vjp``,
    which stands for it) is wrapped by ``once_differentiable``, under any further decorators."""
    if not isinstance(node, BackwardCFunction):
        return False
    function = node._forward_cls
    return any(_is_once_differentiable(f) for f in (function.backward, function.vjp))


def _is_once_differentiable(fn: Any) -> bool:
    """Whether ``fn``, or a function it wraps (``functools.wraps``), is once_differentiable's."""

    def runs_the_wrapper(f: Any) -> bool:
        return getattr(f, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE

    return runs_the_wrapper(inspect.unwrap(fn, stop=runs_the_wrapper))


def padding_rows(model: nn.Module, params: Sequence[nn.Parameter]) -> list[slice]:
    """Where, in a flat vector over ``params``, lie the rows that training never moves: row
    ``padding_idx`` of the weight of each ``nn.Embedding`` (or subclass) and
    ``nn.EmbeddingBag`` that sets one, since their backward always gives that row a zero
    gradient."""
    padding_of: dict[int, set[int]] = {}
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.padding_idx is not None:
            # a padding_idx set after construction may still be negative; torch counts it from
            # the end, as an index
            row = module.padding_idx % module.weight.shape[0]
            padding_of.setdefault(id(module.weight), set()).add(row)
    rows, offset = [], 0
    for p in params:
        for index in sorted(padding_of.get(id(p), ())):
            start = offset + index * p.shape[1]  # an (num_embeddings, dim) weight, row-major
            rows.append(slice(start, start + p.shape[1]))
        offset += p.numel()
    return rows


class NonFiniteLossError(ValueError):
    """The probe loss (or its gradient) is NaN or infinite, so no curvature can be measured."""


class HessianOperator:
    """The Hessian of the probe loss as a linear operator (``op @ v``).

    Args:
        model: the network; its parameters are never modified (``fd`` restores them exactly).
        loss_fn: ``(model, batch) -> scalar`` or ``None`` for the model output's ``.loss``.
        batch: one batch or a ``list`` of batches (weighted by loss-token count).
        params: the parameters to differentiate (default: all with ``requires_grad``).
        mode: ``"double_backward"`` (default), ``"fwd"`` or ``"fd"``.
        weights: per-batch weights of a multi-batch probe (default: loss-token counts).
        seed: RNG seed of every forward, so that a model in train mode sees the same
            dropout masks in each product; ``None`` leaves the global RNG alone.
        reuse_graph: keep the gradient's graph for all products (``double_backward`` only).
        fd_eps: relative step of ``mode="fd"`` (default: cube root of the dtype's epsilon).
        distributed: ``batch`` is this rank's shard of the probe; losses, gradients and
            products are summed over ranks (default: inside a process group of >1 rank).
        products_per_call: columns of a matrix ``op @ V`` multiplied in one batched backward
            (``double_backward`` only; 1: one at a time). Where a batched call fails (an
            operation vmap cannot batch, out of memory) the operator warns and goes on one
            column at a time; under ``distributed`` it raises instead, since the ranks would
            then disagree on the number of all-reduces.

    Attributes:
        dim: number of scalar parameters; ``shape == (dim, dim)``.
        num_matvecs: Hessian-vector products computed so far (a matrix counts its columns).
        padding_rows: slices of the flat vector held fixed, an embedding's ``padding_idx`` row
            each (see the module docstring): every product is :math:`M H M v`.
        loss: the probe loss at the parameters of the last build (float32 or wider).
        gradient: the probe gradient there, flat.

    The operator always applies the Hessian at the *current* parameters: when they were written
    in place since the graph was built, the next product rebuilds it (and ``loss``/``gradient``).

    Raises:
        ValueError: empty parameter list, unknown mode, bad weights, a model output without
            ``.loss`` and no ``loss_fn``, parameters sharded by FSDP.
        NonFiniteLossError: the probe loss or gradient is not finite.

    Example::

        op = sm.HessianOperator(model, None, batch, products_per_call=8)
        r = sm.hutchinson(op, num_matvecs=16)   # two batched backward calls of 8 products
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        batch: Any,
        params: Iterable[nn.Parameter] | None = None,
        mode: str = "double_backward",
        weights: Sequence[float] | None = None,
        seed: int | None = 0,
        reuse_graph: bool = True,
        fd_eps: float | None = None,
        distributed: bool | None = None,
        products_per_call: int = 1,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_products_per_call("products_per_call", products_per_call, "mode", mode)
        if fd_eps is not None and not fd_eps > 0:
            raise ValueError(f"fd_eps must be positive, got {fd_eps}")
        self.model = model
        self.mode = mode
        self.params = resolve_params(model, params)
        if is_sharded(self.params):
            raise ValueError(f"the parameters are sharded by FSDP: {NO_FSDP_HVP}")
        self.probe = ProbeLoss(
            model, loss_fn, batch, weights=weights, seed=seed, distributed=distributed
        )
        self.dim = num_elements(self.params)
        self.padding_rows = padding_rows(model, self.params)
        self.shape = (self.dim, self.dim)
        self.dtype = vector_dtype(self.params)
        self.device = self.params[0].device
        self.num_matvecs = 0
        self.fd_eps = fd_eps if fd_eps is not None else torch.finfo(self.dtype).eps ** (1 / 3)
        self.reuse_graph = mode == "double_backward" and reuse_graph
        self.products_per_call = products_per_call
        self._build()

    def _build(self) -> None:
        """Probe loss and gradient at the current parameters (and the graph, when reused)."""
        with hessian_guard(self.model):
            loss, grads = loss_and_gradient(self.probe, self.params, self.reuse_graph)
        self.loss = self.probe.reduce(loss.detach().clone())
        self.gradient = self.probe.reduce(flatten([g.detach() for g in grads], self.dtype))
        if not (torch.isfinite(self.loss) and torch.isfinite(self.gradient).all()):
            raise NonFiniteLossError(
                f"the probe loss or its gradient is not finite (loss = {self.loss.item()})"
            )
        self._graph_grads = grads if self.reuse_graph else None
        # told at the first product, so that the measures without one still stand
        self._problem = (
            second_derivative_problem(loss, grads, self.params) if self.reuse_graph else None
        )
        self._versions = self._param_versions()

    def _param_versions(self) -> list[int]:
        return [p._version for p in self.params]

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() == 2:
            if v.shape[0] != self.dim:
                raise ValueError(f"expected a ({self.dim}, k) matrix, got {tuple(v.shape)}")
            # Block by block at the current size, which a failed batched call sets to 1.
            columns, start = [], 0
            while start < v.shape[1]:
                block = v[:, start : start + self.products_per_call]
                columns.append(self._matmat(block))
                start += block.shape[1]
            return columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)
        return self.matvec(v)

    def _hold_padding_rows(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`Mv`: a copy of ``v`` (flat, or an ``(n, k)`` matrix) with the padding rows
        zeroed (see :func:`padding_rows`)."""
        if not self.padding_rows:
            return v
        held = v.clone()
        for rows in self.padding_rows:
            held[rows] = 0
        return held

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        """:math:`HV` for ``(n, k)`` ``V``, in one batched backward where ``k > 1``."""
        if block.shape[1] == 1:
            return self.matvec(block[:, 0])[:, None]
        block = self._hold_padding_rows(block.to(device=self.device, dtype=self.dtype))
        try:
            with hessian_guard(self.model):
                hv = self._hvp_double_backward(block)
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if self.probe.distributed:
                raise
            self.products_per_call = 1
            failure = str(error).splitlines()[0]
        else:
            self.num_matvecs += block.shape[1]
            return self.probe.reduce(self._hold_padding_rows(hv))
        # Out of the except block, whose traceback would keep the failed call's tangents alive.
        warnings.warn(
            f"batched Hessian-vector products failed ({failure}); multiplying one vector at a "
            "time from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return torch.stack([self.matvec(column) for column in block.T], dim=1)

    def matvec(self, v: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """:math:`Hv` for a flat vector (or a per-parameter list), returned flat."""
        v = self._hold_padding_rows(as_flat_vector(v, self.params, "v"))
        with hessian_guard(self.model):
            if self.mode == "double_backward":
                hv = self._hvp_double_backward(v)
            elif self.mode == "fwd":
                hv = self._hvp_forward_over_reverse(v)
            else:
                hv = self._hvp_finite_difference(v)
        self.num_matvecs += 1
        return self.probe.reduce(self._hold_padding_rows(hv))

    def _hvp_double_backward(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`Hv` for a flat ``v``; for an ``(n, k)`` matrix, its ``k`` products in one
        backward, vmapped over the columns."""
        if self.reuse_graph and self._param_versions() != self._versions:
            # Parameters were written in place (an optimizer step, a line search restoring them):
            # the saved graph is stale, so the operator follows the parameters, as fwd/fd do.
            self._build()
        grads = self._graph_grads
        if grads is None:
            loss, grads = loss_and_gradient(self.probe, self.params, create_graph=True)
            self._problem = second_derivative_problem(loss, grads, self.params)
        if self._problem is not None:
            raise ValueError(self._problem)
        batched = v.dim() == 2
        parts = _columns_per_parameter(v, self.params) if batched else unflatten(v, self.params)
        # Gradient entries that do not depend on the parameters (a loss linear in them) have no
        # graph; their Hessian rows are zero, and autograd refuses them as outputs.
        pairs = [(g, part) for g, part in zip(grads, parts, strict=True) if g.requires_grad]
        if not pairs:
            return torch.zeros(v.shape, dtype=self.dtype, device=self.device)
        outputs, tangents = zip(*pairs, strict=True)
        with torch.enable_grad():
            hv = torch.autograd.grad(
                outputs,
                self.params,
                grad_outputs=tangents,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )
        if batched:
            return _flat_columns(hv, self.params, v.shape[1], self.dtype)
        return flatten(zeros_for_unused(hv, self.params), self.dtype)

    def _hvp_forward_over_reverse(self, v: torch.Tensor) -> torch.Tensor:
        names = _parameter_names(self.model, self.params)
        loss_module = _LossModule(self.model, self.probe)

        def loss_of(values: tuple[torch.Tensor, ...]) -> torch.Tensor:
            swapped = {f"model.{name}": value for name, value in zip(names, values, strict=True)}
            return torch.func.functional_call(loss_module, swapped, ())

        primals = tuple(p.detach() for p in self.params)
        tangents = tuple(unflatten(v, self.params))
        _, hv = torch.func.jvp(torch.func.grad(loss_of), (primals,), (tangents,))
        return flatten(hv, self.dtype)

    def _hvp_finite_difference(self, v: torch.Tensor) -> torch.Tensor:
        norm_v = torch.linalg.vector_norm(v)
        if norm_v == 0:
            return torch.zeros_like(v)
        theta = [p.detach().clone() for p in self.params]
        versions = self._param_versions()
        norm_theta = torch.linalg.vector_norm(flatten(theta, self.dtype))
        h = self.fd_eps * max(1.0, norm_theta.item()) / norm_v.item()
        try:
            g_plus = self._gradient_at(theta, v, h)
            g_minus = self._gradient_at(theta, v, -h)
        finally:
            copy_into(self.params, theta, versions)
        return (g_plus - g_minus) / (2 * h)

    def _gradient_at(self, theta: list[torch.Tensor], v: torch.Tensor, h: float) -> torch.Tensor:
        shifted = [t + h * part for t, part in zip(theta, unflatten(v, self.params), strict=True)]
        copy_into(self.params, shifted)
        return flatten(loss_and_gradient(self.probe, self.params)[1], self.dtype)


class PreconditionedOperator:
    r"""The preconditioned Hessian :math:`P^{-1/2} H P^{-1/2}` for a diagonal :math:`P > 0`.

    Its top eigenvalue is the sharpness an adaptive optimizer sees: with Adam,
    :math:`P = \sqrt{\hat v} + \epsilon` (:func:`~sharpmeter.adam_preconditioner`). On a
    quadratic, with :math:`P` frozen, Adam's momentum :math:`\beta_1` makes the update a
    heavy-ball step, stable along the top direction while

    .. math:: \eta\,\lambda_{\max}(P^{-1}H) < \frac{2 + 2\beta_1}{1 - \beta_1}

    (38 at :math:`\beta_1 = 0.9`; 2 only without momentum), the threshold of Cohen et al.,
    "Adaptive gradient methods at the edge of stability". (:math:`P^{-1}H` and
    :math:`P^{-1/2} H P^{-1/2}` share their eigenvalues; the second is symmetric, so Lanczos
    applies.) One product costs one Hessian-vector product.

    ``diagonal`` is a flat vector over the operator's parameters, or a
    :class:`~sharpmeter.measure.params.ParameterVector` (read by parameter identity).
    """

    def __init__(self, operator: HessianOperator, diagonal: ParameterVector | torch.Tensor) -> None:
        if isinstance(diagonal, ParameterVector):
            diagonal = as_flat_vector(diagonal, operator.params, "the preconditioner")
        if diagonal.shape != (operator.dim,):
            raise ValueError(
                f"the preconditioner must be a flat vector of length {operator.dim}, "
                f"got shape {tuple(diagonal.shape)}"
            )
        if not bool((diagonal > 0).all() and torch.isfinite(diagonal).all()):
            raise ValueError("the preconditioner must be positive and finite")
        self.operator = operator
        self.inv_sqrt = diagonal.to(device=operator.device, dtype=operator.dtype).rsqrt()
        self.dim = operator.dim
        self.shape = operator.shape
        self.dtype = operator.dtype
        self.device = operator.device

    @property
    def num_matvecs(self) -> int:
        return self.operator.num_matvecs

    @property
    def products_per_call(self) -> int:
        return self.operator.products_per_call

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        scale = self.inv_sqrt if v.dim() == 1 else self.inv_sqrt[:, None]
        return scale * (self.operator @ (scale * v))


class _LossModule(nn.Module):
    """Wraps (model, probe) so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, probe: ProbeLoss) -> None:
        super().__init__()
        self.model = model
        self.probe = probe

    def forward(self) -> torch.Tensor:
        return self.probe(self.model)


def _columns_per_parameter(
    matrix: torch.Tensor, params: Sequence[nn.Parameter]
) -> list[torch.Tensor]:
    """An ``(n, k)`` matrix as one ``(k, *p.shape)`` tensor per parameter: the batched
    ``grad_outputs`` of ``is_grads_batched``."""
    rows = matrix.T
    parts, offset = [], 0
    for p in params:
        parts.append(rows[:, offset : offset + p.numel()].reshape(-1, *p.shape).to(p.dtype))
        offset += p.numel()
    return parts


def _flat_columns(
    per_parameter: Sequence[torch.Tensor | None],
    params: Sequence[nn.Parameter],
    columns: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The inverse of :func:`_columns_per_parameter`, with zeros where autograd gave ``None``."""
    rows = [
        torch.zeros(columns, p.numel(), dtype=dtype, device=p.device)
        if part is None
        else part.reshape(columns, -1).to(dtype)
        for part, p in zip(per_parameter, params, strict=True)
    ]
    # Contiguous: NCCL all-reduces only contiguous tensors.
    return torch.cat(rows, dim=1).T.contiguous()


def _parameter_names(model: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for p in params]
