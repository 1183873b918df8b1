"""SharpnessCallback in real Trainer runs: logging, non-interference, failures, resume."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import wandb
import wandb_records
from conftest import VOCAB, tiny_gpt2
from transformers import Trainer, TrainingArguments

import sharpmeter as sm
from sharpmeter.integrations.hf import SharpnessCallback

KEYS = ("critical_sharpness", "hessian_trace", "lambda_max")


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, size: int = 64, length: int = 8, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (size, length), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_trainer(tmp_path, dropout=0.1, report_to="none", max_steps=30, **args):
    model = tiny_gpt2(dropout=dropout).float().train()
    args.setdefault("save_strategy", "no")
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=5,
        report_to=report_to,
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        **args,
    )
    return Trainer(model=model, args=arguments, train_dataset=TokenDataset())


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def final_params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_measuring_every_step_leaves_training_bit_identical(tmp_path):
    """Dropout on, every measure, every step: the trajectory is the one without the callback."""
    reference = make_trainer(tmp_path / "a", max_steps=12)
    reference.train()
    measured = make_trainer(tmp_path / "b", max_steps=12)
    SharpnessCallback.attach(
        measured,
        schedule=sm.Schedule(every=1),
        measures=("critical", "trace", "spectral", "preconditioned", "directional"),
        dropout="train",
    )
    measured.train()
    rows = read_rows(tmp_path / "b" / "out" / "sharpness.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(r["status"] == "ok" for r in rows)
    assert all(torch.equal(a, b) for a, b in zip(final_params(measured), final_params(reference)))
    assert (
        reference.state.log_history[-1]["train_loss"]
        == measured.state.log_history[-1]["train_loss"]
    )


def test_wandb_offline_run_gets_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    trainer = make_trainer(tmp_path, report_to="wandb")
    SharpnessCallback.attach(trainer, schedule=sm.Schedule(every=10))
    trainer.train()
    rows = read_rows(tmp_path / "out" / "sharpness.jsonl")
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert all(math.isfinite(r[k]) for r in rows for k in KEYS)
    assert rows[0]["n_params"] == sum(p.numel() for p in trainer.model.parameters())
    history = [h for h in trainer.state.log_history if "sharpness/critical_sharpness" in h]
    assert [h["step"] for h in history] == [10, 20, 30]
    assert history[0]["sharpness/lambda_max"] == pytest.approx(rows[0]["lambda_max"])
    # The Trainer's own loss logs survive the steps where sharpness was logged too.
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [5, 10, 15, 20, 25, 30]
    wandb.finish()  # flush the offline run file
    run_files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    # wandb's service process writes the offline file asynchronously, even after finish().
    deadline = time.monotonic() + 60
    while len(logged := sharpness_history(run_files[0])) < len(rows):
        assert time.monotonic() < deadline, "the W&B run file never got the sharpness metrics"
        time.sleep(0.5)
    for row, entry in zip(rows, logged, strict=True):  # the JSONL's numbers, on the Trainer's axis
        assert entry["train/global_step"] == row["step"]
        for key in KEYS:
            assert entry[f"train/sharpness/{key}"] == pytest.approx(row[key], rel=1e-12), key


def sharpness_history(run_file) -> list[dict]:
    return [h for h in wandb_records.history(run_file) if "train/sharpness/lambda_max" in h]


def test_report_to_none_writes_only_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    trainer = make_trainer(tmp_path, max_steps=10)
    trainer.add_callback(
        SharpnessCallback(schedule=sm.Schedule(every=5))
    )  # unbound: no Trainer.log
    trainer.train()
    assert [r["step"] for r in read_rows(tmp_path / "out" / "sharpness.jsonl")] == [5, 10]
    assert [h["step"] for h in trainer.state.log_history if "sharpness/lambda_max" in h] == [5, 10]
    assert not list(tmp_path.glob("wandb"))


def test_failed_measurements_are_recorded_and_training_finishes(tmp_path, monkeypatch):
    def nan_loss(model, batch):
        return model(**batch).loss * float("nan")

    trainer = make_trainer(tmp_path, max_steps=6)
    SharpnessCallback.attach(trainer, loss_fn=nan_loss, schedule=sm.Schedule(every=3))
    trainer.train()
    rows = read_rows(tmp_path / "out" / "sharpness.jsonl")
    assert [r["status"] for r in rows] == ["nonfinite", "nonfinite"]
    assert rows[0]["critical_sharpness"] is None
    assert trainer.state.global_step == 6

    def broken_lanczos(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("sharpmeter.meter.lanczos", broken_lanczos)
    trainer = make_trainer(tmp_path / "second", max_steps=3)
    SharpnessCallback.attach(trainer, schedule=sm.Schedule(every=3))
    trainer.train()
    (row,) = read_rows(tmp_path / "second" / "out" / "sharpness.jsonl")
    assert row["spectral_status"] == "error: RuntimeError: boom"
    assert row["status"] == "error: spectral"
    assert math.isfinite(row["critical_sharpness"]) and math.isfinite(row["hessian_trace"])


def test_resume_continues_the_curve_without_duplicates(tmp_path):
    first = make_trainer(tmp_path, max_steps=20, save_strategy="steps", save_steps=10)
    SharpnessCallback.attach(first, schedule=sm.Schedule(every=4))
    first.train()  # measures 4..20 and checkpoints at 10 and 20
    second = make_trainer(tmp_path, max_steps=20, save_strategy="steps", save_steps=10)
    SharpnessCallback.attach(second, schedule=sm.Schedule(every=4))
    second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-10"))
    rows = read_rows(tmp_path / "out" / "sharpness.jsonl")
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20]
    state = json.loads((tmp_path / "out" / "checkpoint-10" / "sharpmeter_state.json").read_text())
    assert state["last_step"] == 8 and state["eta_c"] > 0


def test_bad_options_fail_at_construction():
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    with pytest.raises(ValueError, match="labels"):
        SharpnessCallback(batch)
    with pytest.raises(ValueError, match="measures"):
        SharpnessCallback({**batch, "labels": batch["input_ids"]}, measures=("sharpest",))
    with pytest.raises(ValueError, match="every"):
        sm.Schedule(every=0)
    with pytest.raises(ValueError, match="probe_size"):
        SharpnessCallback(probe_size=0)


def test_a_parameter_subset_given_with_the_probe_batch(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    layer = list(trainer.model.transformer.h[0].attn.parameters())
    probe = TokenDataset(size=4)[0]
    probe = {k: v[None] for k, v in probe.items()}
    SharpnessCallback.attach(trainer, probe, params=layer, schedule=sm.Schedule(every=2))
    trainer.train()
    (row,) = read_rows(tmp_path / "out" / "sharpness.jsonl")
    assert row["status"] == "ok" and row["step"] == 2
