r"""The probe loss: what every curvature quantity differentiates.

A *batch* is whatever the model is called with: a mapping (``model(**batch)``, the Hugging Face
convention), a tuple of tensors (``model(*batch)``) or one tensor (``model(batch)``). A *probe* is
one batch or a ``list`` of batches. Its loss is the loss-token-weighted mean

.. math:: L(\theta) = \sum_b w_b L_b(\theta), \qquad w_b = n_b / \textstyle\sum_c n_c,

where :math:`L_b` is the mean loss over the loss tokens of batch :math:`b` and :math:`n_b` their
number, so that a multi-batch probe gives the same number as one concatenated batch.

``loss_fn(model, batch) -> scalar`` computes :math:`L_b`; ``loss_fn=None`` means the model's
output carries ``.loss`` (Hugging Face models called with ``labels=``). Losses are returned in
float32 or wider, whatever the model's dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sharpmeter.measure.context import rewind_open_measurements
from sharpmeter.measure.distributed import (
    all_reduce_sum,
    fsdp_modules,
    is_distributed,
    is_sharded,
    reshard,
    world_size,
)
from sharpmeter.measure.params import flatten, vector_dtype, zeros_for_unused
from sharpmeter.measure.rng import fork_rng, seed_every_stream
from sharpmeter.measure.state import parameter_hooks_suspended

LossFn = Callable[[nn.Module, Any], torch.Tensor]

IGNORE_INDEX = -100


class MicroBatches(list):
    """The micro-batches of one training step, as the training loop gave them (each whole, a
    bare tensor too): a list :func:`split_probe` never mistakes for one batch of tensors."""


def split_probe(batch: Any) -> list[Any]:
    """One batch -> ``[batch]``; a ``list`` of batches -> itself. Empty probes are rejected,
    and so is a list of bare tensors: it is what a ``DataLoader`` gives for one batch of a
    ``TensorDataset`` (``[x, y]``), and read as batches it would score ``x`` and ``y`` apart."""
    if isinstance(batch, MicroBatches):
        batches = list(batch)
    elif isinstance(batch, list):
        if batch and all(isinstance(item, torch.Tensor) for item in batch):
            raise ValueError(
                f"the probe is a list of {len(batch)} tensors, which reads as {len(batch)} "
                "batches: pass tuple(batch) for one batch such as a DataLoader's [inputs, "
                "targets], or a list of tuples or mappings for several batches"
            )
        batches = batch
    else:
        batches = [batch]
    if not batches:
        raise ValueError("the probe holds no batch")
    return batches


def move_to(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, mapping such as a collator's ``BatchEncoding``, tuple or list of
    batches) with every tensor on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def call_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` the way the batch says: ``**mapping``, ``*tuple`` or a single tensor."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def output_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default ``loss_fn``: the ``.loss`` (or ``["loss"]``) of the model's output."""
    out = call_model(model, batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError(
            "the model's output has no .loss: pass loss_fn=(model, batch) -> loss, "
            "or put labels in the batch of a Hugging Face model"
        )
    return loss


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross entropy of a causal LM in the model's own dtype, ignoring labels -100.

    The same loss as a Hugging Face causal LM's ``labels=``, which is computed in float32
    even for a float64 model: pass this as ``loss_fn`` where float64 exactness matters.
    """
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def loss_token_count(batch: Any, shift: bool = True) -> int:
    """Number of loss tokens in a batch, the weight of a batch in a multi-batch probe.

    With ``labels`` in a mapping batch: labels other than -100, after the one-token shift of a
    causal language model when labels are 2-D (``labels[:, 1:]``) and ``shift`` (see
    :func:`shifts_labels`). Otherwise the batch size (the leading dimension of the first tensor).
    Pass ``weights=`` to the operator for anything else.
    """
    if isinstance(batch, Mapping) and isinstance(batch.get("labels"), torch.Tensor):
        labels = batch["labels"]
        counted = labels[:, 1:] if shift and labels.dim() >= 2 else labels
        return int((counted != IGNORE_INDEX).sum())
    first = batch if isinstance(batch, torch.Tensor) else _first_tensor(batch)
    return int(first.shape[0]) if first.dim() else 1


def shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss scores ``labels[:, 1:]``, a causal LM's next tokens.

    A Hugging Face model says so by its loss function (``ForCausalLMLoss``; a masked LM, token
    classification, ...) and its config (an encoder-decoder such as T5 scores every label of its
    decoder). Any other model is taken for a causal LM, whose labels are its inputs.
    """
    model = getattr(model, "module", model)  # DistributedDataParallel
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    loss_function = getattr(model, "loss_function", None)
    loss_function = getattr(loss_function, "func", loss_function)  # a functools.partial
    return loss_function is None or getattr(loss_function, "__name__", "") == "ForCausalLMLoss"


def _first_tensor(batch: Any) -> torch.Tensor:
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError("cannot weight a batch without tensors: pass weights=")


def wide_loss(loss: torch.Tensor) -> torch.Tensor:
    """Check that a loss is a scalar and promote it to float32 or wider."""
    if loss.numel() != 1:
        raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
    return loss.reshape(()).to(torch.promote_types(loss.dtype, torch.float32))


class ProbeLoss:
    """The weighted loss of a fixed probe, batch by batch.

    Args:
        model: the module to evaluate.
        loss_fn: ``(model, batch) -> scalar`` or ``None`` for ``output.loss``.
        batch: one batch or a list of batches.
        weights: one weight per batch (normalised to sum 1); default: loss-token counts.
        seed: when not ``None``, every forward runs with the global RNG seeded to this value
            (inside ``fork_rng``, so the caller's RNG stream is untouched) and a model in train
            mode sees the same dropout masks at every evaluation.
        distributed: this rank holds a shard of the probe (default: inside a process group of
            more than one rank). Weights are then over the global loss-token count and
            :meth:`reduce` sums a quantity over ranks (see :mod:`sharpmeter.measure.distributed`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        batch: Any,
        weights: Sequence[float] | None = None,
        seed: int | None = 0,
        distributed: bool | None = None,
    ) -> None:
        self.model = model
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else output_loss
        self.batches = split_probe(batch)
        self.distributed = is_distributed() if distributed is None else distributed
        self.weights = _normalised_weights(
            self.batches, weights, self.distributed, shifts_labels(model)
        )
        self.seed = seed
        self.fsdp_modules = fsdp_modules(model)
        # The largest epsilon of the losses loss_fn returned, before widening, and of the
        # floating outputs of the model's leaf modules in the first forward: how coarsely the
        # loss and the network compute (0 until a forward shows it).
        self.loss_eps = 0.0
        self.compute_eps = 0.0
        self._watched = False

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum this rank's share over ranks (identity for a probe held whole)."""
        return all_reduce_sum(tensor) if self.distributed else tensor

    def batch_loss(self, index: int, model: nn.Module | None = None) -> torch.Tensor:
        """Loss of batch ``index`` (float32 or wider), with the fixed RNG seed if one is set
        (in every stream a forward may draw from, each put back after it), from the state the
        open measurements found the model in (:func:`rewind_open_measurements`)."""
        target = self.model if model is None else model
        batch = self.batches[index]
        rewind_open_measurements()
        with contextlib.ExitStack() as stack:
            if self.seed is not None:
                stack.enter_context(fork_rng(self.model.parameters()))
                seed_every_stream(self.seed)
            loss = self.loss_fn(target, batch)
        if loss.is_floating_point():
            self.loss_eps = max(self.loss_eps, torch.finfo(loss.dtype).eps)
        return wide_loss(loss)

    @contextlib.contextmanager
    def _watching_outputs(self) -> Iterator[None]:
        """Record in ``compute_eps`` the coarsest floating output of the model's leaf modules
        (bf16 weights, autocast inside ``forward``, FSDP's ``param_dtype``), a compiled model
        run eagerly for it (its compiled graph would not call hooks added after it)."""

        def watch(_module: nn.Module, _inputs: Any, output: Any) -> None:
            for tensor in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    self.compute_eps = max(self.compute_eps, torch.finfo(tensor.dtype).eps)

        leaves = [m for m in self.model.modules() if next(m.children(), None) is None]
        handles = [leaf.register_forward_hook(watch) for leaf in leaves]
        try:
            with _eager():
                yield
        finally:
            self._watched = True
            for handle in handles:
                handle.remove()

    def _watch_apart(self, model: nn.Module | None) -> None:
        """For a compiled model, watch an eager forward of the first batch whose loss is thrown
        away: the measured forwards must all run compiled, since a compiled graph draws other
        dropout masks than eager code under the same seed (one eager forward among compiled
        ones put a different mask under the line search's base loss)."""
        with self._watching_outputs(), torch.no_grad():
            index, _ = self._weighed()[0]
            self.batch_loss(index, model)

    def _weighed(self) -> list[tuple[int, float]]:
        """The batches that enter the loss: a batch without loss tokens (a prompt-only
        micro-batch of completion-only training) has the mean loss 0/0 = NaN and weight 0, and
        is left out, unless the model is fully sharded (every rank must make every forward; the
        NaN then makes the row ``nonfinite``)."""
        every = list(enumerate(self.weights))
        return every if self.fsdp_modules else [(i, w) for i, w in every if w > 0]

    def _no_share(self, model: nn.Module | None) -> torch.Tensor:
        """The loss of a rank none of whose batches has a loss token (its data-parallel share
        of the probe is all prompt): 0, yet a graph over the parameters, so that its gradient
        and Hessian-vector products are 0 too (0 times their squared norm)."""
        params = (self.model if model is None else model).parameters()
        return 0.0 * sum(wide_loss(p.square().sum()) for p in params if p.requires_grad)

    def __call__(self, model: nn.Module | None = None) -> torch.Tensor:
        """The weighted probe loss :math:`\\sum_b w_b L_b` (keeps the autograd graph if enabled).

        ``model`` stands in for ``self.model`` (``torch.func.functional_call`` passes a wrapper).
        A fully sharded model is resharded afterwards, so the next forward reads the shards.
        """
        try:
            # Inside the caller's autocast region torch would reuse the low-precision weights
            # it cast before the parameters moved, and keep ours for the caller: no cache.
            with _autocast_cache(enabled=False):
                if not self._watched and _is_compiled(self.model) and self._weighed():
                    self._watch_apart(model)
                with self._watching_outputs() if not self._watched else contextlib.nullcontext():
                    weighed = self._weighed()
                    if not weighed:
                        return self._no_share(model)
                    return sum(w * self.batch_loss(i, model) for i, w in weighed)
        finally:
            # Also before a backward, which gathers the root's parameters once more: the price
            # of never leaving them gathered when the forward or the loss raises.
            reshard(self.fsdp_modules)


@contextlib.contextmanager
def _autocast_cache(enabled: bool) -> Iterator[None]:
    before = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(enabled)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(before)


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or one of its modules runs through ``torch.compile`` (wrapped in an
    ``OptimizedModule`` or compiled in place by ``Module.compile()``)."""
    return any(
        type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None)
        for m in model.modules()
    )


def _eager() -> contextlib.AbstractContextManager:
    """Run ``torch.compile``'d code eagerly inside (torch >= 2.6; before, as it is)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _normalised_weights(
    batches: list[Any], weights: Sequence[float] | None, distributed: bool, shift: bool
) -> list[float]:
    if weights is None and len(batches) == 1 and not distributed:
        return [1.0]  # nothing to weigh: the batch may hold no tensors at all
    raw = (
        [float(w) for w in weights]
        if weights is not None
        else [float(loss_token_count(b, shift)) for b in batches]
    )
    if len(raw) != len(batches):
        raise ValueError(f"got {len(raw)} weights for {len(batches)} batches")
    total = sum(raw)
    if distributed:
        total = float(all_reduce_sum(torch.tensor(total, dtype=torch.float64)))
    if any(w < 0 for w in raw) or not total > 0:
        raise ValueError(f"batch weights must be non-negative with a positive sum, got {raw}")
    return [w / total for w in raw]


def loss_and_gradient(
    probe: ProbeLoss, params: Sequence[torch.Tensor], create_graph: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The probe loss and its gradient per parameter (zeros where the loss does not depend on it).

    With ``create_graph`` the gradient keeps its graph for a second differentiation. The
    parameters' own gradient hooks do not run: this is the loss's gradient, not training's
    (:func:`~sharpmeter.measure.state.parameter_hooks_suspended`).
    """
    with torch.enable_grad(), parameter_hooks_suspended(params):
        loss = probe()
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return loss, zeros_for_unused(grads, params)


def probe_loss_and_gradient(
    probe: ProbeLoss, params: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe loss and flat gradient, detached and summed over ranks."""
    if is_sharded(params):
        return _sharded_loss_and_gradient(probe, params)
    loss, grads = loss_and_gradient(probe, params)
    gradient = flatten([g.detach() for g in grads], vector_dtype(params))
    return probe.reduce(loss.detach()), probe.reduce(gradient)


def _sharded_loss_and_gradient(
    probe: ProbeLoss, params: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The FSDP2 gradient, by ``backward()`` into ``.grad``, every ``.grad`` put back after.

    FSDP reduce-scatters the mean over ranks of their shares' gradients (its default divide
    factor); the shares already sum to the probe loss, so the mean times the world size is its
    gradient. Gradient sync must be on (after an optimizer step, as the callbacks measure):
    inside ``no_sync`` / ``set_requires_gradient_sync(False)`` FSDP would add the probe's
    gradient to the one being accumulated for training.
    """
    every_param = list(probe.model.parameters())
    saved = [p.grad for p in every_param]
    try:
        for p in every_param:
            p.grad = None
        with torch.enable_grad():
            loss = probe()
            loss.backward()
        grads = zeros_for_unused([p.grad for p in params], params)
        gradient = flatten(grads, vector_dtype(params))
    finally:
        for p, grad in zip(every_param, saved, strict=True):
            p.grad = grad
    scale = world_size() if probe.distributed else 1
    return probe.reduce(loss.detach()), gradient * scale
