"""AcceleratedMeter's metadata, its W&B logging into a user's runs, and the loop examples on
one process and on two gloo ranks: accelerate's (`accelerate launch`) and FSDP2's
(`torchrun`)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import wandb
import wandb_records
from conftest import SEQ, VOCAB, causal_lm_loss, float64_gpt2, token_batch
from google.protobuf.message import DecodeError

import sharpmeter as sm
from sharpmeter.integrations.accelerate import AcceleratedMeter, AccumulationWarning
from sharpmeter.measure.sinks import JsonlLockedError, SinkWarning, WandbSink

EXAMPLES = Path(__file__).parent.parent / "examples"
KEYS = ("loss", "critical_sharpness", "lambda_max", "hessian_trace")


def run(command: list[str], output: Path, example: str = "accelerate_loop.py") -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [*command, str(EXAMPLES / example), "--steps", "10", "--output", str(output)],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    metadata = json.loads((output / "sharpness.meta.json").read_text())
    assert metadata["max_steps"] == 10 and metadata["finished"] is True
    return [json.loads(line) for line in (output / "sharpness.jsonl").read_text().splitlines()]


class OneProcess:
    """What AcceleratedMeter asks of an ``Accelerator`` in one CPU process, without the global
    state a real one sets up for the rest of the test session."""

    device = torch.device("cpu")
    is_main_process = True
    num_processes = 1

    def unwrap_model(self, model):
        return model


def test_the_metadata_holds_the_planned_steps_and_whether_the_loop_ended(tmp_path):
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    probe = {"input_ids": ids, "labels": ids}
    path = tmp_path / "run" / "sharpness.jsonl"
    meter = AcceleratedMeter(
        OneProcess(), float64_gpt2(), probe, jsonl_path=path, max_steps=40, measures=("critical",)
    )
    meta_path = tmp_path / "run" / "sharpness.meta.json"
    started = json.loads(meta_path.read_text())
    assert started["max_steps"] == 40 and started["finished"] is False and started["run"] == "run"
    meter.close()
    assert json.loads(meta_path.read_text())["finished"] is True


@pytest.mark.parametrize("max_steps", [0, -5, 2.5, True])
def test_a_planned_length_that_is_no_positive_integer_is_refused(tmp_path, max_steps):
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        AcceleratedMeter(OneProcess(), float64_gpt2(), {}, max_steps=max_steps)


def linear_loop(path: Path, steps: range, resume_step: int | None = None) -> AcceleratedMeter:
    """A least-squares loop measured every 5 steps into ``path``; the meter, left open."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss_fn(model, batch):
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    meter = AcceleratedMeter(
        OneProcess(),
        model,
        (x, y),
        jsonl_path=path,
        loss_fn=loss_fn,
        measures=("critical",),
        schedule=sm.Schedule(every=5),
        resume_step=resume_step,
    )
    for step in steps:
        loss_fn(model, (x, y)).backward()
        optimizer.step()
        optimizer.zero_grad()
        meter.step(step, optimizer)
    return meter


def test_a_loop_resumed_with_resume_step_keeps_the_rows_before_it(tmp_path):
    path = tmp_path / "run" / "sharpness.jsonl"
    killed = linear_loop(path, range(1, 23))  # checkpoint after step 20, killed at 22
    del killed  # the process is gone: its lock with it
    resumed = linear_loop(path, range(21, 31), resume_step=20)
    resumed.close()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30]
    assert json.loads((tmp_path / "run" / "sharpness.meta.json").read_text())["finished"]


def test_a_second_meter_on_a_live_meters_file_is_refused(tmp_path):
    path = tmp_path / "run" / "sharpness.jsonl"
    first = linear_loop(path, range(1, 11))
    with pytest.raises(JsonlLockedError, match="different output_dir"):
        linear_loop(path, range(1, 3))
    first.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [5, 10]


@pytest.mark.parametrize("resume_step", [-1, 2.0, True])
def test_a_resume_step_that_is_no_step_is_refused(tmp_path, resume_step):
    with pytest.raises(ValueError, match="resume_step must be a step"):
        AcceleratedMeter(OneProcess(), float64_gpt2(), {}, resume_step=resume_step)


@pytest.mark.slow
def test_two_ranks_measure_what_one_process_measures(tmp_path):
    single = run([sys.executable], tmp_path / "one")
    launcher = Path(sys.executable).parent / "accelerate"
    double = run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2"], tmp_path / "two")
    assert [r["step"] for r in single] == [r["step"] for r in double] == [0, 5, 10]
    assert set(single[0]) == set(double[0])
    assert all(r["status"] == "ok" for r in single + double), [r["status"] for r in single + double]
    # At initialisation the parameters are identical, so the numbers must be too; later the
    # trajectories part (each rank draws its own dropout masks).
    for key in KEYS:
        assert double[0][key] == pytest.approx(single[0][key], rel=1e-5), key


@pytest.mark.slow
def test_fsdp_loop_on_two_ranks_measures_what_one_rank_measures(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    runs = {
        ranks: run([torchrun, f"--nproc_per_node={ranks}"], tmp_path / str(ranks), "fsdp_loop.py")
        for ranks in (1, 2)
    }
    assert [r["step"] for r in runs[1]] == [r["step"] for r in runs[2]] == [10]
    assert all(r["status"] == "ok" for r in runs[1] + runs[2])
    # no dropout and one global batch per step: the two trajectories differ by rounding only
    for key in ("loss", "grad_norm", "critical_sharpness"):
        assert runs[2][0][key] == pytest.approx(runs[1][0][key], rel=1e-4), key


def test_a_hand_loop_measures_each_step_on_its_own_batch_before_the_update(tmp_path):
    model = float64_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    meter = AcceleratedMeter(
        OneProcess(),
        model,
        jsonl_path=tmp_path / "run" / "sharpness.jsonl",
        probe="train",
        loss_fn=causal_lm_loss,
        measures=("critical",),
        schedule=sm.Schedule(every=2),
    )
    for step in range(4):
        batch = token_batch(batch_size=4, seed=step)
        optimizer.zero_grad()
        causal_lm_loss(model, batch).backward()
        with torch.no_grad():
            loss = float(causal_lm_loss(model, batch))
        row = meter.step(step, optimizer, batch=batch)
        assert (row is None) == (step % 2 == 1)
        if row is not None:
            assert row["probe"] == "train" and row["critical_status"] == "ok"
            assert row["loss"] == pytest.approx(loss, rel=1e-12)
        optimizer.step()
    meter.close()
    with pytest.raises(ValueError, match="give no probe_batch"):
        AcceleratedMeter(OneProcess(), model, token_batch(), probe="train")


def test_a_hand_loop_whose_batches_are_bare_tensors_is_measured(tmp_path):
    """A DataLoader of token ids gives each batch as one tensor: the step's micro-batches are
    then a list of tensors, which the meter must not refuse as an ambiguous probe."""
    model = float64_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss_fn(m, ids):
        return causal_lm_loss(m, {"input_ids": ids, "labels": ids})

    meter = AcceleratedMeter(
        OneProcess(),
        model,
        probe="train",
        loss_fn=loss_fn,
        measures=("critical",),
        jsonl_path=tmp_path / "sharpness.jsonl",
    )
    ids = token_batch(batch_size=4)["input_ids"]
    loss_fn(model, ids).backward()
    row = meter.step(0, optimizer, batch=ids)
    assert row["status"] == "ok", row["error"]
    assert row["loss"] == pytest.approx(float(loss_fn(model, ids)), rel=1e-12)


class Accumulating(OneProcess):
    """``accelerator.accumulate`` over ``steps`` micro-batches: the gradients are complete (and
    the optimizer steps) at the last one of each step only."""

    def __init__(self, steps: int) -> None:
        self.gradient_accumulation_steps, self.micro_batches = steps, 0

    def accumulate(self) -> None:
        self.micro_batches += 1
        self.sync_gradients = self.micro_batches % self.gradient_accumulation_steps == 0


@pytest.mark.filterwarnings("error::sharpmeter.integrations.accelerate.AccumulationWarning")
def test_under_gradient_accumulation_each_step_is_measured_on_all_its_micro_batches(tmp_path):
    """A loop under ``accelerator.accumulate(model)`` calls step() at every micro-batch. The
    row of an optimizer step is the one of its micro-batches together, with the gradient they
    accumulated; the other micro-batches are not measured. Before, every micro-batch was
    measured on its own, with the partial gradient of an update that never happens (under DDP,
    each rank's own)."""
    model = float64_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accelerator = Accumulating(steps=3)
    options = {"probe": "train", "loss_fn": causal_lm_loss, "measures": ("critical",)}
    options["schedule"] = sm.Schedule(every=1)
    meter = AcceleratedMeter(accelerator, model, jsonl_path=tmp_path / "a.jsonl", **options)
    reference = sm.SharpnessMeter(model, **options)
    step, rows = 0, []
    for seed in range(6):
        batch = token_batch(batch_size=2 + seed % 3, seed=seed)
        accelerator.accumulate()
        (causal_lm_loss(model, batch) / 3).backward()
        row = meter.step(step, optimizer, batch=batch)
        assert (row is None) != accelerator.sync_gradients
        if row is not None:
            micro_batches = [token_batch(2 + s % 3, seed=s) for s in range(seed - 2, seed + 1)]
            expected = reference.measure(step, optimizer, batch=micro_batches)
            for column in ("loss", "grad_norm", "critical_sharpness"):
                assert row[column] == expected[column], column
            rows.append(row)
            optimizer.step()
            optimizer.zero_grad()
        step += accelerator.sync_gradients
    assert [r["step"] for r in rows] == [0, 1] and all(r["status"] == "ok" for r in rows)


def accumulated_loop(tmp_path, step_of, given) -> list[dict]:
    """Six micro-batches in steps of three, ``step_of(micro_batch, updates)`` passed as the step
    and ``given(micro_batch)`` saying whether step() is called there."""
    model = float64_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    accelerator = Accumulating(steps=3)
    meter = AcceleratedMeter(
        accelerator,
        model,
        jsonl_path=tmp_path / "a.jsonl",
        probe="train",
        loss_fn=causal_lm_loss,
        measures=("critical",),
        schedule=sm.Schedule(every=1),
    )
    updates, rows = 0, []
    for index in range(6):
        batch = token_batch(batch_size=2, seed=index)
        accelerator.accumulate()
        (causal_lm_loss(model, batch) / 3).backward()
        if given(index) and (row := meter.step(step_of(index, updates), optimizer, batch)):
            rows.append(row)
        if accelerator.sync_gradients:
            optimizer.step()
            optimizer.zero_grad()
            updates += 1
    return rows


def test_a_step_that_counts_micro_batches_is_warned_of(tmp_path):
    """enumerate(loader) under accumulate counts micro-batches: the schedule's grid, which is
    on the updates, may never meet one that completes an update."""
    with pytest.warns(AccumulationWarning, match="step 0, then 1, within one accumulated"):
        accumulated_loop(tmp_path, lambda index, updates: index, lambda index: True)


def test_a_step_given_only_its_last_micro_batch_is_warned_of(tmp_path):
    """step() called only where accelerator.sync_gradients: the row measures one micro-batch
    against the gradient of three."""
    with pytest.warns(AccumulationWarning, match="accumulated 3 micro-batches but step"):
        rows = accumulated_loop(
            tmp_path, lambda index, updates: updates, lambda index: index % 3 == 2
        )
    assert len(rows) == 2


def wandb_loop(tmp_path: Path, steps: int, before_step) -> list[int]:
    """A hand loop with ``AcceleratedMeter(wandb=True)`` measuring every step, calling
    ``before_step(step)`` first; the steps in its JSONL file."""
    model = float64_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    path = tmp_path / "run" / "sharpness.jsonl"
    meter = AcceleratedMeter(
        OneProcess(),
        model,
        token_batch(),
        jsonl_path=path,
        wandb=True,
        measures=("critical",),
        schedule=sm.Schedule(every=1),
    )
    for step in range(1, steps + 1):
        before_step(step)
        optimizer.zero_grad()
        causal_lm_loss(model, token_batch(seed=step)).backward()
        optimizer.step()
        meter.step(step, optimizer)
    meter.close()
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def logged_steps(folder: Path, count: int) -> list[int]:
    """The sharpness steps the one offline W&B run under ``folder`` holds, once it holds
    ``count`` (wandb's service writes the file asynchronously, even after ``finish()``, so its
    last record may still be half-written when read)."""
    [run_file] = folder.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(DecodeError):
            history = wandb_records.history(run_file)
            steps = [h["sharpness/step"] for h in history if "sharpness/critical_sharpness" in h]
            if len(steps) >= count:
                return steps
        assert time.monotonic() < deadline, f"{run_file} never got {count} rows"
        time.sleep(0.5)


def test_a_user_who_replaces_their_wandb_run_midway_trains_on_and_loses_no_row(tmp_path):
    """The user finishes their W&B run and starts another mid-training (phases): the meter
    follows the active run instead of raising from a finished one."""
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    wandb.init(project="user", dir=tmp_path / "one", mode="offline")

    def second_phase_at_four(step: int) -> None:
        if step == 4:
            wandb.finish()
            wandb.init(project="user", dir=tmp_path / "two", mode="offline")

    assert wandb_loop(tmp_path, 6, second_phase_at_four) == [1, 2, 3, 4, 5, 6]
    wandb.finish()
    assert logged_steps(tmp_path / "one", 3) == [1, 2, 3]
    assert logged_steps(tmp_path / "two", 3) == [4, 5, 6]


def test_a_failing_wandb_log_is_a_warning_and_training_goes_on(tmp_path, monkeypatch):
    """W&B down at steps 2 and 3: one warning when it starts failing, one when it works again;
    the loop runs to its end and the JSONL file has every row."""
    wandb.init(project="user", dir=tmp_path, mode="offline")
    write = WandbSink.write

    def down_at_two_and_three(sink, row):
        if row["step"] in (2, 3):
            raise ConnectionError("the logging service is down")
        write(sink, row)

    monkeypatch.setattr(WandbSink, "write", down_at_two_and_three)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert wandb_loop(tmp_path, 5, lambda step: None) == [1, 2, 3, 4, 5]
    wandb.finish()
    messages = [str(w.message) for w in caught if issubclass(w.category, SinkWarning)]
    assert len(messages) == 2, messages
    assert "step 2 to W&B failed (ConnectionError: the logging service is down)" in messages[0]
    assert "works again (step 4)" in messages[1]
    assert logged_steps(tmp_path, 3) == [1, 4, 5]
