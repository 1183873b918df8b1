"""Every random stream a training loop may draw from, forked and put back.

Training code draws from torch's CPU and CUDA generators, Python's ``random`` and NumPy's
global generator (Hugging Face collators mask with torch, user code often shuffles with the
other two). Anything sharpmeter does beside training runs inside :func:`fork_rng`, so the next
draw of training is the one it would have been without us. A model may also own a generator
(drop-path masks drawn from a ``torch.Generator`` attribute): :class:`GeneratorState` keeps
its state, for the measurement context to set back.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sharpmeter.measure.params import cuda_device_indices


@contextlib.contextmanager
def fork_rng(tensors: Iterable[torch.Tensor] = ()) -> Iterator[None]:
    """Restore torch (CPU and the CUDA devices of ``tensors``), ``random`` and NumPy on exit."""
    python_state = random.getstate()
    numpy_random = _numpy_random()
    numpy_state = numpy_random.get_state() if numpy_random is not None else None
    try:
        with torch.random.fork_rng(devices=cuda_device_indices(tensors)):
            yield
    finally:
        random.setstate(python_state)
        if numpy_random is not None:
            numpy_random.set_state(numpy_state)


def _numpy_random():
    try:
        import numpy
    except ImportError:  # torch runs without NumPy, so do we
        return None
    return numpy.random


def seed_every_stream(seed: int) -> None:
    """Seed torch (CPU and CUDA), ``random`` and NumPy: a forward that draws from any of them
    (dropout from torch, a LayerDrop from ``random``) draws the same in every evaluation."""
    torch.manual_seed(seed)
    random.seed(seed)
    numpy_random = _numpy_random()
    if numpy_random is not None:
        numpy_random.seed(seed)


@dataclass
class GeneratorState:
    """A generator's state, to set it back to with :meth:`put_back`."""

    generator: Any
    state: Any

    @classmethod
    def of(cls, value: Any) -> GeneratorState | None:
        """The state of ``value`` if it is a generator (``torch.Generator``, ``random.Random``,
        NumPy's ``Generator`` or ``RandomState``), else None."""
        accessors = _state_accessors(value)
        return None if accessors is None else cls(value, accessors[0]())

    def put_back(self) -> None:
        # always set, never compared: NumPy's states hold arrays, and setting one is cheap
        _state_accessors(self.generator)[1](self.state)


def _state_accessors(value: Any) -> tuple[Callable[[], Any], Callable[[Any], None]] | None:
    """The getter and setter of a generator's state; None for anything else (a
    ``random.SystemRandom`` has no state to keep)."""
    if isinstance(value, torch.Generator):
        return value.get_state, value.set_state
    if isinstance(value, random.Random) and not isinstance(value, random.SystemRandom):
        return value.getstate, value.setstate
    numpy_random = sys.modules.get("numpy.random")  # not imported: no NumPy generator exists
    if numpy_random is None:
        return None
    if isinstance(value, numpy_random.Generator):
        bits = value.bit_generator
        return (lambda: bits.state), (lambda state: setattr(bits, "state", state))
    if isinstance(value, numpy_random.RandomState):
        return value.get_state, value.set_state
    return None
