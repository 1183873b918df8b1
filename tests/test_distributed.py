"""Two gloo ranks, each with half of the probe, give the numbers of one process on all of it."""

from __future__ import annotations

import pytest
from conftest import causal_lm_loss, tiny_gpt2, token_batch
from ranks import run_on_ranks

import sharpmeter as sm
from sharpmeter.distributed import local_shard


def measure(batch) -> dict[str, float]:
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


def measure_shard(batch) -> dict[str, float]:
    return measure(local_shard(batch))


def test_two_ranks_match_one_process():
    batch = token_batch(batch_size=6, seed=4)
    batch["labels"] = batch["labels"].clone()
    batch["labels"][0, 5:] = -100  # unequal loss tokens per shard: weights must be global
    single = measure(batch)
    results = run_on_ranks(measure_shard, batch)
    for ranked in results:
        assert ranked["forwards"] == single["forwards"]
        for key in ("loss", "lambda_max", "trace", "critical"):
            assert ranked[key] == pytest.approx(single[key], rel=1e-5), key
    assert results[0] == results[1]
