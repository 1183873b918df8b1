"""Critical sharpness on a fully sharded (FSDP2) model: two gloo ranks give one process's numbers.

The model has parameters whose rows do not split evenly over two ranks (17-token vocabulary,
9 positions) and is trained for a few clipped steps, so the update direction reads sharded
optimizer state; the last step's gradients stay in ``.grad``. Measuring must leave parameters,
gradients and optimizer state exactly as it found them, and a failure on one rank must not
leave the others waiting in a collective.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import SEQ, VOCAB, assert_same, causal_lm_loss, float64_gpt2, snapshot, token_batch
from ranks import run_on_ranks
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import sharpmeter as sm
from sharpmeter.measure.distributed import FSDP1_FLATTENED, is_sharded, local, local_shard

STEPS = 3
COLUMNS = ("loss", "grad_norm", "lr", "critical_sharpness", "critical_eta", "stability_ratio")
OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1),
    # no analytic rule: its direction comes from a shadow step on DTensor copies
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=0.01, momentum=0.5),
}


def uneven_gpt2(sharded: bool, bf16: bool = False) -> torch.nn.Module:
    """``bf16``: float32 shards gathered as bfloat16 for compute, as accelerate's FSDP config
    with ``mixed_precision: bf16`` sets up."""
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
    model = transformers.GPT2LMHeadModel(config)
    model = model.float() if bf16 else model.double()
    if sharded:
        policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else None
        options = {"mp_policy": policy} if policy else {}
        for block in model.transformer.h:
            fully_shard(block, **options)
        fully_shard(model, **options)
    return model


def probe_batch(sharded: bool) -> dict:
    probe = token_batch(batch_size=6, seed=4)
    probe["labels"] = probe["labels"].clone()
    probe["labels"][0, 5:] = -100  # unequal loss tokens per shard: weights must be global
    return local_shard(probe) if sharded else probe


def train_batch(sharded: bool) -> dict:
    train = token_batch(batch_size=4, seed=7)
    return local_shard(train) if sharded else train


def trained(sharded: bool, bf16: bool = False, optimizer: str = "adamw"):
    """A model after ``STEPS`` clipped steps, its optimizer, and the last step's ``.grad``."""
    model = uneven_gpt2(sharded, bf16)
    train = train_batch(sharded)
    stepper = OPTIMIZERS[optimizer](model.parameters())
    for _ in range(STEPS):
        stepper.zero_grad()
        causal_lm_loss(model, train).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        stepper.step()
    return model, stepper


def measure(sharded: bool, bf16: bool = False, optimizer: str = "adamw") -> dict:
    """The meter's row after training; training state must come through bit for bit."""
    model, stepper = trained(sharded, bf16, optimizer)
    meter = sm.SharpnessMeter(
        model,
        probe_batch(sharded),
        causal_lm_loss,
        measures=("critical",),
        schedule=sm.Schedule(every=1),
        max_grad_norm=0.5,
        critical_precision_bits=10,
    )
    before = snapshot(model, stepper)
    row = meter.measure(STEPS, optimizer=stepper)
    assert_same(before, snapshot(model, stepper))
    return {key: row[key] for key in (*COLUMNS, "critical_num_forward", "status")}


def critical_directly(sharded: bool) -> dict:
    """``critical_sharpness`` outside the meter (no measurement context puts ``.grad`` back)
    on the training batch, along its gradient given as one tensor per parameter."""
    model, stepper = trained(sharded)
    train = train_batch(sharded)
    stepper.zero_grad()
    causal_lm_loss(model, train).backward()
    direction = [p.grad.clone() for p in model.parameters()]
    before = snapshot(model, stepper)
    result = sm.critical_sharpness(
        model, causal_lm_loss, train, direction, eta0=0.1, precision_bits=10
    )
    assert_same(before, snapshot(model, stepper))
    return {
        "status": result.status,
        "value": result.value,
        "slope": result.slope,
        "num_forward": result.num_forward,
    }


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_meter_on_two_sharded_ranks_matches_one_process(optimizer):
    single = measure(sharded=False, optimizer=optimizer)
    assert single["status"] == "ok"
    results = run_on_ranks(measure, True, False, optimizer)
    assert results[0] == results[1]
    sharded = results[0]
    assert sharded["status"] == "ok"
    assert sharded["critical_num_forward"] == single["critical_num_forward"]
    for key in COLUMNS:
        assert sharded[key] == pytest.approx(single[key], rel=1e-9), key


def test_critical_sharpness_on_sharded_ranks_keeps_grads():
    single = critical_directly(sharded=False)
    results = run_on_ranks(critical_directly, True)
    assert results[0] == results[1]
    assert single["status"] == results[0]["status"] == "ok"
    assert results[0]["num_forward"] == single["num_forward"]
    for key in ("value", "slope"):
        assert results[0][key] == pytest.approx(single[key], rel=1e-9), key


def test_bf16_compute_measures_and_leaves_training_alone():
    """bf16 compute of float32 shards (training and measuring) gives the float64 one-process
    numbers to bf16's precision: 1% on the loss, and on critical sharpness the bracket's
    precision (2^-4) and 1%: bf16's coarser rounding moves the first step its search may take
    (measured 3.7%; 0.07% when both searches took the same steps)."""
    reference = measure(sharded=False)
    results = run_on_ranks(measure, True, True)
    assert results[0] == results[1]
    bf16 = results[0]
    assert bf16["status"] == reference["status"] == "ok"
    assert bf16["lr"] == reference["lr"]
    assert bf16["loss"] == pytest.approx(reference["loss"], rel=1e-2)
    assert bf16["critical_sharpness"] == pytest.approx(
        reference["critical_sharpness"], rel=2**-4 + 1e-2
    )
    assert bf16["critical_sharpness"] == pytest.approx(2 / bf16["critical_eta"], rel=1e-12)
    ratio = bf16["lr"] * bf16["critical_sharpness"] / 2
    assert bf16["stability_ratio"] == pytest.approx(ratio, rel=1e-12)


def failures() -> dict:
    """What each rank records when something goes wrong on one rank or on all of them."""
    model, stepper = trained(sharded=True)
    probe = probe_batch(sharded=True)
    outcome = {"refusals": []}
    for build in (
        lambda: sm.SharpnessMeter(model, probe, causal_lm_loss, measures=("critical", "trace")),
        lambda: sm.HessianOperator(model, causal_lm_loss, probe),
        lambda: is_sharded([replicated_copy(next(model.parameters()))]),
    ):
        try:
            build()
        except ValueError as error:
            outcome["refusals"].append(str(error))

    # A non-finite update on rank 0's shard only (a corrupted second moment): every rank must
    # see it, or rank 1 would wait in the line search's collectives for ever.
    meter = sm.SharpnessMeter(model, probe, causal_lm_loss, measures=("critical",))
    moment = local(stepper.state[next(model.parameters())]["exp_avg_sq"])
    saved = moment.clone()
    if torch.distributed.get_rank() == 0:
        moment.view(-1)[0] = -1.0
    outcome["nan_shard"] = meter.measure(1, optimizer=stepper)["critical_status"]
    moment.copy_(saved)

    # A loss that raises in the middle of the line search: the model must not keep the
    # perturbed parameters gathered for the next training forward.
    calls = []

    def failing_loss(model, batch):
        loss = causal_lm_loss(model, batch)  # the forward has gathered the parameters
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("out of memory")
        return loss

    meter = sm.SharpnessMeter(model, probe, failing_loss, measures=("critical",))
    outcome["raised"] = meter.measure(2, optimizer=stepper)["critical_status"]
    with torch.no_grad():
        next_forward = float(causal_lm_loss(model, probe))
        for module in model.modules():
            if isinstance(module, torch.distributed.fsdp.FSDPModule):
                module.reshard()
        outcome["stale"] = next_forward != float(causal_lm_loss(model, probe))
    return outcome


def replicated_copy(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import Replicate

    return param.redistribute(placements=[Replicate()])


def test_failures_keep_ranks_in_step():
    results = run_on_ranks(failures)
    assert results[0] == results[1]
    outcome = results[0]
    assert ["FSDP" in m for m in outcome["refusals"][:2]] == [True, True]
    assert "Replicate" in outcome["refusals"][2]
    assert "non-finite" in outcome["nan_shard"]
    assert "out of memory" in outcome["raised"]
    assert not outcome["stale"]


def callback_rows(output_dir: str, sharded: bool = True) -> list[dict]:
    """The Trainer's hooks, called as its loop calls them, on a sharded model trained by hand
    (accelerate shards only on GPUs), or on the same model unsharded in one process: the
    callback's own rows."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from sharpmeter.integrations.hf import SharpnessCallback

    model = uneven_gpt2(sharded=sharded)
    train = local_shard(token_batch(batch_size=4, seed=7))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    args = TrainingArguments(output_dir=output_dir, use_cpu=True, max_grad_norm=0.5)
    main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    state = TrainerState(is_world_process_zero=main)
    control = TrainerControl()
    callback = SharpnessCallback(
        probe_batch(sharded=False),
        loss_fn=causal_lm_loss,
        measures=("critical",),
        schedule=sm.Schedule(every=2),
    )
    callback.on_train_begin(args, state, control, model=model)
    for step in range(1, 5):
        causal_lm_loss(model, train).backward()
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
    """Two sharded ranks log the rows one process logs for the unsharded model (float64)."""
    single = callback_rows(str(tmp_path / "single"), sharded=False)
    results = run_on_ranks(callback_rows, str(tmp_path))
    assert results[0] == results[1]
    assert [row["step"] for row in results[0]] == [row["step"] for row in single] == [2, 4]
    for sharded_row, single_row in zip(results[0], single, strict=True):
        assert sharded_row.keys() == single_row.keys()
        assert (
            sharded_row["sharpness/critical_num_forward"]
            == single_row["sharpness/critical_num_forward"]
        )
        for key, value in single_row.items():
            assert sharded_row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    rows = [json.loads(line) for line in (tmp_path / "sharpness.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4] and all(r["status"] == "ok" for r in rows)


def test_a_model_inside_fsdp1_is_refused():
    # FSDP1 needs a GPU; the Trainer would hand the callback the module it wrapped, whose
    # parameters FSDP1 marks as flattened.
    model = float64_gpt2()
    setattr(next(model.parameters()), FSDP1_FLATTENED, True)
    with pytest.raises(ValueError, match="FSDP1"):
        sm.SharpnessMeter(model, token_batch(), causal_lm_loss, measures=("critical",))


def meter_error_beside_a_plain_parameter() -> str:
    """The error a meter gives for a sharded model with a plain parameter beside its shards (an
    adapter attached after ``fully_shard``), which every rank holds whole."""
    model = uneven_gpt2(sharded=True)
    model.register_parameter("adapter", torch.nn.Parameter(torch.ones((), dtype=torch.float64)))
    try:
        sm.SharpnessMeter(model, probe_batch(sharded=True), causal_lm_loss, measures=("critical",))
    except ValueError as error:
        return str(error)
    return "no error"


def test_a_plain_parameter_beside_sharded_ones_is_refused():
    """Sums over ranks would count it once per rank (its gradient and its share of the update's
    norm twice on two ranks)."""
    for message in run_on_ranks(meter_error_beside_a_plain_parameter):
        assert "plain tensors beside FSDP2's sharded ones" in message
