r"""Top eigenvalues of a symmetric operator: power iteration and Lanczos.

Both return the largest *algebraic* eigenvalue by default (the sharpness that limits a gradient
step), together with the residual :math:`\lVert Hv - \lambda v\rVert / |\lambda|` of the returned
pair, the number of operator products spent and whether the tolerance was met.

Example::

    op = sm.HessianOperator(model, None, batch)
    r = sm.lanczos(op, k=3)            # r.values[0] >= r.values[1] >= r.values[2]
    p = sm.power_iteration(op, v0=r.vectors[:, 0])   # warm start
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sharpmeter.measure.checks import check_positive_int
from sharpmeter.measure.estimators._operator import CountingOperator, LinearOperator

WHICH = ("LA", "LM")


@dataclass(frozen=True)
class PowerIterationResult:
    """Top eigenpair from power iteration.

    Attributes:
        value: the eigenvalue estimate :math:`\\lambda = v^\\top H v` (Rayleigh quotient).
        vector: the unit vector :math:`v` (a warm start for the next measurement).
        residual: :math:`\\lVert Hv - \\lambda v\\rVert / |\\lambda|`.
        iterations: power steps taken (both passes when a shift was needed).
        num_matvecs: operator products spent.
        converged: ``residual <= tol``.
    """

    value: float
    vector: torch.Tensor
    residual: float
    iterations: int
    num_matvecs: int
    converged: bool


@dataclass(frozen=True)
class LanczosResult:
    """Top-k Ritz pairs from Lanczos with full reorthogonalisation.

    Attributes:
        values: the k largest algebraic Ritz values, descending (float64).
        vectors: the Ritz vectors as columns, ``(n, k)``.
        residuals: :math:`\\lVert H y_i - \\theta_i y_i\\rVert / |\\theta_i|` per pair, from the
            Lanczos relation (:math:`= \\beta_m |s_{m,i}| / |\\theta_i|`, exact up to rounding
            under full reorthogonalisation). It does not see the rounding of the products
            themselves: an operator in float32 (rounding :math:`\\sim\\epsilon \\lVert H\\rVert`)
            whose :math:`|\\theta_i|` is far below :math:`\\lVert H\\rVert`, or a bf16 model's
            products, can have an explicit residual several times larger (1.8e-3 against
            7.6e-4 on a bf16 MLP).
        iterations: Lanczos steps (Krylov dimension).
        num_matvecs: operator products spent (one per step).
        converged: every residual ``<= tol`` (or an invariant subspace was found).
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    iterations: int
    num_matvecs: int
    converged: bool

    @property
    def value(self) -> float:
        return float(self.values[0])

    @property
    def vector(self) -> torch.Tensor:
        return self.vectors[:, 0]

    @property
    def residual(self) -> float:
        return float(self.residuals[0])


def power_iteration(
    operator: LinearOperator | torch.Tensor,
    max_iter: int = 100,
    tol: float = 1e-3,
    v0: torch.Tensor | None = None,
    seed: int = 0,
    which: str = "LA",
) -> PowerIterationResult:
    r"""Top eigenpair by power iteration, stopped on the residual.

    Each step is :math:`w = Hv,\ \lambda = v^\top w,\
    r = \lVert w - \lambda v\rVert/|\lambda|`; stop if :math:`r \le` ``tol``, else
    :math:`v \leftarrow (w - \sigma v)/\lVert w - \sigma v\rVert`: one product per step.
    Plain power iteration (:math:`\sigma = 0`) finds the eigenvalue of largest *magnitude*
    (``which="LM"``). With ``which="LA"`` (default), if that one is negative, a second pass
    iterates :math:`H - \sigma I` with :math:`\sigma = \lambda_{\rm neg}`, whose dominant
    eigenvalue is :math:`\lambda_{\max} - \sigma \ge 0`, from a fresh start orthogonal to
    the first pass's vector, and so returns the largest algebraic eigenvalue.

    A warm start near *any* eigenvector meets ``tol`` there at once, the top one or not (see
    :func:`lanczos`).

    Args:
        operator: a square operator or dense matrix (symmetric).
        max_iter: most steps per pass.
        tol: relative residual at which to stop.
        v0: warm start (e.g. the previous measurement's vector); default Gaussian from ``seed``.
        seed: seed of the private generator for the start vector.
        which: ``"LA"`` largest algebraic (default) or ``"LM"`` largest magnitude.
    """
    check_positive_int("max_iter", max_iter)
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    op = CountingOperator(operator, symmetric=True)
    start = op.start_vector(v0, seed)
    value, vector, residual, iterations = _power_pass(op, start, 0.0, max_iter, tol)
    if which == "LA" and value < 0:
        # From the start vector the shifted pass could stop at once: a warm start near the
        # negative eigenvector already meets tol there, though it is the one eigenvector the
        # shift annihilates.
        restart = _orthogonal_start(op, vector, seed)
        value, vector, residual, more = _power_pass(op, restart, value, max_iter, tol)
        iterations += more
    return PowerIterationResult(
        value=value,
        vector=vector,
        residual=residual,
        iterations=iterations,
        num_matvecs=op.num_matvecs,
        converged=residual <= tol,
    )


def _power_pass(
    op: CountingOperator, v: torch.Tensor, shift: float, max_iter: int, tol: float
) -> tuple[float, torch.Tensor, float, int]:
    value, residual = 0.0, math.inf
    for iteration in range(1, max_iter + 1):
        w = op @ v
        value = float(v @ w)
        residual = _relative_residual(w, v, value)
        if residual <= tol or iteration == max_iter:
            return value, v, residual, iteration
        w = w - shift * v
        norm = torch.linalg.vector_norm(w)
        if not torch.isfinite(norm) or norm == 0:
            return value, v, residual, iteration
        v = w / norm
    raise AssertionError("unreachable: the loop returns on its last iteration")


def _orthogonal_start(op: CountingOperator, away: torch.Tensor, seed: int) -> torch.Tensor:
    """A unit Gaussian vector (another stream than the start's) with ``away`` projected out."""
    generator = torch.Generator().manual_seed(seed + 1)
    w = _orthogonalise(_random_vector(op, generator), away[None, :])
    return w / torch.linalg.vector_norm(w)


def _relative_residual(hv: torch.Tensor, v: torch.Tensor, value: float) -> float:
    absolute = float(torch.linalg.vector_norm(hv - value * v))
    if value == 0:
        return 0.0 if absolute == 0 else math.inf
    return absolute / abs(value)


def lanczos(
    operator: LinearOperator | torch.Tensor,
    k: int = 1,
    max_iter: int | None = None,
    tol: float = 1e-6,
    v0: torch.Tensor | None = None,
    seed: int = 0,
) -> LanczosResult:
    r"""Top-k eigenpairs by Lanczos with full reorthogonalisation.

    Builds an orthonormal Krylov basis :math:`Q_m` of
    :math:`\mathrm{span}\{v_0, Hv_0, \dots, H^{m-1}v_0\}` with
    :math:`H Q_m = Q_m T_m + \beta_m q_{m+1} e_m^\top`, :math:`T_m` tridiagonal. Every new
    vector is orthogonalised against the whole basis twice ("twice is enough"), so no spurious
    copies of converged eigenvalues appear. The small eigenproblem
    :math:`T_m = S \Theta S^\top` is solved in float64 after every step; the run stops when each
    of the top-k Ritz pairs :math:`(\theta_i, Q_m s_i)` has relative residual
    :math:`\beta_m |s_{m,i}| / |\theta_i| \le` ``tol``, or after ``max_iter`` steps.

    Single-vector Lanczos sees each distinct eigenvalue once: of a repeated eigenvalue it
    returns one pair (``diag(5, 5, 1)`` with ``k=2`` gives 5 and 1, converged). A start vector
    with no component along the top eigenvector never finds it, and one within ``tol`` of
    another eigenvector stops there after one product (a warm start from the previous top
    vector after the top has changed): :class:`~sharpmeter.SharpnessMeter` starts cold.

    Memory: the basis holds up to ``max_iter`` vectors of the operator's size.

    Args:
        operator: a square symmetric operator or dense matrix.
        k: number of top (algebraic) eigenpairs.
        max_iter: most Lanczos steps (default ``max(30, 3k)``, at most the dimension).
        tol: relative residual at which to stop.
        v0: warm start (e.g. the previous top eigenvector); default Gaussian from ``seed``.
        seed: seed of the private generator for start and restart vectors.
    """
    check_positive_int("k", k)
    op = CountingOperator(operator, symmetric=True)
    if k > op.dim:
        raise ValueError(f"k = {k} exceeds the dimension {op.dim}")
    steps = min(op.dim, max(30, 3 * k) if max_iter is None else max_iter)
    check_positive_int("max_iter", steps, minimum=k)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    krylov = _Lanczos(op, steps, v0, seed)
    krylov.run(k, tol)
    return krylov.result(k, tol)


class _Lanczos:
    r"""The Lanczos iteration of :func:`lanczos`, one step at a time, its basis open to reuse.

    After each :meth:`step`: ``basis[:size]`` holds the orthonormal vectors as *rows*;
    ``alphas[j]`` :math:`= q_j^\top H q_j` is the diagonal of :math:`T = Q^\top H Q` and
    ``betas`` its off-diagonal (0 where the run restarted after an invariant subspace);
    ``beta`` is :math:`\beta_m = \lVert H q_m - Q T e_m\rVert`; ``product`` is :math:`H q_m`;
    ``values``, ``eigvecs``, ``residuals`` are all Ritz pairs of :math:`T` (descending) and their
    relative residuals. At most ``steps`` steps (the basis is allocated once).
    """

    def __init__(
        self, op: CountingOperator, steps: int, v0: torch.Tensor | None, seed: int
    ) -> None:
        self.op = op
        # Restart vectors come from another stream than the start vector, which they must not
        # equal.
        self._generator = torch.Generator().manual_seed(seed + 1)
        self.basis = torch.empty(steps, op.dim, dtype=op.dtype, device=op.device)
        self.alphas: list[float] = []
        self.betas: list[float] = []  # betas[j] couples q_j and q_{j+1}; 0 marks a restart
        self.beta = 0.0
        self.product = self._remainder = None  # H q_m, and its part orthogonal to the basis
        self._next = op.start_vector(v0, seed)

    @property
    def size(self) -> int:
        return len(self.alphas)

    @property
    def full(self) -> bool:
        return self.size == self.basis.shape[0]

    def step(self) -> None:
        """One product: the next basis vector, its column of T and all Ritz pairs."""
        if self.full:
            raise RuntimeError("the Lanczos basis is full")
        if self.alphas:
            self._advance()
        j, q = self.size, self._next
        self.basis[j] = q
        self.product = self.op @ q
        self.alphas.append(float(q @ self.product))
        self._remainder = _orthogonalise(self.product, self.basis[: j + 1])
        self.beta = float(torch.linalg.vector_norm(self._remainder))
        self.values, self.eigvecs, self.residuals = _ritz(self.alphas, self.betas, self.beta)

    def _advance(self) -> None:
        if self.invariant:
            # Invariant subspace: continue from a fresh direction orthogonal to it.
            w = _random_vector(self.op, self._generator)
            w = _orthogonalise(w, self.basis[: self.size])
            beta_next, self._next = 0.0, w / torch.linalg.vector_norm(w)
        else:
            beta_next, self._next = self.beta, self._remainder / self.beta
        self.betas.append(beta_next)

    @property
    def invariant(self) -> bool:
        """The basis spans an invariant subspace (to rounding): its Ritz pairs are exact."""
        return self.beta <= _breakdown_threshold(self.alphas, self.betas, self.op.dtype)

    def run(self, k: int, tol: float, min_steps: int = 1) -> None:
        """Steps until the top-k Ritz pairs meet ``tol`` (at least ``min_steps`` steps: more
        grow the basis past convergence), the basis is full, or it spans an invariant subspace
        holding k eigenpairs (and ``min_steps`` vectors)."""
        while True:
            self.step()
            converged = len(self.values) >= k and bool((self.residuals[:k] <= tol).all())
            if (converged and self.size >= min_steps) or self.full:
                return
            if self.invariant and self.size >= max(k, min_steps):
                self.residuals = torch.zeros_like(self.residuals)
                return

    def result(self, k: int, tol: float) -> LanczosResult:
        """The top-k Ritz pairs, as :func:`lanczos` returns them."""
        top = slice(0, min(k, self.size))
        vectors = self.basis[: self.size].T @ self.eigvecs[:, top].to(self.op.dtype)
        return LanczosResult(
            values=self.values[top],
            vectors=vectors,
            residuals=self.residuals[top],
            iterations=self.size,
            num_matvecs=self.size,  # one product per step
            converged=bool((self.residuals[top] <= tol).all()) and self.size >= k,
        )


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def _ritz(
    alphas: list[float], betas: list[float], beta_last: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz values (descending), their eigenvectors of T and relative residuals, in float64."""
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(tridiagonal)
    theta, s = theta.flip(0), s.flip(1)
    absolute = beta_last * s[-1].abs()
    residuals = torch.where(
        theta != 0, absolute / theta.abs(), torch.where(absolute == 0, 0.0, math.inf)
    )
    return theta, s, residuals


def _breakdown_threshold(alphas: list[float], betas: list[float], dtype: torch.dtype) -> float:
    scale = max([abs(a) for a in alphas] + [abs(b) for b in betas] + [1e-300])
    return 10 * torch.finfo(dtype).eps * scale


def _random_vector(op: CountingOperator, generator: torch.Generator) -> torch.Tensor:
    v = torch.randn(op.dim, generator=generator, dtype=torch.float64)
    return v.to(device=op.device, dtype=op.dtype)
