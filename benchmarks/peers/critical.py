"""Critical sharpness along AdamW's update direction (sharpmeter only: no peer measures it)."""

from __future__ import annotations

import time

import torch

import sharpmeter as sm
from benchmarks._common import peak_rss_mib
from benchmarks.peers.problems import make_problem


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
