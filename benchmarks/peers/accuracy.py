"""Accuracy against the dense Hessian: one HVP, lambda_max and the trace at equal HVP budgets and
with each tool's defaults; the worker that runs every measurement of a small float64 problem."""

from __future__ import annotations

import copy
import math
import statistics
import time

import torch

from benchmarks.peers.convergence import convergence, trace_to_stderr
from benchmarks.peers.problems import make_problem
from benchmarks.peers.reference import dense_hessian, relative, train_steps
from benchmarks.peers.side_effects import side_effects
from benchmarks.peers.tools import TOOLS, Eigenthings, Sharpmeter, Tool, make_tools


def hvp_accuracy(problem, tools: dict[str, Tool], hessian: torch.Tensor) -> dict[str, float]:
    """Worst relative error ``||Hv - H_dense v|| / ||H_dense v||`` over 3 Gaussian vectors."""
    # Finite differences write the parameters (and restore them), which would invalidate the
    # gradient graph PyHessian keeps: they run on a copy.
    twin = copy.deepcopy(problem)
    extra = {
        "sharpmeter (mode=fwd)": lambda: Sharpmeter(problem, mode="fwd"),
        "sharpmeter (mode=fd)": lambda: Sharpmeter(twin, mode="fd"),
        "hessian-eigenthings (finite_difference)": lambda: Eigenthings(
            twin, method="finite_difference"
        ),
    }
    candidates = {**tools, **{name: build() for name, build in extra.items()}}
    generator = torch.Generator().manual_seed(123)
    vectors = [torch.randn(problem.dim, generator=generator, dtype=problem.dtype) for _ in range(3)]
    errors = {}
    for name, tool in candidates.items():
        worst = 0.0
        for v in vectors:
            exact = hessian @ v
            hv = tool.hvp(v).to(exact.dtype)
            worst = max(worst, float(torch.linalg.vector_norm(hv - exact) / exact.norm()))
        errors[name] = worst
    return errors


def equal_budget_eigen(tools, lam: float, budgets: list[int], seeds: int) -> list[dict]:
    """Median relative error of lambda_max per (tool, method, budget) over ``seeds`` starts."""
    rows = []
    for name, tool in tools.items():
        for method in tool.eigen_methods:
            errors, spent = {}, {}
            for budget in budgets:
                values, before = [], tool.num_hvps
                for seed in range(seeds):
                    values.append(relative(tool.eigen(method, budget, seed), lam))
                errors[budget] = statistics.median(values)
                spent[budget] = (tool.num_hvps - before) / seeds
            rows.append({"tool": name, "method": method, "error": errors, "hvps": spent})
    return rows


def equal_budget_trace(tools, exact: float, budgets: list[int], seeds: int) -> list[dict]:
    """RMS relative error of the trace per (tool, method, budget) over ``seeds`` probe sets.

    ``mse_stderr`` is the standard error of the mean squared error, to tell a real difference
    between tools from the luck of the probes.
    """
    rows = []
    for name, tool in tools.items():
        for method in tool.trace_methods:
            row = {"tool": name, "method": method, "error": {}, "mse_stderr": {}, "hvps": {}}
            for budget in budgets:
                squares, before = [], tool.num_hvps
                for seed in range(seeds):
                    value, _ = tool.trace(method, budget, seed)
                    squares.append(relative(value, exact) ** 2)
                row["error"][budget] = math.sqrt(statistics.fmean(squares))
                row["mse_stderr"][budget] = statistics.stdev(squares) / math.sqrt(seeds)
                row["hvps"][budget] = (tool.num_hvps - before) / seeds
            rows.append(row)
    return rows


def defaults(tools, lam: float, exact_trace: float) -> list[dict]:
    """Each tool's own default calls: value, error, HVPs, seconds."""
    rows = []
    for name, tool in tools.items():
        for kind, call, exact in (
            ("lambda_max", tool.default_eigen, lam),
            ("trace", tool.default_trace, exact_trace),
        ):
            before, start = tool.num_hvps, time.perf_counter()
            try:
                label, value, *stderr = call()
            except NotImplementedError as reason:
                rows.append({"tool": name, "kind": kind, "call": str(reason)})
                continue
            rows.append(
                {
                    "tool": name,
                    "kind": kind,
                    "call": label,
                    "value": value,
                    "error": relative(value, exact),
                    "stderr": stderr[0] if stderr else None,
                    "hvps": tool.num_hvps - before,
                    "seconds": time.perf_counter() - start,
                }
            )
    return rows


def accuracy_worker(spec: dict) -> dict:
    """Accuracy, defaults, convergence, trace-to-stderr and side effects on one small problem."""
    torch.set_num_threads(spec["threads"])
    problem = make_problem(spec["problem"])
    v_prev = train_steps(problem, spec["train_steps"])
    start = time.perf_counter()
    hessian = dense_hessian(problem)
    dense_seconds = time.perf_counter() - start
    spectrum = torch.linalg.eigvalsh(hessian)
    lam, exact_trace = float(spectrum[-1]), float(hessian.trace())
    tools, build_seconds, errors = make_tools(problem)
    out = {
        "params": problem.dim,
        "dense_seconds": dense_seconds,
        "lambda_max": lam,
        "lambda_min": float(spectrum[0]),
        "lambda_2": float(spectrum[-2]),
        "trace": exact_trace,
        "build_errors": errors,
        "hvp_error": hvp_accuracy(problem, tools, hessian),
        "eigen": equal_budget_eigen(tools, lam, spec["eigen_budgets"], spec["seeds"]),
        "trace_budget": equal_budget_trace(
            tools, exact_trace, spec["trace_budgets"], spec["trace_seeds"]
        ),
        "defaults": defaults(tools, lam, exact_trace),
        "convergence": convergence(
            tools,
            lam,
            v_prev,
            spec["tol"],
            {"lanczos": 60, "power": 300, "eigsh": 0},
            spec["convergence_seeds"],
        ),
        "trace_stderr": trace_to_stderr(
            tools,
            exact_trace,
            spec["trace_rel_stderr"],
            spec["trace_max_budget"],
            spec["stderr_seeds"],
        ),
    }
    out["side_effects"] = {name: side_effects(spec["problem"], name) for name in TOOLS}
    return out
