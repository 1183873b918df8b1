"""What the small problems are measured against: their dense Hessian, after a few training steps."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import sharpmeter as sm
from benchmarks.peers.problems import Problem
from benchmarks.peers.tools import flat


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


def dense_hessian(problem: Problem) -> torch.Tensor:
    """The exact Hessian, row by row: a double backward of each gradient entry.

    Not ``torch.func.hessian``: its forward-over-reverse is wrong on LayerNorm with affine
    parameters (pytorch issue 196700).
    """
    params = problem.params
    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        loss = problem.loss_fn(problem.model, problem.batch)
        gradient = flat(torch.autograd.grad(loss, params, create_graph=True))
        rows = []
        for i in range(gradient.numel()):
            row = torch.autograd.grad(gradient[i], params, retain_graph=True, allow_unused=True)
            rows.append(
                flat(
                    [
                        torch.zeros_like(p) if r is None else r
                        for r, p in zip(row, params, strict=True)
                    ]
                )
            )
    hessian = torch.stack(rows).detach()
    return (hessian + hessian.T) / 2


def relative(estimate: float, exact: float) -> float:
    """The relative error of a scalar estimate."""
    return abs(estimate - exact) / abs(exact)
