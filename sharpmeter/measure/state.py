"""What a measurement puts back: the model's state beside its parameters.

A forward writes more than its output: BatchNorm's running statistics and spectral_norm's power
iteration vectors (buffers), a carried hidden state or a cached length (attributes), running
statistics kept in a plain tensor or NumPy array, the draws of a generator the model owns, a
one-shot hook that removes itself. :class:`ModelState` captures all of it when a measurement
opens. :meth:`ModelState.rewind` puts back what a forward writes before every measuring forward,
so that the forwards of one measurement (the base loss, each line-search step, the graph of the
HVPs) evaluate one function, the one the next training forward would; :meth:`ModelState.restore`
puts back everything on exit, ``.grad`` tensors, train/eval flags and hooks too.

Private attributes (``_...``: torch's and wrappers' own bookkeeping) are left alone.
"""

from __future__ import annotations

import contextlib
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from sharpmeter.measure.distributed import local
from sharpmeter.measure.params import bit_identical, set_versions
from sharpmeter.measure.rng import GeneratorState

# Containers whose entries a forward may change in place (a cache appended to, a dict of
# statistics): exact types only, since a subclass may refuse the in-place writes that put them
# back (a Hugging Face ModelOutput refuses update()).
CONTAINERS = (list, dict, set, OrderedDict, defaultdict)

# A module's own hooks, which a hook may remove (a data-dependent initialisation that runs once).
MODULE_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)

# A parameter's own gradient hooks: ``register_hook`` and ``register_post_accumulate_grad_hook``.
TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")


class Saved(Protocol):
    """Something captured that can be put back where it was taken from."""

    def put_back(self) -> None: ...


@dataclass
class SavedTensor:
    """A tensor's value and version counter."""

    tensor: torch.Tensor
    value: torch.Tensor
    version: int

    @classmethod
    def of(cls, tensor: torch.Tensor) -> SavedTensor:
        return cls(tensor, tensor.detach().clone(), tensor._version)

    def changed(self) -> bool:
        """Compared, not told by the version: batch norm's kernel writes its running statistics
        without counting a version."""
        return not bit_identical(self.tensor, self.value)

    def put_back(self) -> None:
        """Write back a value that changed, with its version counter; an unchanged one is not
        written, so that a graph the user built before the measurement still backpropagates."""
        if not self.changed():
            return
        with torch.no_grad():
            self.tensor.copy_(self.value)
        set_versions([self.tensor], [self.version])


@dataclass
class TensorSlot:
    """Where a module holds a tensor it may write in place (a buffer, or an attribute kept by
    value), with the tensor's value on entry."""

    holder: dict[str, Any]  # the module's ``_buffers`` or its ``__dict__``
    name: str
    saved: SavedTensor

    def rebind(self) -> None:
        """Hold a fresh copy of the entry value when the tensor has changed, leaving the written
        tensor to the graphs that saved it. Written back in place instead, a later forward's
        write would bring its version counter back to what an earlier graph saved, and that
        graph's backward would read the later value without a word (two probe batches, a
        forward that updates a gain in place before using it: a trace 67% high, ``ok``)."""
        if self.saved.changed():
            self.holder[self.name] = self.saved.value.clone()


@dataclass
class SavedEntries:
    """The entries of a list, dict or set (the objects themselves, not copies)."""

    container: list | dict | set
    entries: list | dict | set

    @classmethod
    def of(cls, container: list | dict | set) -> SavedEntries:
        return cls(container, container.copy())

    def put_back(self) -> None:
        """Refill the container in place (others hold it: a hook's handle holds its dict), and
        only where an entry changed."""
        if _same_entries(self.container, self.entries):
            return
        self.container.clear()
        if isinstance(self.container, list):
            self.container.extend(self.entries)
        else:
            self.container.update(self.entries)


def _same_entries(container: list | dict | set, entries: list | dict | set) -> bool:
    if isinstance(container, set):
        return container == entries
    if isinstance(container, dict):
        return list(container) == list(entries) and all(
            container[key] is value for key, value in entries.items()
        )
    return len(container) == len(entries) and all(
        a is b for a, b in zip(container, entries, strict=True)
    )


@dataclass
class SavedArray:
    """A NumPy array's values."""

    array: Any
    value: Any

    @classmethod
    def of(cls, array: Any) -> SavedArray:
        return cls(array, array.copy())

    def put_back(self) -> None:
        if self.array.tobytes() != self.value.tobytes():
            self.array[...] = self.value


@dataclass
class ModuleState:
    """One module's buffers (the objects it held), public attributes (by reference, the
    train/eval flag apart), what those hold (:func:`_saved_contents`) and its hooks."""

    module: nn.Module
    buffers: SavedEntries
    attributes: dict[str, Any]
    size: int  # how many attributes the module had, private ones included
    training: bool
    tensors: list[TensorSlot]
    contents: list[Saved]
    hooks: list[SavedEntries]

    @classmethod
    def capture(cls, module: nn.Module, shared: set[int]) -> ModuleState:
        attributes = _public_attributes(module)
        buffers = [
            TensorSlot(module._buffers, name, SavedTensor.of(b))
            for name, b in module._buffers.items()
            if b is not None
        ]
        held = {name: _saved_contents(value, shared) for name, value in attributes.items()}
        return cls(
            module=module,
            buffers=SavedEntries.of(module._buffers),
            attributes=attributes,
            size=len(vars(module)),
            training=module.training,
            tensors=buffers
            + [
                TensorSlot(vars(module), name, saved)
                for name, saved in held.items()
                if isinstance(saved, SavedTensor)
            ],
            contents=[
                saved
                for saved in held.values()
                if saved is not None and not isinstance(saved, SavedTensor)
            ],
            hooks=[
                SavedEntries.of(hooks)
                for name in MODULE_HOOKS
                if isinstance(hooks := module.__dict__.get(name), dict)
            ],
        )

    def rewind(self) -> None:
        """Before a measuring forward, put back what a forward writes: buffers and attributes
        (the objects first, then what those hold; a written tensor is replaced by a copy of its
        entry value, :meth:`TensorSlot.rebind`). The train/eval flag stays: the measurement
        sets it."""
        self._put_back_objects()
        for slot in self.tensors:
            slot.rebind()
        for saved in self.contents:
            saved.put_back()

    def restore(self) -> None:
        """Put back everything on exit: the objects, the entry values written into them (with
        their version counters), the train/eval flag and the hooks; the flag and the hooks even
        when writing a value back fails."""
        try:
            self._put_back_objects()
            for saved in (*(slot.saved for slot in self.tensors), *self.contents):
                saved.put_back()
        finally:
            self.module.training = self.training
            for hooks in self.hooks:
                hooks.put_back()

    def _put_back_objects(self) -> None:
        """The buffers and public attributes the module held, by reference; attributes a
        forward added are removed."""
        self.buffers.put_back()
        module_dict = vars(self.module)
        for name, value in self.attributes.items():
            if module_dict.get(name, _MISSING) is not value:
                module_dict[name] = value
        if len(module_dict) != self.size:  # looked for only then: this runs before every forward
            for name in _public_attributes(self.module).keys() - self.attributes.keys():
                del module_dict[name]  # added by a forward


_MISSING = object()


def _public_attributes(module: nn.Module) -> dict[str, Any]:
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_") and name != "training"
    }


def _saved_contents(value: Any, shared: set[int]) -> Saved | None:
    """What an attribute's ``value`` holds that a forward may change in place, kept so it can
    be put back.

    A tensor (running statistics kept without ``register_buffer``) is copied whole, as buffers
    are: after the fact a moved version counter would tell that it changed, but not what it
    held, and a value written through ``.data`` moves no counter at all. Left out are tensors
    that share memory with a parameter or a buffer (an attribute that views a weight moves with
    it along the line search; a buffer's alias, as Hugging Face's ``original_inv_freq``, is put
    back with the buffer) and tensors that require grad (computed from the parameters, put back
    by reference). The copies cost accelerator memory the size of the model's buffers and
    tensor attributes. None for what is kept by reference alone.
    """
    if isinstance(value, torch.Tensor):
        address = _storage_address(value)
        if value.requires_grad or address is None or address in shared:
            return None
        return SavedTensor.of(value)
    if type(value) in CONTAINERS:
        return SavedEntries.of(value)
    numpy = sys.modules.get("numpy")  # not imported: no array can exist
    if numpy is not None and isinstance(value, numpy.ndarray):
        return SavedArray.of(value)
    return GeneratorState.of(value)


def _storage_address(tensor: torch.Tensor) -> int | None:
    """Where a tensor's memory (its local shard's) lies; None for a tensor without storage."""
    with contextlib.suppress(RuntimeError, NotImplementedError):
        return local(tensor).untyped_storage().data_ptr()
    return None


@dataclass
class ModelState:
    """Everything a measurement could disturb beside the parameters, captured so it can be put
    back exactly: ``.grad`` tensors (by reference) and ``requires_grad`` flags, and every
    module's :class:`ModuleState`."""

    grads: list[torch.Tensor | None]
    requires_grad: list[bool]
    modules: list[ModuleState]

    @classmethod
    def capture(cls, model: nn.Module) -> ModelState:
        params = list(model.parameters())
        shared = {_storage_address(t) for t in (*params, *model.buffers())}
        return cls(
            grads=[p.grad for p in params],
            requires_grad=[p.requires_grad for p in params],
            modules=[ModuleState.capture(m, shared) for m in model.modules()],
        )

    def rewind(self) -> None:
        """Put back what a forward writes (:meth:`ModuleState.rewind`)."""
        for module in self.modules:
            module.rewind()

    def restore(self, model: nn.Module) -> None:
        """Put everything back; the modules' state even when something else cannot be."""
        try:
            for p, grad, flag in zip(
                model.parameters(), self.grads, self.requires_grad, strict=True
            ):
                p.grad = grad
                p.requires_grad_(flag)
        finally:
            for module in self.modules:
                module.restore()


@contextlib.contextmanager
def parameter_hooks_suspended(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Run without the parameters' own gradient hooks, put back on exit as they were (the same
    dicts, in the same order, so that their handles still remove them).

    The Hessian is of the loss: such hooks shape the training gradient (a clamp, a layer-wise
    scale, noise) and would run in every backward of a measurement, both of a double-backward
    product's (a ``grad * 0.5`` hook measured a quarter of the top eigenvalue); a
    post-accumulate-grad hook may step an optimizer. Torch reads the dicts at each backward, so
    emptying them in place is enough. The hooks data parallelism relies on are not these: DDP
    and FSDP hook the gradient accumulators and the modules.
    """
    held = [
        SavedEntries.of(hooks)
        for p in params
        for name in TENSOR_HOOKS
        if (hooks := getattr(p, name, None))
    ]
    for saved in held:
        saved.container.clear()
    try:
        yield
    finally:
        for saved in held:
            saved.put_back()
