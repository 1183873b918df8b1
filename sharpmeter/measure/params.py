"""Parameter selection and the flat-vector view of a list of parameter tensors.

Every curvature quantity lives in the space of the selected parameters, flattened in the order
``model.parameters()`` yields them. These helpers are the one place that order is defined.

For FSDP-sharded parameters (``DTensor``), a flat vector holds this rank's shard of each
parameter, per-parameter tensors are ``DTensor`` objects sharded like the parameter, and
:func:`dot` and :func:`norm` sum over ranks (see :mod:`sharpmeter.measure.distributed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sharpmeter.measure.distributed import all_reduce_sum, is_sharded, like_parameter, local


def resolve_params(
    model: nn.Module, params: Iterable[nn.Parameter] | None = None
) -> list[nn.Parameter]:
    """The parameters a measurement differentiates: ``params`` or all trainable ones.

    Shared (tied) parameters are listed once. Raises ``ValueError`` for an empty selection, a
    parameter that does not belong to ``model``, or a lazy module's parameter not yet
    materialized (a measuring forward would draw its initial values, under the measurement's
    seed: training would start from other weights).
    """
    lazy = [name for name, p in model.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise ValueError(
            f"the model has lazy parameters not yet initialized ({', '.join(lazy[:3])}): run one "
            "forward of a training batch before measuring, so that they take their own values"
        )
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


def storage_eps(params: Iterable[torch.Tensor]) -> float:
    """The machine epsilon of the coarsest dtype among ``params``: how finely they are stored."""
    return max(torch.finfo(p.dtype).eps for p in params)


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


def copy_into(
    params: Sequence[nn.Parameter],
    values: Iterable[torch.Tensor],
    versions: Sequence[int] | None = None,
) -> None:
    """Write ``values`` into ``params`` in place; with ``versions``, the values are the ones
    the parameters held at those version counters, which are put back too (:func:`set_versions`)."""
    with torch.no_grad():
        for p, value in zip(params, values, strict=True):
            p.copy_(value)
    if versions is not None:
        set_versions(params, versions)


_SAME_SIZE_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one dtype and shape hold the same bits: a NaN equals the same NaN
    (``torch.equal`` says a parameter holding a NaN was not written back), and -0.0 differs
    from 0.0. Compared on ``a``'s device."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point() and not a.is_complex():
        return torch.equal(a, b.to(a.device))
    as_integers = _SAME_SIZE_INTEGER[a.element_size()]
    a, b = a.detach(), b.detach().to(a.device)
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
        as_integers = _SAME_SIZE_INTEGER[a.element_size()]
    return torch.equal(a.view(as_integers), b.view(as_integers))


def set_versions(tensors: Sequence[torch.Tensor], versions: Sequence[int]) -> None:
    """Put back the version counters of tensors whose values were written back bit for bit,
    so that a graph which saved them before the measurement (a training forward whose backward
    is still to come) does not take them for modified in place. Through torch's own setter,
    which is private: where it is missing or refuses a tensor (a DTensor), nothing is done."""
    setter = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
    if setter is None:
        return
    with contextlib.suppress(RuntimeError, TypeError):
        setter(tuple(tensors), tuple(versions))


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


@dataclass(frozen=True, eq=False)
class ParameterVector:
    """A flat vector together with the parameters it lives on, in the order it holds them.

    Optimizers order parameters by group (decay / no-decay), models by module: two flat
    vectors of the same length can hold the same numbers for different parameters. A
    direction that carries its parameters is read by identity wherever it is used, so that
    mix-up cannot happen (:func:`as_flat_vector`).

    Attributes:
        vector: the flat vector (for FSDP2 parameters, this rank's shard of each).
        params: the parameters, in the order ``vector`` holds them.
    """

    vector: torch.Tensor
    params: tuple[nn.Parameter, ...]

    def __post_init__(self) -> None:
        if self.vector.dim() != 1 or self.vector.numel() != num_elements(self.params):
            raise ValueError(
                f"a vector of length {num_elements(self.params)} over these parameters "
                f"was expected, got shape {tuple(self.vector.shape)}"
            )

    def over(self, params: Sequence[nn.Parameter]) -> torch.Tensor:
        """The flat vector in the order of ``params``, which may be a subset of its own.

        Raises ``ValueError`` for a parameter the vector does not cover.
        """
        slices, offset = {}, 0
        for p in self.params:
            n = local(p).numel()
            slices[id(p)] = self.vector[offset : offset + n]
            offset += n
        missing = [i for i, p in enumerate(params) if id(p) not in slices]
        if missing:
            raise ValueError(f"the vector has no entries for params[{missing[0]}]")
        return torch.cat([slices[id(p)] for p in params])


def as_flat_vector(
    vector: ParameterVector | torch.Tensor | Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    name: str,
) -> torch.Tensor:
    """A flat vector over ``params`` (in their order) from any accepted form, sizes checked.

    A :class:`ParameterVector` is reordered by parameter identity and must cover exactly
    ``params`` (``vector.over(subset)`` restricts it on purpose); a bare flat tensor is taken
    to be in the order of ``params``; a list holds one tensor per parameter.
    """
    dim = num_elements(params)
    if isinstance(vector, ParameterVector):
        if {id(p) for p in vector.params} != {id(p) for p in params}:
            raise ValueError(
                f"{name} lives on other parameters than the ones measured "
                f"({len(vector.params)} vs {len(params)} tensors): build it over the same "
                f"parameters, or restrict it with {name}.over(params)"
            )
        vector = vector.over(params)
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
