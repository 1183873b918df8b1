"""What each tool leaves changed on the model and the process, and whether it runs with the
default (fused) attention kernel."""

from __future__ import annotations

import torch

import sharpmeter as sm
from benchmarks.peers.problems import make_problem
from benchmarks.peers.tools import TOOLS


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
