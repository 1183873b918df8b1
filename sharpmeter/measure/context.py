"""The measurement context: measure a model without changing its training.

Inside :func:`measurement` a model can be evaluated, differentiated twice and perturbed; on exit
its parameters, ``.grad`` tensors, ``requires_grad`` flags, buffers (BatchNorm running
statistics), public attributes and what they hold (a carried hidden state, running statistics
in a plain tensor or NumPy array, a generator's state), hooks, train/eval flags and the global
RNG streams (torch CPU and CUDA, Python's ``random``, NumPy) are exactly what they were on
entry (:mod:`sharpmeter.measure.state`). What a forward writes is also put back before every
measuring forward (:func:`rewind_open_measurements`), so that all the forwards of one
measurement evaluate the same function.

Three things the context switches on purpose while it is open:

* **Dropout policy.** ``dropout="eval"`` (default) measures the deterministic eval-mode network;
  ``dropout="train"`` keeps the model's own mode, and the operators then seed every forward
  with a fixed value so that each HVP and each line-search forward sees the same masks.
* **Attention backend.** Fused SDPA kernels (flash, memory-efficient, cuDNN) have no double
  backward and no forward-mode AD, so :func:`attention_guard` pins
  ``scaled_dot_product_attention`` to its math backend and moves Hugging Face models configured
  for flash attention to ``sdpa`` for the duration.
* **Gradient hooks.** The parameters' own hooks (``register_hook``,
  ``register_post_accumulate_grad_hook``) are suspended: they shape training's gradient, not the
  loss whose curvature is measured (:func:`sharpmeter.measure.state.parameter_hooks_suspended`).
* **Parametrizations.** Inside ``parametrize.cached()`` the cache is set aside: the measurement
  moves the parameters its weights were computed from.

Example::

    with sm.measurement(model):
        op = sm.HessianOperator(model, None, batch)
        top = sm.lanczos(op, k=1)
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parametrize

from sharpmeter.measure.distributed import local
from sharpmeter.measure.params import bit_identical, set_versions
from sharpmeter.measure.rng import fork_rng
from sharpmeter.measure.state import ModelState, parameter_hooks_suspended

DROPOUT_POLICIES = ("eval", "train")


@contextlib.contextmanager
def attention_guard(model: nn.Module) -> Iterator[None]:
    """Run attention through kernels that support double backward and forward-mode AD."""
    configs = _flash_configs(model)
    saved = [c._attn_implementation for c in configs]
    try:
        for config in configs:
            config._attn_implementation = "sdpa"
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for config, implementation in zip(configs, saved, strict=True):
            config._attn_implementation = implementation


def _flash_configs(model: nn.Module) -> list:
    """Hugging Face configs inside ``model`` whose attention is a flash-attention kernel."""
    configs: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        implementation = getattr(config, "_attn_implementation", None)
        if isinstance(implementation, str) and "flash" in implementation:
            configs[id(config)] = config
    return list(configs.values())


class ParametersWrittenError(RuntimeError):
    """Something inside the measurement other than the estimators (the model's own forward:
    RWKV's eval-mode rescaling, an ``nn.Embedding(max_norm=...)``; a user's code inside
    :func:`measurement`) wrote the model's parameters in place."""


@dataclass
class ParameterGuard:
    """What tells whether parameters were written inside a measurement, and, when ``copies``
    were taken, puts them back.

    The estimators that move parameters put back their values bit for bit and their version
    counters, so a parameter whose version counter (where torch lets it be put back: not a
    ``DTensor``'s) or whose sum in float64 (this rank's shard) differs on exit was written by
    something else. A copy of every parameter is taken on the CPU, where it costs no
    accelerator memory (host memory the size of the model, per process, while it is held):
    :class:`~sharpmeter.SharpnessMeter` takes one until a measurement in the same mode has shown
    that the model's forwards leave its parameters alone, and for every measurement of a model
    that does not.
    """

    named: list[tuple[str, nn.Parameter]]
    fingerprints: list[tuple[int | None, float]]
    copies: list[torch.Tensor] | None
    rewrote: bool = False  # a parameter was written in place, whether or not its value moved

    @classmethod
    def capture(cls, model: nn.Module, copy: bool) -> ParameterGuard:
        named = list(model.named_parameters())
        copies = [local(p).detach().to("cpu", copy=True) for _, p in named] if copy else None
        return cls(named, _fingerprints(named), copies)

    def settle(self) -> ParametersWrittenError | None:
        """Put back what was written since :meth:`capture` (values from the copies, if any, and
        version counters), and say so as an error where a value moved; None where nothing did
        (a write of the same value, as a renormalisation of rows already within their norm,
        only sets :attr:`rewrote`)."""
        after = _fingerprints(self.named)
        touched = [
            i for i, (a, b) in enumerate(zip(self.fingerprints, after, strict=True)) if _moved(a, b)
        ]
        self.rewrote = bool(touched)
        if not touched:
            return None
        if self.copies is None:
            moved = touched
            outcome = "training has changed: they are not put back (no copy was taken)"
        else:
            moved = [
                i for i in touched if not bit_identical(self.copies[i], local(self.named[i][1]))
            ]
            with torch.no_grad():
                for i in moved:
                    shard = local(self.named[i][1])
                    shard.copy_(self.copies[i].to(shard.device))
            outcome = "they are put back, and the values measured meanwhile are not reported"
        counted = [i for i in touched if self.fingerprints[i][0] is not None]
        set_versions(
            [self.named[i][1] for i in counted], [self.fingerprints[i][0] for i in counted]
        )
        if not moved:
            return None
        names = ", ".join(self.named[i][0] for i in moved[:3])
        more = f" and {len(moved) - 3} more" if len(moved) > 3 else ""
        return ParametersWrittenError(
            f"parameters were written in place during the measurement, not by its estimators "
            f"({names}{more}): {outcome}. The model's forward may rewrite them (RWKV rescales its "
            "weights in eval mode: measure it in train mode with dropout='train'; an "
            "nn.Embedding with max_norm renormalises the rows it looks up)"
        )


def _fingerprints(named: list[tuple[str, nn.Parameter]]) -> list[tuple[int | None, float]]:
    """Per parameter: its version counter (None for a ``DTensor``, whose counter the
    estimators cannot put back) and its sum in float64 (this rank's shard)."""
    with torch.no_grad():
        return [
            (
                None if local(p) is not p else p._version,
                float(local(p).detach().sum(dtype=torch.float64)),
            )
            for _, p in named
        ]


def _moved(before: tuple[int | None, float], after: tuple[int | None, float]) -> bool:
    (version, total), (version_after, total_after) = before, after
    same_sum = total == total_after or (math.isnan(total) and math.isnan(total_after))
    return version != version_after or not same_sum


# The states captured by the measurements open now, innermost last.
_open_states: ContextVar[tuple[ModelState, ...]] = ContextVar("open_states", default=())


def rewind_open_measurements() -> None:
    """Before a measuring forward, put back what a forward writes (buffers, attributes, a
    model's own generators: :meth:`ModelState.rewind`) as every open measurement found it on
    entry, outermost first. Each forward then starts from the state the next training forward
    would, not from the one the previous measuring forward left (a carried hidden state moved
    every line-search step onto another function: critical sharpness came out 5.5% low)."""
    for state in _open_states.get():
        state.rewind()


@contextlib.contextmanager
def hessian_guard(model: nn.Module) -> Iterator[None]:
    """What every pass of a Hessian-vector product runs under, inside a measurement or not:
    :func:`attention_guard`, none of the parameters' gradient hooks
    (:func:`parameter_hooks_suspended`), and parametrized weights computed afresh
    (:func:`parametrizations_uncached`)."""
    with (
        attention_guard(model),
        parameter_hooks_suspended(model.parameters()),
        parametrizations_uncached(),
    ):
        yield


@contextlib.contextmanager
def parametrizations_uncached() -> Iterator[None]:
    """Compute parametrized weights (``orthogonal``, ``spectral_norm``) in every forward, also
    inside the caller's ``torch.nn.utils.parametrize.cached()``: its cache holds a weight of the
    parameters as they were, which the line search moves, and whose graph the first backward
    frees (every measure was an error). The caller's cache is put back on exit: the parameters
    are too, so its weights hold again."""
    saved = parametrize._cache_enabled, parametrize._cache
    parametrize._cache_enabled, parametrize._cache = 0, {}
    try:
        yield
    finally:
        parametrize._cache_enabled, parametrize._cache = saved


@contextlib.contextmanager
def measurement(
    model: nn.Module, dropout: str = "eval", copy_parameters: bool = False
) -> Iterator[ParameterGuard]:
    """Open a measurement on ``model``; everything but the parameters is restored on exit.

    Parameters are not copied here unless ``copy_parameters`` (a copy of the model, on the CPU):
    the estimators that move them (critical sharpness, finite differences) restore them by copy
    and check. A parameter written otherwise inside the block (the model's own forward, or the
    caller's code; see :class:`ParameterGuard`) raises :class:`ParametersWrittenError` on exit,
    after it is put back from the copy if there is one; the block gets the
    :class:`ParameterGuard`, whose ``rewrote`` says on exit whether a parameter was written at
    all.
    ``.grad`` tensors are kept by reference: the operators differentiate with
    ``torch.autograd.grad``, which never accumulates into ``.grad``, and the FSDP2 gradient,
    which must go through ``.grad``, puts every ``.grad`` back itself.
    Every measuring forward starts from the buffers and attributes the model had on entry: set
    the model up before opening the block, not inside it.
    """
    if dropout not in DROPOUT_POLICIES:
        raise ValueError(f"dropout must be one of {DROPOUT_POLICIES}, got {dropout!r}")
    state = ModelState.capture(model)
    guard = ParameterGuard.capture(model, copy=copy_parameters)
    opened = _open_states.set((*_open_states.get(), state))
    try:
        with (
            fork_rng(model.parameters()),
            hessian_guard(model),
        ):
            if dropout == "eval":
                model.eval()
            yield guard
    finally:
        _open_states.reset(opened)
        try:
            state.restore(model)
        finally:
            _raise_unless_failing(guard.settle())


def _raise_unless_failing(error: ParametersWrittenError | None) -> None:
    """Raise ``error``, or, inside an exception already on its way (an interrupt, a failed
    collective, a non-finite loss), add it to that one's notes instead of replacing it."""
    if error is None:
        return
    failing = sys.exc_info()[1]
    if failing is None:
        raise error
    failing.add_note(str(error))
