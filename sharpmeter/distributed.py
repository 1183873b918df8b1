"""Data-parallel measurement: every rank holds a shard of the probe, all get the same number.

Each rank weights its batches by its loss tokens over the *global* token count, so its probe
loss is its share of the global mean; summing shares (and their gradients, and the HVPs, which
are linear in them) over ranks gives exactly the numbers of one process on the whole probe. The
random probes of the estimators come from private seeded generators, identical on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place and returned (the identity outside data parallelism).

    gloo and NCCL reduce float32/float64; lower precisions are reduced in float32.
    """
    if not is_distributed():
        return tensor
    wide = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
    dist.all_reduce(wide, op=dist.ReduceOp.SUM)
    if wide is not tensor:
        tensor.copy_(wide)
    return tensor


def shard_batch(batch: Any, rank: int, world_size: int) -> Any:
    """Rows ``rank, rank + world_size, ...`` of every tensor of a batch (a strided shard)."""
    if isinstance(batch, torch.Tensor):
        return batch[rank::world_size]
    if isinstance(batch, dict):
        return {k: shard_batch(v, rank, world_size) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard_batch(v, rank, world_size) for v in batch)
    return batch


def local_shard(batch: Any) -> Any:
    """This rank's shard of a global probe batch (the batch itself outside data parallelism)."""
    if not is_distributed():
        return batch
    return shard_batch(batch, dist.get_rank(), dist.get_world_size())
