"""Parameter selection and the flat-vector view of a list of parameter tensors.

Every curvature quantity lives in the space of the selected parameters, flattened in the order
``model.parameters()`` yields them. These helpers are the one place that order is defined.

For FSDP-sharded parameters (``DTensor``), a flat vector holds this rank's shard of each
parameter, per-parameter tensors are ``DTensor`` objects sharded like the parameter, and
:func:`dot` and :func:`norm` sum over ranks (see :mod:`sharpmeter.distributed`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from sharpmeter.distributed import all_reduce_sum, is_sharded, like_parameter, local


def resolve_params(
    model: nn.Module, params: Iterable[nn.Parameter] | None = None
) -> list[nn.Parameter]:
    """The parameters a measurement differentiates: ``params`` or all trainable ones.

    Shared (tied) parameters are listed once. Raises ``ValueError`` for an empty selection or a
    parameter that does not belong to ``model``.
    """
    owned = {id(p) for p in model.parameters()}
    if params is None:
        selected = [p for p in model.parameters() if p.requires_grad]
    else:
        selected = list(params)
        foreign = [i for i, p in enumerate(selected) if id(p) not in owned]
        if foreign:
            raise ValueError(f"params[{foreign[0]}] is not a parameter of the model")
    unique: dict[int, nn.Parameter] = {}
    for p in selected:
        unique.setdefault(id(p), p)
    if not unique:
        raise ValueError("no parameters to measure: the selection is empty")
    return list(unique.values())


def vector_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype of flat vectors: the widest parameter dtype, at least float32.

    bf16/fp16 models still get float32 vectors, so inner products and Lanczos' orthogonalisation
    keep their accuracy; parameters in float64 keep float64.
    """
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def num_elements(params: Sequence[torch.Tensor]) -> int:
    """Length of the flat vectors over ``params`` (this rank's shards for sharded ones)."""
    return sum(local(p).numel() for p in params)


def flatten(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Concatenate tensors (their local shards) into one flat vector (optionally cast)."""
    flat = torch.cat([local(t).reshape(-1) for t in tensors])
    return flat if dtype is None else flat.to(dtype)


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into tensors shaped (and typed, and sharded) like ``like``."""
    parts, offset = [], 0
    for t in like:
        shard = local(t)
        n = shard.numel()
        part = vector[offset : offset + n].view_as(shard).to(t.dtype)
        parts.append(like_parameter(part, t))
        offset += n
    return parts


def dot(a: torch.Tensor, b: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """:math:`a^\\top b` of two flat vectors over ``params``, whole even when sharded."""
    product = a @ b
    return all_reduce_sum(product) if is_sharded(params) else product


def all_finite(vector: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of a flat vector over ``params`` is finite, on every rank when
    sharded: ranks that decided apart would wait for each other in different collectives."""
    bad = torch.count_nonzero(~torch.isfinite(vector)).double()
    return float(all_reduce_sum(bad) if is_sharded(params) else bad) == 0


def norm(vector: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """:math:`\\lVert v\\rVert_2` of a flat vector over ``params``, whole even when sharded."""
    if is_sharded(params):
        return dot(vector, vector, params).sqrt()
    return torch.linalg.vector_norm(vector)


def as_flat_vector(
    vector: torch.Tensor | Sequence[torch.Tensor], params: Sequence[torch.Tensor], name: str
) -> torch.Tensor:
    """Accept a flat vector or a per-parameter list and return the flat form, checking sizes."""
    dim = num_elements(params)
    if isinstance(vector, torch.Tensor):
        if vector.dim() != 1 or vector.numel() != dim:
            raise ValueError(
                f"{name} must be a flat vector of length {dim}, got shape {tuple(vector.shape)}"
            )
        return vector.to(device=params[0].device, dtype=vector_dtype(params))
    parts = list(vector)
    if len(parts) != len(params) or any(
        v.shape != p.shape for v, p in zip(parts, params, strict=False)
    ):
        raise ValueError(f"{name} must have one tensor per parameter, shaped like it")
    return flatten(parts, vector_dtype(params)).to(params[0].device)


def cuda_device_indices(tensors: Iterable[torch.Tensor]) -> list[int]:
    """The CUDA devices holding these tensors (for ``torch.random.fork_rng``)."""
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def zeros_for_unused(
    grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Autograd's ``None`` for an input the output does not depend on, as explicit zeros."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
