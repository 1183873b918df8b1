"""What the estimators accept: any square linear operator, dense or matrix-free.

An operator has ``shape == (n, n)``, ``dtype``, ``device`` and ``op @ v`` for a flat vector (and
an ``(n, k)`` matrix). A dense ``torch.Tensor`` qualifies as it is; so do
:class:`~sharpmeter.measure.operators.HessianOperator` and
:class:`~sharpmeter.measure.operators.PreconditionedOperator`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LinearOperator(Protocol):
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor: ...


class CountingOperator:
    """Wraps an operator, checks it is square and real (and, with ``symmetric``, that a dense
    matrix is symmetric), and counts the products an estimator spends."""

    def __init__(self, operator: LinearOperator | torch.Tensor, symmetric: bool = False) -> None:
        shape = tuple(getattr(operator, "shape", ()))
        if len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
            raise ValueError(f"expected a square, non-empty operator, got shape {shape}")
        if not hasattr(operator, "__matmul__"):
            raise ValueError(f"{type(operator).__name__} does not support `op @ v`")
        if not operator.dtype.is_floating_point:
            # Products would be cast to it: unit vectors truncated to integers, mostly 0.
            raise ValueError(
                f"expected a real floating-point operator, got {operator.dtype}: convert it "
                "first, e.g. `matrix.double()`"
            )
        if symmetric and isinstance(operator, torch.Tensor):
            check_symmetric(operator)
        self.operator = operator
        self.dim = int(shape[0])
        self.dtype = torch.promote_types(operator.dtype, torch.float32)
        self.device = operator.device
        self.num_matvecs = 0

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += 1 if v.dim() == 1 else v.shape[1]
        return (self.operator @ v.to(self.operator.dtype)).to(self.dtype)

    @property
    def products_per_call(self) -> int:
        """Independent products the operator takes in one call (its ``products_per_call``,
        e.g. a batched :class:`~sharpmeter.measure.operators.HessianOperator`; else 1)."""
        return getattr(self.operator, "products_per_call", 1)

    def blocks(self, count: int) -> list[int]:
        """``count`` independent products as the sizes of the calls that take them."""
        size = self.products_per_call
        return [min(size, count - start) for start in range(0, count, size)]

    def times_columns(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`HZ` in one call, as a matrix-vector product where ``Z`` has one column."""
        return self @ z if z.shape[1] > 1 else (self @ z[:, 0])[:, None]

    def start_vector(self, v0: torch.Tensor | None, seed: int) -> torch.Tensor:
        """A unit start vector: ``v0`` (warm start) or Gaussian from a private generator.

        The private CPU generator gives the same vector on every device and every rank, and never
        touches the global RNG.
        """
        if v0 is None:
            generator = torch.Generator().manual_seed(seed)
            v0 = torch.randn(self.dim, generator=generator, dtype=torch.float64)
        elif v0.shape != (self.dim,):
            raise ValueError(f"v0 must have shape ({self.dim},), got {tuple(v0.shape)}")
        v0 = v0.to(device=self.device, dtype=self.dtype)
        norm = torch.linalg.vector_norm(v0)
        if not (torch.isfinite(norm) and norm > 0):
            raise ValueError("the start vector must be finite and non-zero")
        return v0 / norm


def check_symmetric(matrix: torch.Tensor) -> None:
    r"""A ValueError unless :math:`\lVert A - A^\top\rVert_F \le \sqrt{\epsilon}\,
    \lVert A\rVert_F` (the dtype's :math:`\epsilon`: room for a Hessian built column by column,
    whose halves round apart). Lanczos' residual holds only for a symmetric operator: on another
    one it reports convergence on a value that is not an eigenvalue."""
    asymmetry = float(torch.linalg.matrix_norm(matrix - matrix.T))
    scale = float(torch.linalg.matrix_norm(matrix))
    if not asymmetry <= torch.finfo(matrix.dtype).eps ** 0.5 * scale:
        raise ValueError(
            f"expected a symmetric matrix: ||A - A^T|| / ||A|| = {asymmetry / scale:.3g}; "
            "pass (A + A.T) / 2 if that is what you mean"
        )
