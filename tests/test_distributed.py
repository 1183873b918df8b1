"""Two gloo ranks, each with half of the probe, give the numbers of one process on all of it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import causal_lm_loss, float64_gpt2, token_batch
from ranks import run_on_ranks
from torch import nn

import sharpmeter as sm
from sharpmeter.measure.distributed import local_shard
from sharpmeter.measure.loss import ProbeLoss


def measure(batch) -> dict[str, float]:
    model = float64_gpt2(n_layer=2).eval()
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    top = sm.lanczos(op, k=1, max_iter=60, tol=1e-10)
    trace = sm.hutchinson(op, num_matvecs=8, seed=3)
    # The same probes in blocks of 3, each block one batched backward and one all-reduce.
    batched = sm.HessianOperator(model, causal_lm_loss, batch, products_per_call=3)
    batched_trace = sm.hutchinson(batched, num_matvecs=8, seed=3)
    critical = sm.critical_sharpness(
        model, causal_lm_loss, batch, op.gradient, eta0=0.3, precision_bits=12
    )
    return {
        "loss": float(op.loss),
        "lambda_max": top.value,
        "trace": trace.value,
        "batched_trace": batched_trace.value,
        "critical": critical.value,
        "forwards": critical.num_forward,
    }


def measure_shard(batch) -> dict[str, float]:
    return measure(local_shard(batch))


def test_two_ranks_match_one_process():
    batch = token_batch(batch_size=6, seed=4)
    batch["labels"] = batch["labels"].clone()
    batch["labels"][0, 5:] = -100  # unequal loss tokens per shard: weights must be global
    single = measure(batch)
    assert single["batched_trace"] == pytest.approx(single["trace"], rel=1e-12)
    results = run_on_ranks(measure_shard, batch)
    for ranked in results:
        assert ranked["forwards"] == single["forwards"]
        for key in ("loss", "lambda_max", "trace", "batched_trace", "critical"):
            assert ranked[key] == pytest.approx(single[key], rel=1e-5), key
    assert results[0] == results[1]


class ShardSGD(torch.optim.Optimizer):
    """Plain SGD that fails to step on the ranks in ``failing_ranks``: no analytic rule, so
    update_direction steps a copy of it."""

    def __init__(self, params, lr: float, failing_ranks: tuple[int, ...]) -> None:
        super().__init__(params, {"lr": lr})
        self.failing_ranks = failing_ranks

    @torch.no_grad()
    def step(self, closure=None):
        if dist.get_rank() in self.failing_ranks:
            raise ValueError(f"rank {dist.get_rank()} cannot step")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def shadow_step_outcome(failing_ranks: tuple[int, ...], zero_gradient_rank: int | None) -> str:
    """update_direction on FSDP2-style sharded (DTensor) parameters: ``'ok'`` or the error."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    rank, ranks = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (ranks,))
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in [(4, 3), (6,)]:
        full = torch.randn(shape, generator=generator, dtype=torch.float64)
        param = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        grad = torch.randn(shape, generator=generator, dtype=torch.float64).chunk(ranks)[rank]
        if rank == zero_gradient_rank:
            grad = torch.zeros_like(grad)
        param.grad = DTensor.from_local(
            grad, mesh, [Shard(0)], shape=param.shape, stride=param.stride()
        )
        params.append(param)
    optimizer = ShardSGD(params, lr=0.1, failing_ranks=failing_ranks)
    try:
        sm.update_direction(optimizer)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "ok"


def shadow_step_outcomes() -> list[str]:
    """Rank 0's copy fails; then no copy fails but rank 1 has only zero gradients."""
    return [shadow_step_outcome((0,), None), shadow_step_outcome((), 1)]


def test_sharded_shadow_step_failures_reach_every_rank():
    """A rank whose copy fails, or that has no gradient, still makes the collectives the
    others make: every rank raises (or returns) instead of waiting in a collective."""
    (failed_0, ok_0), (failed_1, ok_1) = run_on_ranks(shadow_step_outcomes)
    assert failed_0.startswith("DirectionUnavailable: ShardSGD.step() failed on a copy")
    assert "rank 0 cannot step" in failed_0
    assert failed_1.startswith("DirectionUnavailable: another rank failed")
    assert ok_0 == ok_1 == "ok"


def budget_decisions() -> list[tuple[bool, str, str]]:
    """Two schedules with budgets, each over budget on one rank only (wall clocks differ
    between ranks): every rank must take what rank 0 decides, or the ranks' HVP collectives
    would fall out of step."""
    rank = dist.get_rank()
    meter = sm.SharpnessMeter(
        float64_gpt2().eval(),
        local_shard(token_batch(batch_size=4)),
        causal_lm_loss,
        measures=("critical", "trace"),
        schedule=sm.Schedule(every=1, max_fraction=0.05),
        schedules={"trace": sm.Schedule(every=1, max_fraction=0.04)},
    )
    critical, trace = meter.ledgers
    (trace if rank == 0 else critical).measuring_seconds = 10.0  # 10% of training time
    meter._started -= 110.0  # 100 s of training and those 10 s of measuring
    decisions = []
    for step in (1, 2):
        due = meter.is_due(step)
        row = meter.measure(step) if due else {}
        decisions.append((due, row.get("critical_status"), row.get("trace_status")))
    return decisions


def test_rank_0_decides_which_schedules_are_within_budget():
    first, second = run_on_ranks(budget_decisions)
    assert first == second == [(True, "ok", "not_due")] * 2


def train_probe_row(batches: list[dict], rank_batch: bool) -> dict:
    """A probe="train" row after a step over ``batches``: one process holds them all, or each
    rank holds its own, with the gradient averaged over ranks as DDP leaves it."""
    model = float64_gpt2().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mine = [batches[dist.get_rank()]] if rank_batch else batches
    ProbeLoss(model, causal_lm_loss, mine, seed=None, distributed=False)().backward()
    if rank_batch:
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    meter = sm.SharpnessMeter(
        model,
        None,
        causal_lm_loss,
        probe="train",
        measures=("critical",),
        critical_precision_bits=8,
    )
    row = meter.measure(0, optimizer, batch=mine)
    return {key: row[key] for key in ("loss", "grad_norm", "critical_eta_lo", "critical_eta_hi")}


def prompt_only(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "labels": torch.full_like(batch["labels"], -100)}


def token_weighted_row(held: list[list[dict]]) -> dict:
    """A probe="train" row after a step whose micro-batches each rank holds (``held[rank]``;
    one process: all of them), the gradient the token-weighted loss of all of them."""
    model = float64_gpt2().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    distributed = dist.is_initialized()
    mine = held[dist.get_rank()] if distributed else [b for batches in held for b in batches]
    ProbeLoss(model, causal_lm_loss, mine, seed=None)().backward()
    if distributed:
        for p in model.parameters():
            dist.all_reduce(p.grad)
    meter = sm.SharpnessMeter(
        model, None, causal_lm_loss, probe="train", measures=("critical", "spectral")
    )
    row = meter.measure(0, optimizer, batch=mine)
    columns = ("status", "loss", "grad_norm", "critical_eta_lo", "critical_eta_hi", "lambda_max")
    return {key: row[key] for key in columns}


def test_a_rank_with_only_prompt_only_micro_batches_adds_nothing():
    """Completion-only training can leave a rank a step of prompts alone: its share of the loss,
    gradient and HVPs is 0, and both ranks' rows are the one process's on all the batches.
    Before, its share was 0/0 = NaN and every rank's row nonfinite."""
    scored = token_batch(batch_size=3, seed=21)
    empty = [prompt_only(token_batch(batch_size=2, seed=s)) for s in (22, 23)]
    held = [[scored], empty]
    single = token_weighted_row(held)
    first, second = run_on_ranks(token_weighted_row, held)
    assert first == second and first["status"] == "ok", first
    for key, value in single.items():
        assert first[key] == (value if key == "status" else pytest.approx(value, rel=1e-9)), key


def test_on_training_batches_each_rank_measures_its_own_and_they_add_up():
    batches = [token_batch(batch_size=2, seed=21), token_batch(batch_size=2, seed=22)]
    single = train_probe_row(batches, rank_batch=False)
    first, second = run_on_ranks(train_probe_row, batches, True)
    assert first == second
    for key, value in single.items():
        assert first[key] == pytest.approx(value, rel=1e-9), key
