"""Seconds per HVP and per construction (round-robin in one process) and peak RSS (a fresh process
per tool) on the float32 problems."""

from __future__ import annotations

import time

import torch

from benchmarks._common import peak_rss_mib
from benchmarks.peers.problems import make_problem
from benchmarks.peers.tools import Curvlinops, Eigenthings, PyHessian, Sharpmeter


def speed_worker(spec: dict) -> dict:
    """Seconds per HVP and per construction of every tool, round-robin in this process.

    Each round computes one gradient, then for each tool in turn builds it, makes
    ``hvps_per_round`` HVPs and drops it (one tool alive at a time). Round 0 warms up. The first
    HVP after a build is kept apart: it also pays for first-touch memory (page faults), which
    the allocator's state decides more than the tool does.
    """
    torch.set_num_threads(spec["threads"])
    problem = make_problem(spec["problem"])
    params, loss_fn, batch = problem.params, problem.loss_fn, problem.batch
    v = torch.randn(problem.dim, generator=torch.Generator().manual_seed(0), dtype=problem.dtype)
    builders = speed_builders(problem)
    seconds: dict[str, list[float]] = {"gradient": [], **{name: [] for name in builders}}
    build_seconds: dict[str, list[float]] = {name: [] for name in builders}
    first_seconds: dict[str, list[float]] = {name: [] for name in builders}
    for round_index in range(spec["repeats"] + 1):
        keep = round_index > 0
        start = time.perf_counter()
        torch.autograd.grad(loss_fn(problem.model, batch), params)
        if keep:
            seconds["gradient"].append(time.perf_counter() - start)
        for name, build in builders.items():
            for p in params:  # PyHessian accumulates into, and leaves its graph in, .grad
                p.grad = None
            start = time.perf_counter()
            tool = build()
            if keep:
                build_seconds[name].append(time.perf_counter() - start)
            for index in range(spec["hvps_per_round"]):
                start = time.perf_counter()
                tool.hvp(v)
                if keep:
                    target = first_seconds if index == 0 else seconds
                    target[name].append(time.perf_counter() - start)
            del tool
    for p in params:
        p.grad = None
    return {
        "params": problem.dim,
        "seconds": seconds,
        "build_seconds": build_seconds,
        "first_seconds": first_seconds,
    }


def speed_builders(problem) -> dict:
    return {
        "sharpmeter": lambda: Sharpmeter(problem),
        "sharpmeter (no graph reuse)": lambda: Sharpmeter(problem, reuse_graph=False),
        "PyHessian": lambda: PyHessian(problem),
        "curvlinops": lambda: Curvlinops(problem),
        "hessian-eigenthings": lambda: Eigenthings(problem),
    }


def memory_worker(spec: dict) -> dict:
    """Peak RSS of a fresh process that builds one tool and makes 2 HVPs (or a reference)."""
    torch.set_num_threads(spec["threads"])
    problem = make_problem(spec["problem"])
    tool = spec["tool"]
    if tool == "gradient":
        for _ in range(2):
            torch.autograd.grad(problem.loss_fn(problem.model, problem.batch), problem.params)
    elif tool == "training step":
        optimizer = torch.optim.AdamW(problem.params, lr=1e-4)
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            problem.loss_fn(problem.model, problem.batch).backward()
            optimizer.step()
    elif tool != "baseline":
        instance = speed_builders(problem)[tool]()
        v = torch.randn(problem.dim, generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            instance.hvp(v.to(problem.dtype))
    return {"peak_rss_mib": peak_rss_mib()}
