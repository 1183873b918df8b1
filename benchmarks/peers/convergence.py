"""HVPs until lambda_max is within a tolerance of the dense value (cold and warm starts), and the
budget at which a trace estimate's standard error falls below a fraction of the trace."""

from __future__ import annotations

import math
import statistics
import time

import torch

from benchmarks.peers.reference import relative
from benchmarks.peers.tools import Curvlinops, PyHessian, Tool


def estimates(records: list, method: str) -> list[float]:
    """The estimate an algorithm would return after each of its recorded products.

    Power iteration returns the Rayleigh quotient of its current vector; Lanczos (full
    reorthogonalisation) the top Ritz value of the basis so far, i.e. of ``Q^T H Q``.
    """
    vs = torch.stack([v for v, _ in records]).double()
    ws = torch.stack([w for _, w in records]).double()
    if method == "power":
        return ((vs * ws).sum(1) / (vs * vs).sum(1)).tolist()
    values = []
    for j in range(1, len(records) + 1):
        q, r = torch.linalg.qr(vs[:j].T)
        hq = torch.linalg.solve_triangular(r, ws[:j], upper=True, left=True).T
        t = q.T @ hq
        values.append(float(torch.linalg.eigvalsh((t + t.T) / 2)[-1]))
    return values


def hvps_to_tolerance(values: list[float], lam: float, tol: float) -> int | None:
    """Products until the estimate stays within ``tol`` of ``lam`` (None: not within the run)."""
    errors = [relative(v, lam) for v in values]
    if not errors or errors[-1] > tol:
        return None
    last_bad = max((i for i, e in enumerate(errors) if e > tol), default=-1)
    return last_bad + 2


def convergence(tools, lam: float, v_prev, tol: float, horizons: dict, seeds: int) -> list[dict]:
    """HVPs and seconds to reach ``tol`` on lambda_max, cold (median over seeds) and warm."""
    rows = []
    for name, tool in tools.items():
        for method in tool.eigen_methods:
            row = {"tool": name, "method": method}
            starts = [("cold", seed, None) for seed in range(seeds)]
            if method in tool.warm_start:
                starts.append(("warm", 0, v_prev))
            for start, seed, v0 in starts:
                if isinstance(tool, Curvlinops):  # ARPACK: its own stopping rule at `tol`
                    count, seconds, value = own_rule_eigsh(tool, tol, seed, v0)
                    row.setdefault(f"{start}_note", "eigsh(tol) stopping rule")
                    row.setdefault(f"{start}_final_error", []).append(relative(value, lam))
                else:
                    with tool.recording() as records:
                        tool.eigen(method, horizons[method], seed, v0)
                    count = hvps_to_tolerance(estimates(records, method), lam, tol)
                    seconds = timed_run(tool, method, count, seed, v0) if count else None
                row.setdefault(f"{start}_hvps", []).append(count)
                row.setdefault(f"{start}_seconds", []).append(seconds)
            row["horizon"] = horizons[method]
            rows.append(row)
    return rows


def own_rule_eigsh(tool: Curvlinops, tol: float, seed: int, v0) -> tuple[int, float, float]:
    before, start = tool.num_hvps, time.perf_counter()
    value = tool.eigsh(v0, seed, tol=tol, return_eigenvectors=False)
    return tool.num_hvps - before, time.perf_counter() - start, value


def timed_run(tool: Tool, method: str, budget: int, seed: int, v0) -> float:
    start = time.perf_counter()
    tool.eigen(method, budget, seed, v0)
    return time.perf_counter() - start


def trace_to_stderr(tools, exact: float, target: float, max_budget: int, seeds: int) -> list[dict]:
    """Smallest doubling budget whose standard error, averaged over ``seeds`` probe sets, is
    below ``target`` x |trace|; with the RMS of the actual error there.

    Averaging keeps a lucky draw (a small sample's standard error is itself noisy) from
    deciding. PyHessian reports no standard error: it is computed here from the samples it
    returns. curvlinops returns neither, so it has no row.
    """
    rows = []
    for name, tool in tools.items():
        methods = tool.trace_stderr or (("hutchinson",) if isinstance(tool, PyHessian) else ())
        for method in methods:
            budget, found = 12, None
            while budget <= max_budget and found is None:
                stderrs, squares, start = [], [], time.perf_counter()
                for seed in range(seeds):
                    if isinstance(tool, PyHessian):
                        samples = tool.trace_samples(budget, seed)
                        value = statistics.fmean(samples)
                        stderr = statistics.stdev(samples) / math.sqrt(len(samples))
                    else:
                        value, stderr = tool.trace(method, budget, seed)
                    stderrs.append(stderr / abs(exact))
                    squares.append(relative(value, exact) ** 2)
                if statistics.fmean(stderrs) <= target:
                    found = {
                        "budget": budget,
                        "stderr": statistics.fmean(stderrs),
                        "error": math.sqrt(statistics.fmean(squares)),
                        "seconds": (time.perf_counter() - start) / seeds,
                    }
                budget *= 2
            rows.append({"tool": name, "method": method, **(found or {"budget": None})})
    return rows
