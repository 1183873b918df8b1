"""Every random stream a training loop may draw from, forked and put back.

Training code draws from torch's CPU and CUDA generators, Python's ``random`` and NumPy's
global generator (Hugging Face collators mask with torch, user code often shuffles with the
other two). Anything sharpmeter does beside training runs inside :func:`fork_rng`, so the next
draw of training is the one it would have been without us.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator

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
