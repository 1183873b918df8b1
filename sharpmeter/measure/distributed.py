"""Data-parallel measurement: every rank holds a shard of the probe, all get the same number.

Each rank weights its batches by its loss tokens over the *global* token count, so its probe
loss is its share of the global mean; summing shares (and their gradients, and the HVPs, which
are linear in them) over ranks gives exactly the numbers of one process on the whole probe. The
random probes of the estimators come from private seeded generators, identical on every rank.

Fully sharded models (FSDP2, ``fully_shard``) hold each parameter as a ``DTensor`` of which a
rank keeps a shard. There the forward runs on all-gathered copies, so ``torch.autograd.grad``
cannot reach the parameters: the gradient comes from ``backward()``, which FSDP reduce-scatters
as a mean over ranks. Flat vectors then hold this rank's shard of every parameter (its
:func:`local` part), and inner products are summed over ranks. Only forward-only measurements
(critical sharpness) work there: a Hessian-vector product would need a double backward
through FSDP's all-gathers.

A collective that fails (a rank stopped, hung or dead: gloo gives up after the process group
timeout) raises :class:`CollectiveError`, which ends the run: the group cannot be used again.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch < 2.6, or built without distributed support: nothing is FSDP2
    FSDPModule = FullyShardedDataParallel = DTensor = Shard = type("Unavailable", (), {})


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CollectiveError(RuntimeError):
    """A collective of a measurement failed: another rank is stopped, hung or dead.

    Never a measurement's status: after a failed collective the process group is unusable (gloo
    closes its connections), so the run must end, with this message.
    """


class RankDivergence(CollectiveError):
    """A measurement raised on this rank under data parallelism.

    Ranks that measure together must take the same collectives in the same order; a rank whose
    estimator raised (out of memory on its larger shard, say) has skipped some of them, and
    recording the failure as a status would pair its next all-reduce with another rank's
    different one: numbers mixed across estimators, then a hang. So the run ends, saying why.
    """


def agree_on_failure(error: Exception, what: str, device: torch.device) -> None:
    """Return when ``error`` may be recorded as a status: in one process, or when every rank
    failed at this same point (a failure they agree on, e.g. a check on all-reduced numbers,
    leaves them in step); raise :class:`RankDivergence` when only some ranks did.

    Every rank that fails here sums a 1 over the ranks: all of them arrive together only when
    all failed. A rank that did not fail is inside another collective meanwhile; the sum then
    falls short (or never completes and times out as a :class:`CollectiveError`), and the run
    ends either way instead of pairing the ranks' collectives wrongly.
    """
    if not is_distributed():
        return
    failed = all_reduce_sum(torch.ones(1, device=device))
    if int(failed.item()) != world_size():
        raise RankDivergence(
            f"sharpmeter: {what} failed on rank {dist.get_rank()} ({type(error).__name__}: "
            f"{error}); ranks that measure together must take the same collectives and this "
            "one can no longer follow the others, so the run ends here"
        ) from error


def honour_timeout(timeout: timedelta) -> None:
    """Make the default process group's collectives give up after ``timeout``.

    transformers passes ``ddp_timeout`` to the process group it creates on a GPU but not with
    ``use_cpu``, where gloo keeps torch's default of 30 minutes: a stopped rank would hold the
    others that long. This sets the timeout of the existing group (the private
    ``_set_pg_timeout`` of torch; where it is missing or fails, a warning and the group's own
    timeout). Timeouts never change what is computed, only how long a collective may wait.
    """
    if not is_distributed():
        return
    try:
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(timeout)
    except Exception as error:  # a private API: its absence must not stop training
        warnings.warn(
            f"cannot set the process group timeout to {timeout.total_seconds():g} s "
            f"({type(error).__name__}: {error}); a hung rank holds the others for the group's "
            "own timeout",
            RuntimeWarning,
            stacklevel=2,
        )


def group_timeout() -> timedelta | None:
    """The timeout of the default group's collectives, where its backend says (gloo, NCCL)."""
    try:
        group = dist.distributed_c10d._get_default_group()
        return group._get_backend(group._device_types[0]).options._timeout
    except Exception:  # private attributes: messages then go without the number
        return None


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn the failure of a collective into a :class:`CollectiveError` naming ``what`` (a
    measurement all-reduce, the probe broadcast), this rank and the timeout.

    gloo raises a bare ``RuntimeError`` ("Timed out waiting 30000ms for recv operation",
    "Connection closed by peer") that a measurement would otherwise record as an estimator's
    error, going on to the next collective, which fails as well.
    """
    try:
        yield
    except CollectiveError:  # told already, by a collective inside this one
        raise
    except RuntimeError as error:
        timeout = group_timeout()
        after = f" (process group timeout {timeout.total_seconds():g} s)" if timeout else ""
        raise CollectiveError(
            f"sharpmeter: {what} on rank {dist.get_rank()} failed{after}: another rank is "
            f"stopped, hung or dead, and the process group cannot be used again "
            f"({type(error).__name__}: {error})"
        ) from error


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place and returned (the identity outside data parallelism).

    gloo and NCCL reduce float32/float64; lower precisions are reduced in float32.

    Raises:
        CollectiveError: the all-reduce failed (see :func:`collective`).
    """
    if not is_distributed():
        return tensor
    wide = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
    with collective("a measurement all-reduce"):
        dist.all_reduce(wide, op=dist.ReduceOp.SUM)
    if wide is not tensor:
        tensor.copy_(wide)
    return tensor


def shard_batch(batch: Any, rank: int, world_size: int) -> Any:
    """Rows ``rank, rank + world_size, ...`` of every tensor of a batch (a strided shard).

    Raises:
        ValueError: a tensor has fewer rows than there are ranks (a rank would get none, and
            its forward would fail while the others wait); the same on every rank.
    """
    if isinstance(batch, torch.Tensor):
        if batch.dim() and batch.shape[0] < world_size:
            raise ValueError(
                f"the probe holds {batch.shape[0]} examples, fewer than the {world_size} ranks "
                f"that share it: every rank needs at least one, so use a probe of at least "
                f"{world_size} examples"
            )
        return batch[rank::world_size]
    if isinstance(batch, dict):
        return {k: shard_batch(v, rank, world_size) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard_batch(v, rank, world_size) for v in batch)
    return batch


def local_shard(batch: Any) -> Any:
    """This rank's shard of a global probe batch (the batch itself outside data parallelism);
    a batch with fewer examples than ranks raises (see :func:`shard_batch`)."""
    if not is_distributed():
        return batch
    return shard_batch(batch, dist.get_rank(), dist.get_world_size())


NO_FSDP_HVP = (
    "Hessian-vector products need a double backward through FSDP's all-gathers, which FSDP2 "
    "does not support; measure critical sharpness (forward-only) on a fully sharded model"
)


def world_size() -> int:
    """Ranks in the process group (1 outside one)."""
    return dist.get_world_size() if is_distributed() else 1


def is_sharded(params: Iterable[torch.Tensor]) -> bool:
    """True when FSDP2 shards the parameters (``DTensor`` objects over every rank).

    Raises:
        ValueError: other ``DTensor`` layouts (hybrid sharding, tensor parallelism, a mesh of
            part of the ranks): sums over all ranks would count shards twice or miss some; and
            sharded parameters beside plain ones, which every rank holds whole (an adapter
            attached after ``fully_shard``): sums over ranks would count those once per rank.
    """
    params = list(params)
    sharded = [p for p in params if isinstance(p, DTensor)]
    if sharded and len(sharded) < len(params):
        raise ValueError(
            f"{len(params) - len(sharded)} of the {len(params)} parameters measured are plain "
            "tensors beside FSDP2's sharded ones (a PEFT adapter attached after fully_shard?): "
            "sums over ranks would count them once per rank. Shard them too (fully_shard after "
            "attaching it), or measure only the sharded ones (params=)"
        )
    for p in sharded:
        mesh = p.device_mesh
        if (
            mesh.ndim != 1
            or mesh.size() != world_size()
            or not all(isinstance(x, Shard) for x in p.placements)
        ):
            raise ValueError(
                f"parameters laid out as {p.placements} over a mesh of shape {mesh.shape}: "
                f"only FSDP2 sharding over all {world_size()} ranks is supported"
            )
    return bool(sharded)


# What FSDP1 marks the parameters it flattened with (torch.distributed.fsdp._common_utils).
FSDP1_FLATTENED = "_fsdp_flattened"


def check_not_fsdp1(model: nn.Module) -> None:
    """FSDP1 flattens parameters into per-rank buffers that no measurement can address.

    The Trainer hands its callbacks the module inside the FSDP1 wrapper, so the parameters'
    mark is checked as well as the wrapper.
    """
    wrapped = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
    if wrapped or any(getattr(p, FSDP1_FLATTENED, False) for p in model.parameters()):
        raise ValueError(
            "the model is wrapped in FSDP1 (FullyShardedDataParallel): shard it with FSDP2 "
            "(fully_shard; accelerate: fsdp_version: 2, as in configs/accelerate/fsdp.yaml)"
        )


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (a view: writing it writes the parameter); any other
    tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def like_parameter(part: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A local tensor shaped like ``local(param)`` as a tensor shaped like ``param``: a
    ``DTensor`` with the same sharding for a sharded parameter, itself otherwise."""
    if not isinstance(param, DTensor):
        return part
    return DTensor.from_local(
        part, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` wrapped."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(modules: Iterable[nn.Module]) -> None:
    """Free the all-gathered parameters of FSDP modules.

    FSDP keeps the root module's parameters gathered after a forward that no backward
    follows, and its next forward then skips the all-gather: after the shards were written
    (a line-search step, or an optimizer step) it would read the stale copies.
    """
    for module in modules:
        module.reshard()
