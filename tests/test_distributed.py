"""Two gloo ranks, each with half of the probe, give the numbers of one process on all of it."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sharpmeter as sm
from sharpmeter.distributed import local_shard

TESTS = os.path.dirname(__file__)


def measure(batch) -> dict[str, float]:
    sys.path.insert(0, TESTS)
    from conftest import causal_lm_loss, tiny_gpt2

    model = tiny_gpt2(n_layer=2).eval()
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    top = sm.lanczos(op, k=1, max_iter=60, tol=1e-10)
    trace = sm.hutchinson(op, num_probes=8, seed=3)
    critical = sm.critical_sharpness(model, causal_lm_loss, batch, op.gradient, eta0=0.3, k=12)
    return {
        "loss": float(op.loss),
        "lambda_max": top.value,
        "trace": trace.value,
        "critical": critical.value,
        "forwards": critical.num_forward,
    }


def rank_main(rank: int, world_size: int, port: int, batch, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = measure(local_shard(batch))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process():
    sys.path.insert(0, TESTS)
    from conftest import token_batch

    batch = token_batch(batch_size=6, seed=4)
    batch["labels"] = batch["labels"].clone()
    batch["labels"][0, 5:] = -100  # unequal loss tokens per shard: weights must be global
    single = measure(batch)
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(
        rank_main, args=(2, free_port(), batch, results), nprocs=2, start_method="spawn"
    )
    for rank in (0, 1):
        ranked = results[rank]
        assert ranked["forwards"] == single["forwards"]
        for key in ("loss", "lambda_max", "trace", "critical"):
            assert ranked[key] == pytest.approx(single[key], rel=1e-5), key
    assert results[0] == results[1]
