"""Critical sharpness on a fully sharded (FSDP2) model: two gloo ranks give one process's numbers.

The model has parameters whose rows do not split evenly over two ranks (17-token vocabulary,
9 positions), it is trained with clipped AdamW for a few steps (so the update direction reads
sharded optimizer state), and the measurement must leave parameters, gradients and optimizer
state exactly as it found them.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import SEQ, VOCAB, causal_lm_loss, token_batch
from ranks import run_on_ranks
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import sharpmeter as sm
from sharpmeter.distributed import local, local_shard

STEPS = 3
COLUMNS = ("loss", "grad_norm", "lr", "critical_sharpness", "critical_eta", "stability_ratio")


def uneven_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB + 1,
        n_positions=SEQ + 1,
        n_embd=8,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).double()


def batches() -> tuple[dict, dict]:
    probe = token_batch(batch_size=6, seed=4)
    probe["labels"] = probe["labels"].clone()
    probe["labels"][0, 5:] = -100  # unequal loss tokens per shard: weights must be global
    return token_batch(batch_size=4, seed=7), probe


def train_and_measure(sharded: bool, bf16: bool = False) -> dict:
    """Train ``STEPS`` AdamW steps, then measure; returns the row and what changed.

    ``bf16``: float32 shards gathered as bfloat16 for compute, as accelerate's FSDP config with
    ``mixed_precision: bf16`` sets up."""
    model = uneven_gpt2().float() if bf16 else uneven_gpt2()
    if sharded:
        policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else None
        options = {"mp_policy": policy} if policy else {}
        for block in model.transformer.h:
            fully_shard(block, **options)
        fully_shard(model, **options)
    train, probe = batches()
    if sharded:
        train = local_shard(train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(STEPS):
        optimizer.zero_grad()
        causal_lm_loss(model, train).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
    meter = sm.SharpnessMeter(
        model,
        local_shard(probe) if sharded else probe,
        causal_lm_loss,
        measures=("critical",),
        schedule=sm.Schedule(every=1),
        max_grad_norm=0.5,
        critical_k=10,
    )
    before = snapshot(model, optimizer)
    row = meter.measure(STEPS, optimizer=optimizer)
    after = snapshot(model, optimizer)
    return {
        **{key: row[key] for key in (*COLUMNS, "critical_num_forward", "status")},
        "unchanged": before == after,
        "grads_kept": all(p.grad is g for p, g in zip(model.parameters(), before[1], strict=True)),
        "refusals": refusals(model, probe) if sharded else [],
    }


def refusals(model: torch.nn.Module, probe: dict) -> list[str]:
    """What the HVP entry points say on a sharded model."""
    messages = []
    for build in (
        lambda: sm.SharpnessMeter(model, probe, causal_lm_loss, measures=("critical", "trace")),
        lambda: sm.HessianOperator(model, causal_lm_loss, probe),
    ):
        try:
            build()
        except ValueError as error:
            messages.append(str(error))
    return messages


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    params = [local(p).clone() for p in model.parameters()]
    state = [
        local(value).clone() if isinstance(value, torch.Tensor) else value
        for per_param in optimizer.state.values()
        for value in per_param.values()
    ]
    return _Exact(params), [p.grad for p in model.parameters()], _Exact(state)


class _Exact:
    """Tensors compared bit for bit."""

    def __init__(self, values: list) -> None:
        self.values = values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Exact) and all(
            torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            for a, b in zip(self.values, other.values, strict=True)
        )


def two_ranks(bf16: bool = False) -> dict:
    results = run_on_ranks(train_and_measure, True, bf16)
    for ranked in results:
        assert ranked["status"] == "ok", ranked
        assert ranked["unchanged"] and ranked["grads_kept"]
        assert len(ranked["refusals"]) == 2
        assert all("FSDP" in message for message in ranked["refusals"])
    assert results[0] == results[1]
    return results[0]


def test_fsdp_critical_sharpness_matches_one_process():
    single = train_and_measure(sharded=False)
    assert single["status"] == "ok"
    sharded = two_ranks()
    assert sharded["critical_num_forward"] == single["critical_num_forward"]
    for key in COLUMNS:
        assert sharded[key] == pytest.approx(single[key], rel=1e-9), key


def test_fsdp_bf16_compute_measures_and_leaves_training_alone():
    assert two_ranks(bf16=True)["critical_sharpness"] > 0


def callback_rows(output_dir: str) -> list[dict]:
    """The Trainer's hooks, called as its loop calls them, on a sharded model trained by hand
    (accelerate shards only on GPUs): the callback's own rows."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from sharpmeter.integrations.hf import SharpnessCallback

    model = uneven_gpt2()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    train, probe = batches()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    args = TrainingArguments(output_dir=output_dir, use_cpu=True, max_grad_norm=0.5)
    state = TrainerState(is_world_process_zero=torch.distributed.get_rank() == 0)
    control = TrainerControl()
    callback = SharpnessCallback(
        probe, loss_fn=causal_lm_loss, measures=("critical",), schedule=sm.Schedule(every=2)
    )
    callback.on_train_begin(args, state, control, model=model)
    for step in range(1, 5):
        causal_lm_loss(model, local_shard(train)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        state.global_step = step
        callback.on_step_end(args, state, control, optimizer=optimizer)
    # wall clocks differ between ranks; every number measured must not
    return [
        {k: v for k, v in row.items() if k != "sharpness/wall_seconds"} for row in state.log_history
    ]


def test_callback_hooks_on_a_sharded_model(tmp_path):
    results = run_on_ranks(callback_rows, str(tmp_path))
    assert results[0] == results[1]
    assert [row["step"] for row in results[0]] == [2, 4]
    assert all(row["sharpness/critical_sharpness"] > 0 for row in results[0])
    rows = [json.loads(line) for line in (tmp_path / "sharpness.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4] and all(r["status"] == "ok" for r in rows)
