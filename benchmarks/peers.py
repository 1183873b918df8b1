"""sharpmeter side by side with PyHessian, curvlinops and hessian-eigenthings (issue 5).

Run in the peers' venv (``bash benchmarks/setup_peers.sh`` creates it)::

    benchmarks/.venv-peers/bin/python benchmarks/peers.py          # writes results/peers.md

Every tool gets the same model, batch, loss and machine, in one run (adapters: ``peer_tools``).

**Accuracy** (float64: a ~5.5K-parameter GPT-2 and a ~6.6K-parameter MLP, each after a few
AdamW steps): the dense Hessian, built row by row with double backward, is the reference.
Reported: the relative error of one HVP; the top-eigenvalue and trace errors at equal HVP
budgets (median / RMS over seeds) and with each tool's defaults.

**Convergence**: HVPs until the estimate of lambda_max stays within ``--tol`` (relative) of the
dense value, read from the products each algorithm makes (power iteration: the Rayleigh quotient
of the current vector; Lanczos: the top Ritz value of the Krylov basis so far), cold (random
start) and warm (started from the previous training step's top eigenvector); then seconds of
a run with exactly that budget. Trace: the budget (doubling) at which the reported standard
error, averaged over a few probe sets, falls below ``--trace-rel-stderr`` of the trace.

**Speed and memory** (float32 GPT-2s of ~1M and ~10M parameters, batch 8 x 128, and a ~1M
MLP): seconds per HVP and per construction, every tool called round-robin in one process
(medians over rounds); peak RSS of a fresh subprocess per tool (build + 2 HVPs).

**Critical sharpness** (sharpmeter only, no peer has it): forwards and seconds per measurement
along AdamW's update direction, cold and warm-started.

**State side effects**: a model in train mode with ``.grad`` set runs each tool's eigenvalue and
trace; reported: train/eval flags, ``.grad``, parameters and the global RNG changed or not.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from _common import (
    GPT2_SIZES,
    RESULTS,
    GPT2Size,
    command_line,
    fmt,
    gpt2,
    header,
    markdown_table,
    median,
    peak_rss_mib,
    run_worker,
    save_markdown,
    token_batch,
)
from peer_tools import (
    TOOLS,
    Curvlinops,
    Eigenthings,
    PyHessian,
    Sharpmeter,
    Tool,
    classifier_problem,
    dense_hessian,
    gpt2_problem,
)
from torch import nn

import sharpmeter as sm

TINY_GPT2 = GPT2Size("tiny", vocab_size=128, n_embd=12, n_layer=2, n_head=2, n_positions=16)
ACCURACY_PROBLEMS = ("gpt2-tiny", "mlp-tiny")
SPEED_PROBLEMS = ("gpt2-1M", "gpt2-10M", "mlp-1M")
PACKAGES = {
    "sharpmeter": "sharpmeter",
    "PyHessian": "pyhessian",
    "curvlinops": "curvlinops-for-pytorch",
    "hessian-eigenthings": "hessian-eigenthings",
}


# --------------------------------------------------------------------------- problems


def mlp(widths: list[int], dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A tanh MLP, the peers' home ground (no attention, no LayerNorm)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype).eval()


def make_problem(name: str, batch_size: int = 8, seq_len: int = 128):
    """The model, batch and loss of one named problem."""
    if name == "gpt2-tiny":
        model = gpt2(TINY_GPT2, torch.float64)
        return gpt2_problem(model, token_batch(TINY_GPT2.vocab_size, 4, 16), name)
    if name.startswith("gpt2-"):
        model = gpt2(GPT2_SIZES[name.removeprefix("gpt2-")])
        return gpt2_problem(model, token_batch(model.config.vocab_size, batch_size, seq_len), name)
    widths, samples, dtype = (
        ([64, 64, 32, 10], 256, torch.float64)
        if name == "mlp-tiny"
        else ([784, 1024, 256, 10], 512, torch.float32)
    )
    model = mlp(widths, dtype)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(samples, widths[0], generator=generator, dtype=dtype)
    targets = torch.randint(0, widths[-1], (samples,), generator=generator)
    return classifier_problem(model, inputs, targets, name)


def train_steps(problem, steps: int, lr: float = 1e-3) -> torch.Tensor:
    """AdamW steps on the probe batch; returns the top eigenvector *before* the last step.

    That vector is the warm start a measurement at the next step would use.
    """
    optimizer = torch.optim.AdamW(problem.params, lr=lr)
    previous = None
    for step in range(steps):
        if step == steps - 1:
            op = sm.HessianOperator(problem.model, problem.loss_fn, problem.batch)
            previous = sm.lanczos(op, max_iter=100, tol=1e-10).vector
            del op
        optimizer.zero_grad(set_to_none=True)
        problem.loss_fn(problem.model, problem.batch).backward()
        optimizer.step()
    for p in problem.params:
        p.grad = None
    return previous


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


def relative(estimate: float, exact: float) -> float:
    return abs(estimate - exact) / abs(exact)


# --------------------------------------------------------------------------- accuracy


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


# --------------------------------------------------------------------------- convergence


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


# --------------------------------------------------------------------------- side effects


def side_effects(name: str, tool_name: str) -> dict:
    """Run a tool on a model in train mode with ``.grad`` set; what did it leave changed?"""
    problem = make_problem(name)
    model = problem.model.train()
    for p in problem.params:
        p.grad = torch.full_like(p, 0.5)
    grads = [p.grad for p in problem.params]
    params = [p.detach().clone() for p in problem.params]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    def run() -> None:
        tool = TOOLS[tool_name](problem)
        # seed=None: no seeding of the global RNG by this adapter, only what the tool does
        tool.eigen(tool.eigen_methods[0], 6, None)
        tool.trace(tool.trace_methods[-1], 6, None)

    if tool_name == "sharpmeter":
        with sm.measurement(model):
            run()
    else:
        run()
    return {
        "mode": [m.training for m in model.modules()] != modes,
        "grad": any(
            p.grad is not g or not torch.equal(p.grad, torch.full_like(p, 0.5))
            for p, g in zip(problem.params, grads, strict=True)
        ),
        "params": not all(torch.equal(p, q) for p, q in zip(problem.params, params, strict=True)),
        "rng": not torch.equal(torch.get_rng_state(), rng),
        "math_kernel": needs_math_kernel(name, tool_name),
    }


def needs_math_kernel(name: str, tool_name: str) -> str:
    """Does one HVP of the tool run with the default (fused) attention kernel?"""
    if not name.startswith("gpt2"):
        return "n/a"
    problem = make_problem(name)
    try:
        tool = TOOLS[tool_name](problem, math_kernel=False)
        tool.hvp(torch.ones(problem.dim, dtype=problem.dtype))
    except Exception as error:
        return f"fails ({type(error).__name__})"
    return "runs"


# --------------------------------------------------------------------------- workers


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


def critical_worker(spec: dict) -> dict:
    """Critical sharpness along AdamW's direction: forwards and seconds, cold and warm."""
    torch.set_num_threads(spec["threads"])
    problem = make_problem(spec["problem"])
    model, loss_fn, batch = problem.model, problem.loss_fn, problem.batch
    optimizer = torch.optim.AdamW(problem.params, lr=1e-3)
    for _ in range(2):  # state for the direction, then the gradient of the step to come
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    direction = sm.update_direction(optimizer)
    gradient = torch.cat([p.grad.reshape(-1) for p in problem.params])
    out: dict = {"params": problem.dim}
    with torch.no_grad():
        start = time.perf_counter()
        loss_fn(model, batch)
        out["forward_seconds"] = time.perf_counter() - start
    eta0 = 1e-3
    for label in ("cold", "warm"):
        start = time.perf_counter()
        r = sm.critical_sharpness(model, loss_fn, batch, direction, eta0=eta0, gradient=gradient)
        out[label] = {
            "seconds": time.perf_counter() - start,
            "forwards": r.num_forward,
            "value": r.value,
            "status": r.status,
            "eta0": eta0,
        }
        eta0 = r.eta_c if r.status == "ok" else eta0
    # Twice: the first also pays for first-touch memory (page faults of the double backward's
    # buffers), which costs seconds in this VM at 10M parameters.
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        op = sm.HessianOperator(model, loss_fn, batch)
        d = sm.directional_sharpness(op, direction, gradient)
        seconds.append(time.perf_counter() - start)
        del op
    out["directional"] = {"seconds": seconds[1], "first_seconds": seconds[0], "value": d.value}
    out["peak_rss_mib"] = peak_rss_mib()
    return out


WORKERS = {
    "accuracy": accuracy_worker,
    "speed": speed_worker,
    "memory": memory_worker,
    "critical": critical_worker,
}


# --------------------------------------------------------------------------- tables


def pct(value: float | None) -> str:
    if value is None or value != value:
        return "–"
    return f"{100 * value:.2g}%" if value >= 1e-4 else f"{value:.1e}"


def accuracy_tables(name: str, result: dict, args) -> list[str]:
    lines = [
        f"### {name} ({result['params']:,} parameters, float64)",
        "",
        f"Dense reference ({result['dense_seconds']:.0f} s): lambda_max = "
        f"{result['lambda_max']:.6g}, lambda_2 = {result['lambda_2']:.6g}, lambda_min = "
        f"{result['lambda_min']:.6g}, trace = {result['trace']:.6g}.",
        "",
    ]
    for tool, error in result["build_errors"].items():
        lines += [f"- {tool} could not be built: {error}", ""]
    rows = [[tool, pct(err)] for tool, err in result["hvp_error"].items()]
    lines += ["HVP relative error (worst of 3 Gaussian vectors):", ""]
    lines += markdown_table(["tool", "rel. error of Hv"], rows)

    budgets = args.eigen_budgets
    rows = [
        [f"{r['tool']} {r['method']}"]
        + [pct(r["error"][str(b)]) for b in budgets]
        + ["/".join(f"{r['hvps'][str(b)]:g}" for b in budgets)]
        for r in result["eigen"]
    ]
    lines += [
        f"lambda_max relative error at equal HVP budgets (median of {args.seeds} random starts;"
        " curvlinops: ARPACK `eigsh(ncv=budget, maxiter=1)`, which spends more than the budget "
        "and returns nothing (–) when no Ritz value converged):",
        "",
    ]
    lines += markdown_table(
        ["tool, method"] + [f"{b} HVPs" for b in budgets] + ["HVPs actually spent"], rows
    )

    budgets = args.trace_budgets
    rows = [
        [f"{r['tool']} {r['method']}"] + [pct(r["error"][str(b)]) for b in budgets]
        for r in result["trace_budget"]
    ]
    lines += [
        f"Trace relative error at equal HVP budgets (RMS over {args.trace_seeds} probe sets; "
        "the same seed gives sharpmeter, PyHessian and hessian-eigenthings the same Rademacher "
        "probes):",
        "",
    ]
    lines += markdown_table(["tool, method"] + [f"{b} HVPs" for b in budgets], rows)

    rows = []
    for r in result["defaults"]:
        if "value" not in r:
            rows.append([r["tool"], r["kind"], r["call"], "–", "–", "–", "–"])
            continue
        rows.append(
            [
                r["tool"],
                r["kind"],
                f"`{r['call']}`",
                fmt(r["value"], 6),
                pct(r["error"]),
                str(r["hvps"]),
                fmt(r["seconds"], 2),
            ]
        )
    lines += ["Each tool's defaults:", ""]
    lines += markdown_table(
        ["tool", "quantity", "call", "value", "rel. error", "HVPs", "seconds"], rows
    )
    return lines


def convergence_table(name: str, result: dict, args) -> list[str]:
    def show(values: list | None, digits: int = 3) -> str:
        if not values:
            return "n/a"
        if any(v is None for v in values):
            return "not reached"
        return fmt(statistics.median(values), digits)

    rows = []
    for r in result["convergence"]:
        horizon = "own rule" if r["tool"] == "curvlinops" else f"{r['horizon']}"
        rows.append(
            [
                f"{r['tool']} {r['method']}",
                show(r.get("cold_hvps")),
                show(r.get("cold_seconds"), 2),
                show(r.get("warm_hvps")),
                show(r.get("warm_seconds"), 2),
                horizon,
            ]
        )
    lines = [
        f"### {name}: HVPs to lambda_max within {args.tol:g} (relative)",
        "",
        f"cold: median over {args.convergence_seeds} random starts; warm: started from the top "
        "eigenvector of the previous training step. 'not reached': not within the horizon. "
        "curvlinops (scipy ARPACK) is run with its own stopping rule `eigsh(tol)`.",
        "",
    ]
    lines += markdown_table(
        ["tool, method", "cold HVPs", "cold s", "warm HVPs", "warm s", "horizon"], rows
    )
    rows = [
        [
            f"{r['tool']} {r['method']}",
            str(r["budget"]) if r["budget"] else f"> {args.trace_max_budget}",
            pct(r.get("stderr")),
            pct(r.get("error")),
            fmt(r.get("seconds"), 2),
        ]
        for r in result["trace_stderr"]
    ]
    lines += [
        f"Trace to a standard error <= {100 * args.trace_rel_stderr:g}% of the trace (mean over "
        f"{args.stderr_seeds} probe sets; budgets doubling from 12; PyHessian's stderr computed "
        "here from its samples; curvlinops reports none; seconds per estimate):",
        "",
    ]
    lines += markdown_table(
        ["tool, method", "HVPs", "mean rel. stderr", "RMS rel. error", "seconds"], rows
    )
    return lines


def speed_tables(speed: dict, memory: dict) -> list[str]:
    lines = []
    for name, result in speed.items():
        if "error" in result:
            lines += [f"### {name}: error {result['error']}", ""]
            continue
        seconds = {tool: median(s) for tool, s in result["seconds"].items()}
        base = seconds["sharpmeter"]
        rows = []
        for tool, s in seconds.items():
            rss = memory.get(name, {}).get(tool, {})
            rows.append(
                [
                    tool,
                    fmt(s),
                    fmt(s / base, 3) if tool != "gradient" else "–",
                    fmt(s / seconds["gradient"], 3),
                    fmt(median(result["build_seconds"].get(tool, [])), 3),
                    fmt(median(result["first_seconds"].get(tool, [])), 3),
                    rss.get("error") or fmt(rss.get("peak_rss_mib"), 4),
                ]
            )
        for extra in ("baseline", "training step"):
            rss = memory.get(name, {}).get(extra, {})
            rows.append([extra, "–", "–", "–", "–", "–", fmt(rss.get("peak_rss_mib"), 4)])
        lines += [f"### {name} ({result['params']:,} parameters, float32)", ""]
        lines += markdown_table(
            [
                "tool",
                "s / HVP (median)",
                "x sharpmeter",
                "x gradient",
                "construction s",
                "first HVP after it, s",
                "peak RSS MiB",
            ],
            rows,
        )
    return lines


def critical_table(critical: dict) -> list[str]:
    rows = []
    for name, r in critical.items():
        if "error" in r:
            rows.append([name, f"error: {r['error']}"] + [""] * 6)
            continue
        for label in ("cold", "warm"):
            c = r[label]
            rows.append(
                [
                    name,
                    f"critical_sharpness, {label} (eta0 = {c['eta0']:.3g})",
                    str(c["forwards"]),
                    fmt(c["seconds"], 3),
                    fmt(c["seconds"] / r["forward_seconds"], 3),
                    fmt(c["value"], 5),
                    c["status"],
                ]
            )
        d = r["directional"]
        rows.append(
            [
                name,
                f"directional_sharpness (build + 1 HVP; first call {d['first_seconds']:.2g} s)",
                "–",
                fmt(d["seconds"], 3),
                fmt(d["seconds"] / r["forward_seconds"], 3),
                fmt(d["value"], 5),
                "",
            ]
        )
    return markdown_table(
        ["model", "measurement", "forwards", "seconds", "x one forward", "value", "status"], rows
    )


def side_effect_table(accuracy: dict) -> list[str]:
    rows = []
    for name, result in accuracy.items():
        for tool, effects in result.get("side_effects", {}).items():
            rows.append(
                [
                    name,
                    tool,
                    *("yes" if effects[key] else "no" for key in ("mode", "grad", "params", "rng")),
                    effects["math_kernel"],
                ]
            )
    return markdown_table(
        [
            "model",
            "tool",
            "train/eval mode changed",
            ".grad changed",
            "parameters changed",
            "global RNG advanced",
            "one HVP with default SDPA kernel",
        ],
        rows,
    )


def best_per_tool(rows: list[dict], budget: str) -> dict[str, tuple[float, float | None]]:
    """Each tool's most accurate method at ``budget``: (error, stderr of its MSE or None)."""
    best: dict[str, tuple[float, float | None]] = {}
    for r in rows:
        error = r["error"][budget]
        if error == error and error < best.get(r["tool"], (math.inf, None))[0]:
            best[r["tool"]] = (error, r.get("mse_stderr", {}).get(budget))
    return best


def clearly_better(theirs: tuple, ours: tuple) -> bool:
    """A peer beats sharpmeter beyond chance: by two standard errors of the MSE (trace), or by
    a factor 2 above rounding level (eigenvalues: median over starts, no standard error)."""
    (e_theirs, se_theirs), (e_ours, se_ours) = theirs, ours
    if se_theirs is not None and se_ours is not None:
        return e_ours**2 - e_theirs**2 > 2 * math.hypot(se_theirs, se_ours)
    return e_ours > 1e-10 and e_theirs < e_ours / 2


def targets_table(accuracy: dict, speed: dict, args) -> list[str]:
    """The issue-5 targets, each with the numbers it was judged on."""
    rows = []
    # 1. accuracy at equal budget: sharpmeter's best method vs every peer's best, per budget.
    for name, result in accuracy.items():
        for kind, budgets in (("eigen", args.eigen_budgets), ("trace_budget", args.trace_budgets)):
            beaten = []
            for b in budgets:
                best = best_per_tool(result[kind], str(b))
                ours = best.pop("sharpmeter", None)
                beaten += [
                    f"{tool} at {b} HVPs ({pct(theirs[0])} vs {pct(ours[0])})"
                    for tool, theirs in best.items()
                    if ours is None or clearly_better(theirs, ours)
                ]
            label = "lambda_max" if kind == "eigen" else "trace"
            rows.append(
                [
                    f"as accurate as every peer at equal budget: {label}, {name}",
                    "met" if not beaten else "NOT met: " + "; ".join(beaten),
                ]
            )
    # 2. speed per HVP vs PyHessian on the GPT-2s.
    for name, result in speed.items():
        if not name.startswith("gpt2") or "error" in result:
            continue
        s = {tool: median(v) for tool, v in result["seconds"].items()}
        ratio = s["PyHessian"] / s["sharpmeter"]
        rows.append(
            [
                f">= 1.2x faster per HVP than PyHessian (PyHessian s / sharpmeter s), {name}",
                f"{ratio:.2f}x ({'met' if ratio >= 1.2 else 'NOT met'})",
            ]
        )
    # 3. Lanczos + warm start vs power iteration.
    for name, result in accuracy.items():
        conv = {(r["tool"], r["method"]): r for r in result["convergence"]}
        warm = conv[("sharpmeter", "lanczos")].get("warm_hvps", [None])[0]
        for key in (("PyHessian", "power"), ("sharpmeter", "power")):
            cold = conv.get(key, {}).get("cold_hvps")
            if not cold or warm is None or any(c is None for c in cold):
                verdict = f"cannot judge (warm Lanczos {warm}, power {cold})"
            else:
                ratio = statistics.median(cold) / warm
                verdict = f"{ratio:.1f}x ({warm} vs {statistics.median(cold):g} HVPs)"
                verdict += " met" if ratio >= 2 else " NOT met"
            rows.append(
                [f">= 2x fewer HVPs: Lanczos warm vs {key[0]} power (cold), {name}", verdict]
            )
    # 4. state side effects.
    for name, result in accuracy.items():
        effects = result.get("side_effects", {}).get("sharpmeter", {})
        changed = [k for k in ("mode", "grad", "params", "rng") if effects.get(k)]
        rows.append(
            [f"no state side effects (sharpmeter), {name}", "met" if not changed else str(changed)]
        )
    return markdown_table(["target", "result"], rows)


def versions() -> list[str]:
    found = []
    for tool, package in PACKAGES.items():
        try:
            found.append(f"{tool} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{tool} not installed")
    return found


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="accuracy,speed,critical")
    parser.add_argument("--accuracy-problems", default=",".join(ACCURACY_PROBLEMS))
    parser.add_argument("--speed-problems", default=",".join(SPEED_PROBLEMS))
    parser.add_argument("--eigen-budgets", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--trace-budgets", type=int, nargs="+", default=[12, 48])
    parser.add_argument("--seeds", type=int, default=8, help="random starts per eigen budget")
    parser.add_argument("--trace-seeds", type=int, default=10, help="probe sets per trace budget")
    parser.add_argument("--stderr-seeds", type=int, default=3, help="probe sets per stderr try")
    parser.add_argument("--convergence-seeds", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-3, help="relative error on lambda_max")
    parser.add_argument("--trace-rel-stderr", type=float, default=0.02)
    parser.add_argument("--trace-max-budget", type=int, default=1536)
    parser.add_argument("--train-steps", type=int, default=20, help="AdamW steps before measuring")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (speed)")
    parser.add_argument("--repeats-10m", type=int, default=1, help="timed rounds, 10M GPT-2")
    parser.add_argument("--hvps-per-round", type=int, default=3, help="HVPs per tool and round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.md")
    parser.add_argument("--json", type=Path, default=RESULTS / "peers.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec.pop("kind")](spec)))
        return

    started = time.perf_counter()
    parts = args.parts.split(",")
    script = Path(__file__)
    common = {"threads": args.threads}
    accuracy, speed, memory, critical = {}, {}, {}, {}
    if "accuracy" in parts:
        for name in args.accuracy_problems.split(","):
            spec = {
                **common,
                "kind": "accuracy",
                "problem": name,
                "train_steps": args.train_steps,
                "eigen_budgets": args.eigen_budgets,
                "trace_budgets": args.trace_budgets,
                "seeds": args.seeds,
                "trace_seeds": args.trace_seeds,
                "stderr_seeds": args.stderr_seeds,
                "convergence_seeds": args.convergence_seeds,
                "tol": args.tol,
                "trace_rel_stderr": args.trace_rel_stderr,
                "trace_max_budget": args.trace_max_budget,
            }
            accuracy[name] = run_worker(script, spec, timeout=1800)
            print(f"accuracy {name}: {accuracy[name].get('error', 'done')}", flush=True)
    if "speed" in parts:
        for name in args.speed_problems.split(","):
            repeats = args.repeats_10m if name.endswith("10M") else args.repeats
            spec = {
                **common,
                "kind": "speed",
                "problem": name,
                "repeats": repeats,
                "hvps_per_round": args.hvps_per_round,
            }
            speed[name] = run_worker(script, spec, timeout=1800)
            print(f"speed {name}: {speed[name].get('error', 'done')}", flush=True)
            memory[name] = {}
            tools = ["baseline", "gradient", "training step", *speed_builders(None)]
            for tool in tools:
                spec = {**common, "kind": "memory", "problem": name, "tool": tool}
                memory[name][tool] = run_worker(script, spec, timeout=1800)
            print(f"memory {name}: done", flush=True)
    if "critical" in parts:
        for name in [p for p in args.speed_problems.split(",") if p.startswith("gpt2")]:
            spec = {**common, "kind": "critical", "problem": name}
            critical[name] = run_worker(script, spec, timeout=1800)
            print(f"critical {name}: {critical[name].get('error', 'done')}", flush=True)

    raw = {"accuracy": accuracy, "speed": speed, "memory": memory, "critical": critical}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(raw, indent=1))
    write_report(args, raw, time.perf_counter() - started)


def write_report(args, raw: dict, seconds: float) -> None:
    accuracy = {k: v for k, v in raw["accuracy"].items() if "error" not in v}
    notes = [
        ", ".join(versions()),
        f"{args.threads} torch thread(s); whole run {seconds / 60:.1f} min",
        "peers' calls run under `sdpa_kernel(SDPBackend.MATH)`: with the default (CPU flash) "
        "attention kernel PyHessian and hessian-eigenthings fail in the double backward and "
        "curvlinops in forward-mode AD (see the side-effects table); sharpmeter switches the "
        "kernel itself",
        "GPT-2 losses: next-token cross entropy computed here from the logits (a `LogitsAdapter`"
        " + `CrossEntropyLoss` for PyHessian and curvlinops, `loss_fn(model, batch)` for "
        "sharpmeter and hessian-eigenthings), the same number for all",
    ]
    lines = header(
        "sharpmeter vs PyHessian, curvlinops, hessian-eigenthings (issue 5)", command_line(), notes
    )
    for name, result in raw["accuracy"].items():
        if "error" in result:
            lines += [f"- accuracy worker {name} failed: {result['error']}", ""]
    lines += ["## Targets", ""] + targets_table(accuracy, raw["speed"], args)
    if accuracy:
        lines += ["## Accuracy", ""]
        for name, result in accuracy.items():
            lines += accuracy_tables(name, result, args)
        lines += ["## Convergence", ""]
        for name, result in accuracy.items():
            lines += convergence_table(name, result, args)
    if raw["speed"]:
        lines += [
            "## Speed and memory",
            "",
            "Seconds: every tool round-robin in one process; each round computes a gradient, then "
            f"builds each tool and makes {args.hvps_per_round} HVPs with it; medians over "
            f"{args.repeats} rounds ({args.repeats_10m} on the 10M GPT-2) after a warm-up round; "
            "s / HVP leaves out the first HVP after each build, shown apart (it also pays for "
            "first-touch memory). "
            "curvlinops' construction includes its default determinism check (2 gradients + 2 "
            "HVPs). Peak RSS: a fresh process per row that builds the tool and makes 2 HVPs.",
            "",
        ]
        lines += speed_tables(raw["speed"], raw["memory"])
    if raw["critical"]:
        lines += [
            "## Critical sharpness (sharpmeter; no peer measures it)",
            "",
            "Along AdamW's next update direction after 2 steps, with the step's gradient given "
            "(no extra backward); warm: eta0 = the cold run's eta_c. directional_sharpness is "
            "the quadratic model's prediction d'Hd / d'g of the same quantity (one HVP); the "
            "two differ where the loss along d is far from quadratic.",
            "",
        ]
        lines += critical_table(raw["critical"])
    if accuracy:
        lines += [
            "## State side effects",
            "",
            "Model in train mode with `.grad` set, then each tool's eigenvalue and trace "
            "(sharpmeter inside `sm.measurement(model)`, as documented).",
            "",
        ]
        lines += side_effect_table(accuracy)
    print("\n".join(lines))
    save_markdown(args.out, lines)


if __name__ == "__main__":
    main()
