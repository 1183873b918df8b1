"""One interface over sharpmeter and the tools users would pick instead of it.

Each adapter builds its tool's own Hessian operator and calls its tool's own algorithms, the way
that tool's documentation does, and counts every Hessian-vector product (HVP) the tool makes. With
:meth:`Tool.recording` it also keeps each product's input and output, from which
:mod:`.convergence` reads the estimate an algorithm would return after every product.

- **sharpmeter**: :class:`sharpmeter.HessianOperator` (double backward, graph reused),
  ``lanczos``, ``power_iteration``, ``hutchinson``, ``hutchpp``.
- **PyHessian 0.1**: ``pyhessian.hessian(model, criterion, data=(inputs, targets))``; its
  ``eigenvalues`` (power iteration) and ``trace`` (Hutchinson). It wants ``criterion(model(x), y)``,
  so a GPT-2 is wrapped in :class:`.problems.LogitsAdapter` (logits -> flattened next-token logits).
- **curvlinops 3.0.1**: ``HessianLinearOperator`` (``torch.func.jvp`` over ``jacrev``),
  ``hutchinson_trace``, ``hutchpp_trace``; it has no eigensolver, so its documented route,
  ``scipy.sparse.linalg.eigsh`` on the operator, gives the top eigenvalue.
- **hessian-eigenthings 1.0.0a5**: ``HessianOperator(model, batches, loss_fn)`` (double backward,
  the gradient's graph rebuilt per product), ``lanczos``, ``power_iteration_one``,
  ``hutchinson``, ``hutch_plus_plus``.

Fused attention kernels (CPU flash attention) have neither a double backward nor forward-mode
AD, so the peers' calls run under ``sdpa_kernel(SDPBackend.MATH)`` (``math_kernel=True``, the
default); sharpmeter switches the kernel itself.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import sharpmeter as sm
from benchmarks.peers.problems import Problem

# A tolerance no residual reaches: the algorithm spends its whole budget.
EXHAUST = 1e-300


def seed_global_rng(seed: int | None) -> None:
    """Seed torch's global RNG for the peers that draw from it (``None``: leave it alone)."""
    if seed is not None:
        torch.manual_seed(seed)


def flat(tensors: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def split(v: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    parts, offset = [], 0
    for p in like:
        parts.append(v[offset : offset + p.numel()].view_as(p).to(p.dtype))
        offset += p.numel()
    return parts


class Tool:
    """A tool's operator and algorithms, with an HVP counter and an optional recorder.

    ``eigen_methods`` / ``trace_methods`` name the tool's own algorithms; ``warm_start`` those
    that accept a start vector.
    """

    name = "tool"
    eigen_methods: tuple[str, ...] = ()
    trace_methods: tuple[str, ...] = ()
    warm_start: tuple[str, ...] = ()
    trace_stderr: tuple[str, ...] = ()  # methods that report a standard error

    def __init__(self, problem: Problem, math_kernel: bool = True) -> None:
        self.problem = problem
        self.math_kernel = math_kernel
        self.num_hvps = 0
        self._records: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def kernel(self) -> contextlib.AbstractContextManager:
        """The SDPA math kernel around a peer's calls (or nothing)."""
        return sdpa_kernel(SDPBackend.MATH) if self.math_kernel else contextlib.nullcontext()

    def seen(self, v: torch.Tensor, hv: torch.Tensor) -> None:
        self.num_hvps += 1
        if self._records is not None:
            self._records.append((v.detach().reshape(-1).clone(), hv.detach().reshape(-1).clone()))

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Keep ``(v, Hv)`` of every product made inside the block."""
        self._records = []
        try:
            yield self._records
        finally:
            self._records = None

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eigen(
        self, method: str, budget: int, seed: int | None, v0: torch.Tensor | None = None
    ) -> float:
        """Top eigenvalue by ``method`` spending (about) ``budget`` HVPs, no early stop.

        ``seed=None`` leaves the randomness to the tool (the global RNG, for some).
        """
        raise NotImplementedError

    def trace(self, method: str, budget: int, seed: int | None) -> tuple[float, float]:
        """Trace estimate and its reported standard error (NaN when the tool reports none)."""
        raise NotImplementedError

    def default_eigen(self) -> tuple[str, float]:
        """The tool's top-eigenvalue call with its default arguments: (call, value)."""
        raise NotImplementedError

    def default_trace(self) -> tuple[str, float, float]:
        """The tool's trace call with its default arguments: (call, value, stderr)."""
        raise NotImplementedError


class _CountedOperator:
    """An operator with ``shape``, ``dtype``, ``device`` and ``@`` that reports its products."""

    def __init__(self, operator: Any, seen: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        self.operator = operator
        self.seen = seen
        self.shape, self.dtype, self.device = operator.shape, operator.dtype, operator.device

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        hv = self.operator @ v
        if v.dim() == 1:
            self.seen(v, hv)
        else:
            for column in range(v.shape[1]):
                self.seen(v[:, column], hv[:, column])
        return hv


class Sharpmeter(Tool):
    name = "sharpmeter"
    eigen_methods = ("lanczos", "power")
    trace_methods = ("hutchinson", "hutch++")
    warm_start = ("lanczos", "power")
    trace_stderr = ("hutchinson", "hutch++")

    def __init__(self, problem: Problem, math_kernel: bool = True, **operator_kwargs) -> None:
        super().__init__(problem, math_kernel=False)  # attention_guard does it
        self.op = sm.HessianOperator(
            problem.model, problem.loss_fn, problem.batch, **operator_kwargs
        )
        self.counted = _CountedOperator(self.op, self.seen)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        return self.counted @ v

    def eigen(
        self, method: str, budget: int, seed: int | None, v0: torch.Tensor | None = None
    ) -> float:
        seed = 0 if seed is None else seed  # sharpmeter always uses a private generator
        if method == "lanczos":
            return sm.lanczos(self.counted, max_iter=budget, tol=EXHAUST, v0=v0, seed=seed).value
        return sm.power_iteration(
            self.counted, max_iter=budget, tol=EXHAUST, v0=v0, seed=seed
        ).value

    def trace(self, method: str, budget: int, seed: int | None) -> tuple[float, float]:
        seed = 0 if seed is None else seed
        if method == "hutchinson":
            r = sm.hutchinson(self.counted, num_matvecs=budget, seed=seed)
        else:
            r = sm.hutchpp(self.counted, num_matvecs=budget, seed=seed)
        return r.value, r.stderr

    def default_eigen(self) -> tuple[str, float]:
        return "lanczos(op)", sm.lanczos(self.counted).value

    def default_trace(self) -> tuple[str, float, float]:
        r = sm.hutchinson(self.counted)
        return "hutchinson(op)", r.value, r.stderr


class PyHessian(Tool):
    name = "PyHessian"
    eigen_methods = ("power",)
    trace_methods = ("hutchinson",)

    def __init__(self, problem: Problem, math_kernel: bool = True) -> None:
        import pyhessian

        super().__init__(problem, math_kernel)
        self.module = sys.modules["pyhessian.hessian"]
        self.original = self.module.hessian_vector_product
        with self.kernel():
            self.h = pyhessian.hessian(
                problem.logits,
                nn.CrossEntropyLoss(),
                data=(problem.inputs, problem.targets),
                cuda=False,
            )

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Route PyHessian's module-level ``hessian_vector_product`` through the counter."""

        def counted(grads: Any, params: Any, v: Any) -> Any:
            hv = self.original(grads, params, v)
            self.seen(flat(v), flat(hv))
            return hv

        self.module.hessian_vector_product = counted
        try:
            with self.kernel():
                yield
        finally:
            self.module.hessian_vector_product = self.original

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        with self.counting():
            hv = self.module.hessian_vector_product(
                self.h.gradsH, self.h.params, split(v, self.h.params)
            )
        return flat(hv)

    def eigen(
        self, method: str, budget: int, seed: int | None, v0: torch.Tensor | None = None
    ) -> float:
        seed_global_rng(seed)  # PyHessian draws its start vector from the global RNG
        with self.counting():
            values, _ = self.h.eigenvalues(maxIter=budget, tol=0.0)
        return float(values[0])

    def trace(self, method: str, budget: int, seed: int | None) -> tuple[float, float]:
        seed_global_rng(seed)
        with self.counting():
            samples = self.h.trace(maxIter=budget, tol=0.0)
        return float(np.mean(samples)), float("nan")

    def trace_samples(self, budget: int, seed: int | None) -> list[float]:
        seed_global_rng(seed)
        with self.counting():
            return list(self.h.trace(maxIter=budget, tol=0.0))

    def default_eigen(self) -> tuple[str, float]:
        with self.counting():
            values, _ = self.h.eigenvalues()
        return "eigenvalues()", float(values[0])

    def default_trace(self) -> tuple[str, float, float]:
        with self.counting():
            samples = self.h.trace()
        return "trace()", float(np.mean(samples)), float("nan")


class Curvlinops(Tool):
    name = "curvlinops"
    eigen_methods = ("eigsh",)
    trace_methods = ("hutchinson", "hutch++")
    warm_start = ("eigsh",)

    def __init__(self, problem: Problem, math_kernel: bool = True, **operator_kwargs) -> None:
        import curvlinops

        super().__init__(problem, math_kernel)
        self.curvlinops = curvlinops
        with self.kernel():
            self.H = curvlinops.HessianLinearOperator(
                problem.logits,
                nn.CrossEntropyLoss(),
                problem.params,
                [(problem.inputs, problem.targets)],
                **operator_kwargs,
            )

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        with self.kernel():
            hv = self.H @ v
        self.seen(v, hv)
        return hv

    def scipy_operator(self):
        """``scipy.sparse.linalg.LinearOperator`` over the counted product, in float64."""
        from scipy.sparse.linalg import LinearOperator

        dtype = self.H.dtype

        def matvec(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=dtype)
            return self.hvp(v).double().numpy()

        return LinearOperator(self.H.shape, matvec=matvec, dtype=np.float64)

    def eigsh(self, v0: torch.Tensor | None, seed: int | None, **kwargs: Any) -> float:
        from scipy.sparse.linalg import ArpackNoConvergence, eigsh

        if v0 is None and seed is not None:
            v0 = torch.randn(self.H.shape[0], generator=torch.Generator().manual_seed(seed))
        try:
            result = eigsh(
                self.scipy_operator(),
                k=1,
                which="LA",
                v0=None if v0 is None else v0.double().numpy(),
                **kwargs,
            )
            values = result[0] if isinstance(result, tuple) else result
        except ArpackNoConvergence as error:  # nothing converged within the budget
            values = error.eigenvalues
        values = np.atleast_1d(np.asarray(values, dtype=float))
        return float(values.max()) if values.size else float("nan")

    def eigen(
        self, method: str, budget: int, seed: int | None, v0: torch.Tensor | None = None
    ) -> float:
        # ARPACK: one Lanczos factorisation of ``budget`` vectors, no restart.
        return self.eigsh(v0, seed, ncv=max(budget, 3), maxiter=1, return_eigenvectors=False)

    def trace(self, method: str, budget: int, seed: int | None) -> tuple[float, float]:
        seed_global_rng(seed)  # curvlinops draws its probes from the global RNG
        estimator = (
            self.curvlinops.hutchinson_trace
            if method == "hutchinson"
            else self.curvlinops.hutchpp_trace
        )
        with self.kernel():
            value = estimator(self.H, budget)
        self.num_hvps += budget  # one matmat with `budget` columns, vmapped
        return float(value), float("nan")

    def default_eigen(self) -> tuple[str, float]:
        v0 = torch.randn(self.H.shape[0], generator=torch.Generator().manual_seed(0))
        return "eigsh(H.to_scipy(), k=1, which='LA')", self.eigsh(v0, 0)

    def default_trace(self) -> tuple[str, float, float]:
        raise NotImplementedError("hutchinson_trace(A, num_matvecs) has no default budget")


class Eigenthings(Tool):
    name = "hessian-eigenthings"
    eigen_methods = ("lanczos", "power")
    trace_methods = ("hutchinson", "hutch++")
    warm_start = ("power",)
    trace_stderr = ("hutchinson", "hutch++")

    def __init__(self, problem: Problem, math_kernel: bool = True, **operator_kwargs) -> None:
        import hessian_eigenthings as he

        super().__init__(problem, math_kernel)
        self.he = he
        self.op = he.HessianOperator(
            problem.model, [problem.batch], problem.loss_fn, **operator_kwargs
        )
        matvec = self.op.matvec

        def counted(v: torch.Tensor) -> torch.Tensor:
            with self.kernel():
                hv = matvec(v)
            self.seen(v, hv)
            return hv

        self.op.matvec = counted  # the algorithms call operator.matvec

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        return self.op.matvec(v.to(self.op.dtype))

    def eigen(
        self, method: str, budget: int, seed: int | None, v0: torch.Tensor | None = None
    ) -> float:
        if method == "lanczos":
            # reorthogonalize=True is the default up to 50 steps; kept on past it so that a
            # longer run is the same algorithm.
            result = self.he.lanczos(
                self.op, k=1, max_iter=budget, which="LA", seed=seed, reorthogonalize=True
            )
            return float(result.eigenvalues[0])
        init = None if v0 is None else v0.to(self.op.dtype)
        value, *_ = self.he.power_iteration_one(
            self.op, max_iter=budget, tol=0.0, init=init, seed=seed
        )
        return float(value)

    def trace(self, method: str, budget: int, seed: int | None) -> tuple[float, float]:
        if method == "hutchinson":
            r = self.he.hutchinson(self.op, num_samples=budget, seed=seed)
        else:
            r = self.he.hutch_plus_plus(self.op, num_matvecs=budget, seed=seed)
        return float(r.estimate), float(r.stderr)

    def default_eigen(self) -> tuple[str, float]:
        result = self.he.lanczos(self.op)
        return "lanczos(op)[0] (k=10, LM)", float(result.eigenvalues[0])

    def default_trace(self) -> tuple[str, float, float]:
        r = self.he.trace(self.op)
        return "trace(op) (hutch++, 100)", float(r.estimate), float(r.stderr)


TOOLS: dict[str, type[Tool]] = {
    "sharpmeter": Sharpmeter,
    "PyHessian": PyHessian,
    "curvlinops": Curvlinops,
    "hessian-eigenthings": Eigenthings,
}


def make_tools(problem) -> tuple[dict[str, Tool], dict[str, float], dict[str, str]]:
    """Every tool on ``problem``: instances, construction seconds, and errors of those that fail."""
    tools, build_seconds, errors = {}, {}, {}
    for name, cls in TOOLS.items():
        start = time.perf_counter()
        try:
            tools[name] = cls(problem)
        except Exception as error:  # a peer that cannot run this model is a result, not a crash
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            continue
        build_seconds[name] = time.perf_counter() - start
        for p in problem.params:  # PyHessian leaves the gradient (with its graph) in .grad
            p.grad = None
    return tools, build_seconds, errors
