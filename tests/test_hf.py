"""SharpnessCallback in real Trainer runs: logging, non-interference, failures, resume."""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import wandb
import wandb_records
from conftest import VOCAB, causal_lm_loss, dense_hessian, float64_gpt2
from google.protobuf.message import DecodeError
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import (
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import sharpmeter as sm
from sharpmeter.integrations import hf
from sharpmeter.integrations.hf import SharpnessCallback, summary_line
from sharpmeter.measure.rng import fork_rng
from sharpmeter.measure.schema import RUN_FILE
from sharpmeter.measure.sinks import JsonlLockedError, SinkWarning, WandbSink

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
    model = float64_gpt2(dropout=dropout).float().train()
    defaults = {"save_strategy": "no", "logging_steps": 5, "disable_tqdm": True}
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=report_to,
        use_cpu=True,
        seed=0,
        data_seed=0,
        **{**defaults, **args},
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
    assert all(r["critical_status"] == "ok" and r["trace_status"] == "ok" for r in rows)
    assert not any(r["status"].startswith("error") for r in rows)
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
    logged = logged_entries(run_files[0], "train/sharpness/lambda_max", len(rows))
    for row, entry in zip(rows, logged, strict=True):  # the JSONL's numbers, on the Trainer's axis
        assert entry["train/global_step"] == row["step"]
        for key in KEYS:
            assert entry[f"train/sharpness/{key}"] == pytest.approx(row[key], rel=1e-12), key


def logged_entries(run_file, key: str, count: int) -> list[dict]:
    """The history entries of an offline W&B run that hold ``key``, once there are ``count``:
    wandb's service writes the file asynchronously, even after ``finish()``, so its last
    record may still be half-written when read."""
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(DecodeError):
            logged = [h for h in wandb_records.history(run_file) if key in h]
            if len(logged) >= count:
                return logged
        assert time.monotonic() < deadline, f"{run_file} never got {count} entries with {key}"
        time.sleep(0.5)


def test_report_to_none_writes_only_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    trainer = make_trainer(tmp_path, max_steps=10)
    trainer.add_callback(
        SharpnessCallback(schedule=sm.Schedule(every=5))
    )  # unbound: no Trainer.log
    trainer.train()
    assert [r["step"] for r in read_rows(tmp_path / "out" / "sharpness.jsonl")] == [5, 10]
    metadata = json.loads((tmp_path / "out" / "sharpness.meta.json").read_text())
    assert metadata["max_steps"] == 10  # the planned length: analysis tells unfinished runs
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

    monkeypatch.setattr("sharpmeter.measure.measures.lanczos", broken_lanczos)
    trainer = make_trainer(tmp_path / "second", max_steps=3)
    # Hutchinson's trace shares nothing with Lanczos (the default deflates it by Lanczos' basis)
    SharpnessCallback.attach(trainer, schedule=sm.Schedule(every=3), trace_method="hutchinson")
    trainer.train()
    (row,) = read_rows(tmp_path / "second" / "out" / "sharpness.jsonl")
    assert row["spectral_status"] == "error: RuntimeError: boom"
    assert row["status"] == "error: spectral"
    assert math.isfinite(row["critical_sharpness"]) and math.isfinite(row["hessian_trace"])

    # The default's one Krylov run failing fails both measures it serves, and only them.
    monkeypatch.setattr("sharpmeter.measure.measures.trace_and_top", broken_lanczos)
    trainer = make_trainer(tmp_path / "third", max_steps=3)
    SharpnessCallback.attach(trainer, schedule=sm.Schedule(every=3))
    trainer.train()
    (row,) = read_rows(tmp_path / "third" / "out" / "sharpness.jsonl")
    assert row["trace_status"] == row["spectral_status"] == "error: RuntimeError: boom"
    assert row["status"] == "error: trace,spectral"
    assert math.isfinite(row["critical_sharpness"])


def test_resume_continues_the_curve_without_duplicates(tmp_path):
    first = make_trainer(tmp_path, max_steps=20, save_strategy="steps", save_steps=10)
    SharpnessCallback.attach(first, schedule=sm.Schedule(every=4))
    first.train()  # measures 4..20 and checkpoints at 10 and 20
    second = make_trainer(tmp_path, max_steps=20, save_strategy="steps", save_steps=10)
    SharpnessCallback.attach(second, schedule=sm.Schedule(every=4))
    checkpoint = tmp_path / "out" / f"{PREFIX_CHECKPOINT_DIR}-10"
    second.train(resume_from_checkpoint=str(checkpoint))
    rows = read_rows(tmp_path / "out" / "sharpness.jsonl")
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20]
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    state = saved["stateful_callbacks"]["sharpmeter"]
    assert state["last_step"] == 8 and state["eta_c"] > 0


@pytest.mark.parametrize("every", [1, 3])
def test_resume_on_training_batches_continues_the_curve_without_duplicates(tmp_path, every):
    """A training-batch row of step k is taken in the next step, after checkpoint k was saved:
    the resumed run measures it again, so the crashed run's row k goes. It was kept: step 10
    twice (every=1). With every=3 the last row before the checkpoint is 9."""
    arguments = {"max_steps": 14, "save_strategy": "steps", "save_steps": 10}
    options = {"probe": "train", "schedule": sm.Schedule(every=every), "measures": ("critical",)}
    first = make_trainer(tmp_path, **arguments)
    SharpnessCallback.attach(first, **options)
    first.train()  # as a run that went on past its checkpoint at 10 and then crashed
    second = make_trainer(tmp_path, **arguments)
    SharpnessCallback.attach(second, **options)
    second.train(resume_from_checkpoint=str(tmp_path / "out" / f"{PREFIX_CHECKPOINT_DIR}-10"))
    steps = [r["step"] for r in read_rows(tmp_path / "out" / "sharpness.jsonl")]
    assert steps == list(range(0, 14, every))


@pytest.mark.parametrize("probe", [None, {"input_ids": torch.zeros(2, 8, dtype=torch.long)}])
def test_bad_options_fail_at_construction(probe):
    """With or without a probe batch, every option is checked when the callback is made."""
    with pytest.raises(ValueError, match="measures"):
        SharpnessCallback(probe, measures=("sharpest",))
    with pytest.raises(ValueError, match="tuple of names"):
        SharpnessCallback(probe, measures="critical")
    with pytest.raises(ValueError, match="did you mean 'lanczos_max_iter'"):
        SharpnessCallback(probe, lanczos_max_iters=10)
    with pytest.raises(ValueError, match="schedule"):
        SharpnessCallback(probe, schedule=10)
    with pytest.raises(ValueError, match="critical_precision_bits"):
        SharpnessCallback(probe, critical_precision_bits=True)
    with pytest.raises(ValueError, match="params"):
        SharpnessCallback(probe, params=torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(ValueError, match="every"):
        sm.Schedule(every=0)
    with pytest.raises(ValueError, match="probe_size"):
        SharpnessCallback(probe_size=0)


def test_a_probe_without_loss_is_refused_when_training_begins(tmp_path):
    """No labels and no loss_fn: one clear error before the first step, not one per row."""
    trainer = make_trainer(tmp_path, max_steps=3)
    probe = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    SharpnessCallback.attach(trainer, probe, schedule=sm.Schedule(every=1))
    with pytest.raises(ValueError, match="no .loss"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_parameter_subset_given_with_the_probe_batch(tmp_path):
    """The row measures the given probe's Hessian block of the given parameters, at the last
    step's parameters: lambda_max and the trace against that dense block (float64)."""
    trainer = make_trainer(tmp_path, max_steps=2)
    layer = [trainer.model.transformer.wte.weight]  # along the attention alone the loss never rises
    probe = TokenDataset(size=4)[0]
    probe = {k: v[None] for k, v in probe.items()}
    # schedules={}: the trace and lambda_max on the same grid as critical sharpness.
    SharpnessCallback.attach(
        trainer, probe, params=layer, schedule=sm.Schedule(every=2), schedules={}
    )
    trainer.train()
    (row,) = read_rows(tmp_path / "out" / "sharpness.jsonl")
    assert row["status"] == "ok" and row["step"] == 2
    assert row["trace_status"] == row["spectral_status"] == "ok"
    exact = copy.deepcopy(trainer.model).double().eval()  # measured at step 2: these weights
    block = dense_hessian(exact, causal_lm_loss, probe, [exact.transformer.wte.weight])
    assert block.shape == (layer[0].numel(),) * 2
    top = float(torch.linalg.eigvalsh(block)[-1])
    assert row["lambda_max"] == pytest.approx(top, rel=1e-4)
    trace = float(block.trace())
    assert abs(row["hessian_trace"] - trace) <= 4 * row["hessian_trace_stderr"]
    assert row["loss"] == pytest.approx(causal_lm_loss(exact, probe).item(), rel=1e-6)


def masking_collator(seed: int | None) -> DataCollatorForLanguageModeling:
    """The real random collator: BERT-style masking, with its own generator when seeded."""
    vocab = {f"t{i}": i for i in range(VOCAB - 2)} | {"[PAD]": VOCAB - 2, "[MASK]": VOCAB - 1}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[PAD]")),
        pad_token="[PAD]",
        mask_token="[MASK]",
    )
    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3, seed=seed)


class UnlabelledDataset(TokenDataset):
    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def training_record(trainer) -> tuple[list[torch.Tensor], list[float]]:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return final_params(trainer), losses


NON_INTERFERENCE_CASES = {
    "unseeded_attach_drawn": (None, "attach", False),
    "unseeded_callbacks_given": (None, "callbacks", True),
    "seeded_attach_given": (0, "attach", True),
    "seeded_callbacks_drawn": (0, "callbacks", False),
}


@pytest.mark.parametrize("case", NON_INTERFERENCE_CASES)
def test_training_is_bit_identical_with_a_random_collator(tmp_path, case):
    """Dropout on, masking collator (global RNG or its own generator), the callback added
    either way, probe given or drawn: every logged loss and the final parameters are those of
    the run without it."""
    seed, way, given = NON_INTERFERENCE_CASES[case]

    def run(folder, with_callback: bool):
        trainer = make_trainer(folder, max_steps=8, logging_steps=1)
        trainer.data_collator = masking_collator(seed)
        trainer.train_dataset = UnlabelledDataset()
        if not with_callback:
            trainer.train()
            return training_record(trainer)
        probe = masking_collator(123)([UnlabelledDataset()[i] for i in range(4)]) if given else None
        options = {"schedule": sm.Schedule(every=2), "measures": ("critical", "trace")}
        if way == "attach":
            SharpnessCallback.attach(trainer, probe, **options)
        else:
            trainer.add_callback(SharpnessCallback(probe, **options))
        trainer.train()
        rows = read_rows(folder / "out" / "sharpness.jsonl")
        assert [r["step"] for r in rows] == [2, 4, 6, 8]
        assert all(r["trace_status"] == "ok" for r in rows)
        return training_record(trainer)

    reference_params, reference_losses = run(tmp_path / "a", with_callback=False)
    params, losses = run(tmp_path / "b", with_callback=True)
    assert len(losses) == 8 and losses == reference_losses
    assert all(torch.equal(a, b) for a, b in zip(params, reference_params))


class TokenStream(torch.utils.data.IterableDataset):
    """A streaming dataset: no length, no indices; it shuffles with the global RNG."""

    def __iter__(self):
        ids = TokenDataset().ids
        for i in torch.randperm(len(ids)).tolist():
            yield {"input_ids": ids[i], "labels": ids[i]}


def test_a_streaming_dataset_gives_its_first_examples_as_the_probe(tmp_path):
    def run(folder, with_callback: bool):
        trainer = make_trainer(folder, max_steps=6, logging_steps=1)
        trainer.train_dataset = TokenStream()
        if with_callback:
            SharpnessCallback.attach(trainer, schedule=sm.Schedule(every=3), probe_size=4)
        trainer.train()
        return trainer

    reference = run(tmp_path / "a", with_callback=False)
    measured = run(tmp_path / "b", with_callback=True)
    rows = read_rows(tmp_path / "b" / "out" / "sharpness.jsonl")
    assert [r["step"] for r in rows] == [3, 6] and all(r["status"] != "error" for r in rows)
    assert all(math.isfinite(r["hessian_trace"]) for r in rows)
    assert training_record(measured)[1] == training_record(reference)[1]
    assert all(torch.equal(a, b) for a, b in zip(final_params(measured), final_params(reference)))


def test_resume_from_a_checkpoint_elsewhere_keeps_the_warm_start(tmp_path):
    """The warm start travels in the checkpoint's trainer_state.json: a checkpoint copied to
    another disk resumes the curve the uninterrupted run measured, row for row, also when the
    Trainer restores its stateful callbacks (it passes over the meter's state, with a log line)."""
    options = {"schedule": sm.Schedule(every=4), "measures": ("critical",)}
    first = make_trainer(tmp_path / "a", max_steps=20, save_strategy="steps", save_steps=10)
    SharpnessCallback.attach(first, **options)
    first.train()
    moved = tmp_path / "elsewhere" / "saved"
    shutil.copytree(tmp_path / "a" / "out" / f"{PREFIX_CHECKPOINT_DIR}-10", moved)
    # The head (4, 8) is copied from the first run's file, which the checkpoint names.
    uninterrupted = read_rows(tmp_path / "a" / "out" / "sharpness.jsonl")
    for restore in (False, True):
        folder = tmp_path / f"restore_{restore}"
        second = make_trainer(
            folder,
            max_steps=20,
            save_strategy="no",
            restore_callback_states_from_checkpoint=restore,
        )
        SharpnessCallback.attach(second, **options)
        second.train(resume_from_checkpoint=str(moved))
        resumed = read_rows(folder / "out" / "sharpness.jsonl")
        assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
        assert [r["step"] for r in resumed] == [4, 8, 12, 16, 20]
        for a, b in zip(uninterrupted, resumed):
            assert a["critical_num_forward"] == b["critical_num_forward"]
            assert a["critical_sharpness"] == b["critical_sharpness"]


def test_resume_from_another_folders_checkpoint_starts_with_that_runs_rows(tmp_path):
    """The new folder's curve is whole: the rows up to the checkpoint come from the file of
    the run that saved it, under the new run's name (one training is one run to analysis), with
    a warning naming the checkpoint; when that file is gone, the warning says the curve lacks
    its head, and why. The metadata records where the run came from, also when only train()
    is told (transformers then leaves args.resume_from_checkpoint unset)."""
    options = {"schedule": sm.Schedule(every=4), "measures": ("critical",)}
    first = make_trainer(tmp_path / "a", max_steps=20, save_strategy="steps", save_steps=10)
    SharpnessCallback.attach(first, **options)
    first.train()
    checkpoint = str(tmp_path / "a" / "out" / f"{PREFIX_CHECKPOINT_DIR}-10")
    for folder, message, steps in (
        ("b", "rows up to step 8 were copied", [4, 8, 12, 16, 20]),
        ("c", "no rows up to step 8 were found.*could not be read.*No such file", [12, 16, 20]),
    ):
        if folder == "c":
            (tmp_path / "a" / "out" / RUN_FILE).rename(tmp_path / "a" / "kept.jsonl")
        second = make_trainer(tmp_path / folder, max_steps=20)
        SharpnessCallback.attach(second, **options, run_name="resumed")
        with pytest.warns(RuntimeWarning, match=f"{re.escape(checkpoint)}.*{message}"):
            second.train(resume_from_checkpoint=checkpoint)
        rows = read_rows(tmp_path / folder / "out" / RUN_FILE)
        assert [r["step"] for r in rows] == steps
        assert {r["run"] for r in rows} == {"resumed"}
        assert read_metadata(second)["resumed_from"] == checkpoint
        assert read_metadata(second)["resumed_at_step"] == 10


def test_a_callback_trained_again_takes_its_file_anew_and_a_second_writer_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4)
    callback = SharpnessCallback.attach(trainer, schedule=sm.Schedule(every=2))
    trainer.add_callback(Crash(step=3))
    with pytest.raises(RuntimeError, match="crashed"):
        trainer.train()  # its sink is left open, holding the file
    other = make_trainer(tmp_path, max_steps=4)
    SharpnessCallback.attach(other, schedule=sm.Schedule(every=2))
    with pytest.raises(JsonlLockedError, match="different output_dir"):
        other.train()
    trainer.remove_callback(Crash)
    with pytest.warns(RuntimeWarning, match=r"sharpness\.jsonl -> sharpness\.1\.jsonl"):
        trainer.train()
    assert callback.sink is not None
    assert [r["step"] for r in read_rows(tmp_path / "out" / RUN_FILE)] == [2, 4]


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_the_console_gets_one_short_line_per_measurement(tmp_path, capsys, disable_tqdm):
    trainer = make_trainer(tmp_path, max_steps=4, disable_tqdm=disable_tqdm)
    SharpnessCallback.attach(trainer, schedule=sm.Schedule(every=2))
    trainer.train()
    printed = capsys.readouterr()
    console = printed.out + printed.err
    assert "sharpness/" not in console  # never the row as a dict
    lines = [line for line in console.splitlines() if line.startswith("sharpness step")]
    if disable_tqdm:
        assert lines == []
    else:
        assert [line.split(":")[0] for line in lines] == ["sharpness step 2", "sharpness step 4"]
        assert all("critical" in line and "trace" in line and len(line) < 160 for line in lines)
    logged = [h for h in trainer.state.log_history if "sharpness/critical_sharpness" in h]
    assert [h["step"] for h in logged] == [2, 4]  # the loggers still get every value


def test_loggers_get_each_measure_at_the_steps_its_schedule_took_it(tmp_path):
    """Critical sharpness every 2 steps, the trace every 4: the JSONL file keeps one schema
    (the trace not_due between), the loggers get no NaN for a trace that was not due."""
    trainer = make_trainer(tmp_path, max_steps=8, dropout=0.0)
    SharpnessCallback.attach(
        trainer,
        measures=("critical", "trace"),
        schedule=sm.Schedule(every=2),
        schedules={"trace": sm.Schedule(every=4)},
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "sharpness/loss" in h]
    assert [h["step"] for h in logged] == [2, 4, 6, 8]
    assert [h["step"] for h in logged if "sharpness/hessian_trace" in h] == [4, 8]
    assert not any("sharpness/hessian_trace_stderr" in h for h in logged if h["step"] in (2, 6))
    assert all(math.isfinite(v) for h in logged for v in h.values())
    rows = read_rows(tmp_path / "out" / "sharpness.jsonl")
    assert [r["trace_status"] for r in rows] == ["not_due", "ok", "not_due", "ok"]
    assert {tuple(r) for r in rows} == {tuple(rows[0])}


def test_a_jsonl_that_cannot_be_written_does_not_stop_training(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the folder should be")
    trainer = make_trainer(tmp_path, max_steps=4)
    SharpnessCallback.attach(
        trainer, schedule=sm.Schedule(every=2), jsonl_path=str(blocker / "sharpness.jsonl")
    )
    with pytest.warns(SinkWarning, match="blocker"):
        trainer.train()
    assert trainer.state.global_step == 4
    logged = [h for h in trainer.state.log_history if "sharpness/critical_sharpness" in h]
    assert [h["step"] for h in logged] == [2, 4]


def test_preconditioned_with_a_non_adam_optimizer_is_refused_before_training(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, optim="sgd")
    SharpnessCallback.attach(trainer, measures=("critical", "preconditioned"))
    with pytest.raises(ValueError, match="Adam-type"):
        trainer.train()
    assert trainer.state.global_step == 0


class FailingLogger(TrainerCallback):
    """A ``report_to`` integration whose service is down when the sharpness row comes."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if any(key.startswith("sharpness/") for key in logs or {}):
            raise ConnectionError("the logging service is down")


class RecordingRun:
    """An active W&B run that keeps what it is given, one entry per step, as W&B does: a log
    with ``commit=False`` joins the current step, which the next log or the run's end commits."""

    def __init__(self):
        self.metrics: list[tuple[tuple, dict]] = []
        self.logged: list[dict] = []
        self.step = 0
        self.uncommitted: dict = {}

    def define_metric(self, *args, **kwargs):
        self.metrics.append((args, kwargs))

    def log(self, data, step=None, commit=None):
        self.uncommitted.update(data)
        if commit or (step is None and commit is None):
            self.finish()

    def finish(self):
        if self.uncommitted:
            self.logged.append(self.uncommitted)
        self.uncommitted = {}
        self.step += 1


class FailingRun(RecordingRun):
    """An active W&B run that cannot log."""

    def log(self, *args, **kwargs):
        raise ConnectionError("the logging service is down")


class UnreachableRun(FailingRun):
    """An active W&B run that cannot even be set up (``define_metric`` raises too)."""

    def define_metric(self, *args, **kwargs):
        raise ConnectionError("the logging service is down")


def test_unbound_the_active_wandb_run_gets_the_rows_through_a_wandb_sink(tmp_path, monkeypatch):
    """Not bound to the Trainer, the callback logs into the active W&B run through one
    WandbSink, set up lazily at the first row (not when the callback is made), under the keys
    the Trainer's WandbCallback gives: train/sharpness/<column>, each defined by name on the
    sink's own train/sharpness/step axis, non-finite values left out."""
    run = RecordingRun()
    monkeypatch.setattr(wandb, "run", run)
    made = []
    monkeypatch.setattr(hf, "WandbSink", lambda **kw: made.append(WandbSink(**kw)) or made[-1])
    trainer = make_trainer(tmp_path, max_steps=4)
    callback = SharpnessCallback(schedule=sm.Schedule(every=2), measures=("critical",))
    assert run.metrics == [] and callback._wandb is None  # nothing set up before the first row
    trainer.add_callback(callback)
    trainer.train()
    assert len(made) == 1 and made[0].run is run and not made[0].owns_run
    run.finish()  # the user's to finish: it commits the last row
    history = [h for h in trainer.state.log_history if "sharpness/critical_sharpness" in h]
    assert [h["step"] for h in history] == [2, 4]
    expected = [
        {
            **{f"train/{k}": v for k, v in h.items() if k != "step" and math.isfinite(v)},
            "train/sharpness/step": h["step"],
        }
        for h in history
    ]
    assert run.logged == expected
    assert run.metrics[0] == (("train/sharpness/step",), {})
    assert dict((args[0], kwargs) for args, kwargs in run.metrics[1:]) == {
        key: {"step_metric": "train/sharpness/step"}
        for key in expected[0]
        if key != "train/sharpness/step"
    }
    rows = read_rows(tmp_path / "out" / "sharpness.jsonl")
    for row, entry in zip(rows, run.logged, strict=True):
        assert entry["train/sharpness/critical_sharpness"] == row["critical_sharpness"]
        assert entry["train/sharpness/loss"] == row["loss"]
    assert callback._wandb is None  # closed at the end of training; the run is not finished


def test_bound_the_users_own_wandb_run_gets_every_row_once(tmp_path):
    """The Trainer reports to no logger (transformers 5's default) while the user's own W&B run
    is active: the bound callback writes every row into it through a WandbSink, once."""
    run = wandb.init(project="user", dir=tmp_path, mode="offline")
    trainer = make_trainer(tmp_path, max_steps=4)
    SharpnessCallback.attach(trainer, schedule=sm.Schedule(every=2), measures=("critical",))
    trainer.train()
    run.finish()
    rows = read_rows(tmp_path / "out" / "sharpness.jsonl")
    [run_file] = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    logged = logged_entries(run_file, "train/sharpness/critical_sharpness", len(rows))
    assert [entry["train/sharpness/step"] for entry in logged] == [r["step"] for r in rows]
    for row, entry in zip(rows, logged, strict=True):
        assert entry["train/sharpness/critical_sharpness"] == row["critical_sharpness"]


def test_attach_keeps_a_trainer_that_reports_to_wandb_from_asking_for_a_key(tmp_path, monkeypatch):
    """Without an API key the Trainer's WandbCallback, which starts its run when training
    begins, would stop to ask for one (a UsageError where no one can answer): attach sets
    WANDB_MODE by wandb_mode() (offline here), unless the user set it, and only for a Trainer
    that reports to W&B."""
    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.delenv("WANDB_MODE")  # unset, and unset again after the test
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    SharpnessCallback.attach(make_trainer(tmp_path))
    assert "WANDB_MODE" not in os.environ
    trainer = make_trainer(tmp_path, report_to="wandb", max_steps=2)
    SharpnessCallback.attach(trainer, schedule=sm.Schedule(every=2), measures=("critical",))
    assert os.environ["WANDB_MODE"] == "offline"
    trainer.train()
    wandb.finish()
    assert list(tmp_path.glob("wandb/offline-run-*"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    SharpnessCallback.attach(make_trainer(tmp_path, report_to="wandb"))
    assert os.environ["WANDB_MODE"] == "disabled"


@pytest.mark.parametrize("bound", [True, False, "setup"])
def test_a_failing_logger_does_not_stop_training(tmp_path, monkeypatch, bound):
    """Bound (Trainer.log and its loggers) or not (a WandbSink into the active W&B run, whose
    logging or setup fails), a logger that raises is a warning: training runs to its end on
    its own trajectory, the JSONL file gets every row."""
    reference = make_trainer(tmp_path / "a", max_steps=4)
    reference.train()
    trainer = make_trainer(tmp_path / "b", max_steps=4)
    options = {"schedule": sm.Schedule(every=2), "measures": ("critical",)}
    if bound:
        trainer.add_callback(FailingLogger())
        SharpnessCallback.attach(trainer, **options)
    else:
        monkeypatch.setattr(wandb, "run", UnreachableRun() if bound == "setup" else FailingRun())
        trainer.add_callback(SharpnessCallback(**options))
    with pytest.warns(SinkWarning, match="the logging service is down"):
        trainer.train()
    assert trainer.state.global_step == 4
    assert [r["step"] for r in read_rows(tmp_path / "b" / "out" / "sharpness.jsonl")] == [2, 4]
    assert all(torch.equal(a, b) for a, b in zip(final_params(trainer), final_params(reference)))
    # The Trainer's own loss logs are untouched by the failure.
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [
        h["step"] for h in reference.state.log_history if "loss" in h
    ]


def test_the_console_line_shows_a_spread_only_when_it_is_finite():
    row = {"step": 3, "hessian_trace": 2.5, "status": "ok", "wall_seconds": 1.5}
    for spread in (math.nan, math.inf, None):
        line = summary_line({**row, "hessian_trace_stderr": spread})
        assert "±" not in line and "nan" not in line and "trace 2.5 [" in line, line
    assert "trace 2.5 ± 0.25 [ok, 1.5 s]" in summary_line({**row, "hessian_trace_stderr": 0.25})


class CountingStream(torch.utils.data.IterableDataset):
    """A stream that counts the passes started over it."""

    def __init__(self, seed: int = 0):
        self.ids = TokenDataset(seed=seed).ids
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        for ids in self.ids:
            yield {"input_ids": ids, "labels": ids}


class Untouchable(torch.utils.data.IterableDataset):
    """This rank's shard of a stream, which a rank that is not 0 must not read for the probe."""

    def __iter__(self):
        raise AssertionError("a rank other than 0 read its stream for the probe")


def refuse_to_collate(examples):
    raise AssertionError("a rank other than 0 collated a probe")


def stream_loader(dataset, collate_fn=torch.utils.data.default_collate):
    return torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_fn)


def fake_process_group(monkeypatch, rank: int, sent: list) -> None:
    """Rank ``rank`` of two: ``broadcast_object_list`` records what rank 0 sends in ``sent``
    and fills the list in place on the other rank, as torch does."""

    def broadcast_object_list(objects, src=None, **kwargs):
        assert src == 0
        if rank == 0:
            sent.append(list(objects))
        else:
            objects[:] = sent[-1]

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast_object_list)


def test_under_ddp_rank_zero_draws_the_probe_and_the_other_ranks_take_it(monkeypatch):
    """Ranks of a streaming dataset read different shards: rank 0 draws the probe and sends
    it, the others neither read their stream nor collate, so every rank holds the same probe.
    One process draws as before, with no collective."""
    callback = SharpnessCallback(probe_size=4)
    stream = CountingStream()

    def no_collective(*args, **kwargs):
        raise AssertionError("a broadcast outside a process group")

    monkeypatch.setattr(torch.distributed, "broadcast_object_list", no_collective)
    alone = callback._draw_probe(stream_loader(stream), [])
    assert stream.passes == 1
    assert torch.equal(alone["input_ids"], stream.ids[:4])

    sent: list = []
    fake_process_group(monkeypatch, 0, sent)
    drawn = callback._draw_probe(stream_loader(stream), [])
    assert stream.passes == 2 and len(sent) == 1
    assert torch.equal(drawn["input_ids"], alone["input_ids"])

    fake_process_group(monkeypatch, 1, sent)
    states = torch.get_rng_state(), random.getstate()
    taken = callback._draw_probe(stream_loader(Untouchable(), refuse_to_collate), [])
    assert torch.equal(taken["input_ids"], drawn["input_ids"])
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]


def test_under_ddp_a_probe_rank_zero_cannot_draw_fails_on_every_rank(monkeypatch):
    """An empty stream on rank 0: every rank raises, none waits in a collective for a probe."""
    callback = SharpnessCallback(probe_size=4)
    sent: list = []
    fake_process_group(monkeypatch, 0, sent)
    empty = CountingStream()
    empty.ids = empty.ids[:0]
    with pytest.raises(ValueError, match="no example"):
        callback._draw_probe(stream_loader(empty), [])
    assert len(sent) == 1
    fake_process_group(monkeypatch, 1, sent)
    with pytest.raises(ValueError, match="rank 0 could not draw the probe.*no example"):
        callback._draw_probe(stream_loader(Untouchable(), refuse_to_collate), [])


def test_options_come_as_one_object_keywords_or_both_and_the_rest_from_the_trainer(tmp_path):
    given = sm.MeterOptions(measures=("critical",), lanczos_max_iter=7)
    callback = SharpnessCallback(options=given, schedule=sm.Schedule(every=3))
    assert callback.options == given.replace(schedule=sm.Schedule(every=3))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_grad_norm=0.5, use_cpu=True, report_to="none"
    )
    filled = callback._options_under(args, TrainerState())
    assert (filled.max_grad_norm, filled.progress, filled.lanczos_max_iter) == (0.5, True, 7)
    own = SharpnessCallback(max_grad_norm=2.0, progress=False)._options_under(args, TrainerState())
    assert (own.max_grad_norm, own.progress) == (2.0, False)


def test_training_is_bit_identical_with_gradient_accumulation_and_clipping(tmp_path):
    """Accumulated micro-batches, clipping, decay/no-decay groups and dropout: measuring every
    step with every measure leaves the logged losses and final parameters as without it."""
    options = {
        "max_steps": 6,
        "logging_steps": 1,
        "gradient_accumulation_steps": 3,
        "max_grad_norm": 0.5,
        "weight_decay": 0.01,
    }
    reference = make_trainer(tmp_path / "a", **options)
    reference.train()
    measured = make_trainer(tmp_path / "b", **options)
    SharpnessCallback.attach(
        measured,
        schedule=sm.Schedule(every=1),
        measures=("critical", "trace", "spectral", "preconditioned", "directional"),
    )
    measured.train()
    rows = read_rows(tmp_path / "b" / "out" / "sharpness.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["critical_status"] == "ok" and r["directional_status"] == "ok" for r in rows)
    assert len(reference.optimizer.param_groups) == 2  # decay and no-decay
    params, losses = training_record(measured)
    reference_params, reference_losses = training_record(reference)
    assert len(losses) == 6 and losses == reference_losses
    assert all(torch.equal(a, b) for a, b in zip(params, reference_params))


class Crash(TrainerCallback):
    """Training raises at ``step``, as a crash would: the Trainer's on_train_end never runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("crashed")


def read_metadata(trainer) -> dict:
    return json.loads((Path(trainer.args.output_dir) / "sharpness.meta.json").read_text())


def test_the_metadata_says_whether_training_ended_normally(tmp_path):
    finished = make_trainer(tmp_path / "finished", max_steps=4)
    SharpnessCallback.attach(finished, schedule=sm.Schedule(every=2))
    finished.train()
    assert read_metadata(finished)["finished"] is True
    crashed = make_trainer(tmp_path / "crashed", max_steps=4)
    SharpnessCallback.attach(crashed, schedule=sm.Schedule(every=2))
    crashed.add_callback(Crash(step=3))
    with pytest.raises(RuntimeError, match="crashed"):
        crashed.train()
    assert read_metadata(crashed)["finished"] is False


def test_rows_a_crashed_run_could_not_write_are_reported_lost(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the folder should be")
    trainer = make_trainer(tmp_path, max_steps=4)
    SharpnessCallback.attach(
        trainer, schedule=sm.Schedule(every=1), jsonl_path=str(blocker / "sharpness.jsonl")
    )
    trainer.add_callback(Crash(step=2))
    with pytest.warns(SinkWarning, match="blocker"), pytest.raises(RuntimeError, match="crashed"):
        trainer.train()
    del trainer
    with pytest.warns(SinkWarning, match="2 rows could not be written .* lost"):
        gc.collect()


def test_the_drawn_probe_forks_the_random_streams_of_the_models_devices(tmp_path, monkeypatch):
    forked = []

    def recording_fork_rng(tensors=()):
        forked.append(list(tensors))
        return fork_rng(tensors)

    monkeypatch.setattr(hf, "fork_rng", recording_fork_rng)
    trainer = make_trainer(tmp_path, max_steps=1)
    SharpnessCallback.attach(trainer, schedule=sm.Schedule(every=1), measures=("critical",))
    trainer.train()
    [tensors] = forked
    parameters = list(trainer.model.parameters())
    assert len(tensors) == len(parameters) and all(map(torch.Tensor.is_set_to, tensors, parameters))


def test_batched_hvps_on_the_training_batch_give_the_rows_of_single_ones(tmp_path):
    """probe="train" with accumulated micro-batches (one operator over both), the trace's probes
    four to a backward: the same rows as one at a time, and the same training."""
    options = {"max_steps": 4, "gradient_accumulation_steps": 2}
    runs = {}
    for per_call in (1, 4):
        trainer = make_trainer(tmp_path / str(per_call), **options)
        SharpnessCallback.attach(
            trainer,
            schedule=sm.Schedule(every=2),
            measures=("trace", "spectral"),
            probe="train",
            hvp_products_per_call=per_call,
        )
        trainer.train()
        runs[per_call] = (read_rows(tmp_path / str(per_call) / "out" / "sharpness.jsonl"), trainer)
    (single, single_trainer), (batched, batched_trainer) = runs[1], runs[4]
    # On the training batch a row is taken before its step's update: steps 0 and 2 of 0-3.
    assert [r["step"] for r in batched] == [r["step"] for r in single] == [0, 2]
    assert all(r["status"] == "ok" for r in batched)
    for row, reference in zip(batched, single, strict=True):
        for column in ("hessian_trace", "hessian_trace_stderr", "lambda_max"):
            assert row[column] == pytest.approx(reference[column], rel=1e-4), column
    assert all(
        torch.equal(a, b)
        for a, b in zip(final_params(batched_trainer), final_params(single_trainer), strict=True)
    )


def lora_trainer(tmp_path) -> Trainer:
    """A GPT-2 with peft's LoRA on its attention (64 trainable parameters of 1144, small
    gradients) at the Trainer's default learning rate, accumulated micro-batches, clipping,
    dropout."""
    import peft

    config = peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.1, fan_in_fan_out=True)
    model = peft.get_peft_model(float64_gpt2(dropout=0.1).float().train(), config)
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    return Trainer(model=model, args=arguments, train_dataset=TokenDataset())


@pytest.mark.parametrize("probe", ["fixed", "train"])
def test_a_lora_model_trains_bit_identically_and_rounding_fakes_no_crossing(tmp_path, probe):
    """Only the adapters train and are measured, and training is as without measuring. Before,
    a rounding rise of 1 ulp far below eta_c gave the training-batch row at step 2 lambda_c =
    7e5 with status ok, where the curvature along the update (directional sharpness) is 6."""
    reference = lora_trainer(tmp_path / "a")
    reference.train()
    measured = lora_trainer(tmp_path / "b")
    SharpnessCallback.attach(
        measured,
        schedule=sm.Schedule(every=2),
        measures=("critical", "directional", "trace", "spectral"),
        probe=probe,
    )
    measured.train()
    params, losses = training_record(measured)
    reference_params, reference_losses = training_record(reference)
    assert len(losses) == 6 and losses == reference_losses
    assert all(torch.equal(a, b) for a, b in zip(params, reference_params))
    rows = read_rows(tmp_path / "b" / "out" / "sharpness.jsonl")
    assert len(rows) == 3 and all(r["trace_status"] == "ok" for r in rows)
    if probe == "train":
        assert [r["critical_status"] for r in rows] == ["no_increase", "ok", "ok"]
        for row in rows[1:]:
            assert 0.5 < row["critical_sharpness"] / row["directional_sharpness"] < 2, row
