"""recipes/train_gpt.py: one process, two gloo ranks, and bad configs that stop before training."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wandb
import wandb_records
from conftest import RUN_HOLDER
from google.protobuf.message import DecodeError
from transformers import GPT2LMHeadModel, default_data_collator
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import sharpmeter as sm
from sharpmeter.harness import train
from sharpmeter.harness.config import parse_config
from sharpmeter.harness.data import lm_dataset
from sharpmeter.harness.gpt import build_gpt
from sharpmeter.harness.runlock import LOCK_NAME, RunLockedError
from sharpmeter.harness.train import heldout_loss, is_finished
from sharpmeter.measure import sinks
from sharpmeter.measure.sinks import SinkWarning
from sharpmeter.paper.records import read_records

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "train_gpt.py"
CONFIG = ROOT / "configs" / "tiny.yaml"
QUICK = ["--size", "tiny", "--max_steps", "20", "--every", "5", "--hvp_every", "5"]
QUICK += ["--logging_steps", "5"]
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def launch(
    prefix: list[str], out: Path, *extra: str, config: Path = CONFIG
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HOME": str(out)}
    return subprocess.run(
        [*prefix, str(RECIPE), str(config), "--output_dir", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def rows_of(out: Path) -> list[dict]:
    return read_records(out / "sharpness.jsonl")


def test_one_process_run_logs_every_measure(tmp_path):
    """Every measure on the grid; the last row against its own reference, computed here from
    the step-20 checkpoint on the probe the callback draws (``probe_size`` blocks picked by a
    generator seeded with ``probe_seed``): the probe loss, lambda_max by a tight Lanczos, the
    trace by a Hutchinson of 64 probes, critical sharpness as 2 / eta_c inside its bracket."""
    out = tmp_path / "run"
    save = ["--save_strategy", "steps", "--save_steps", "20", "--heldout_blocks", "8"]
    done = launch([sys.executable], out, *QUICK, *save)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rows_of(out)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(r["status"] == "ok" for r in rows), rows
    for key in ("critical_sharpness", "hessian_trace", "lambda_max", "loss"):
        assert all(isinstance(r[key], float) for r in rows), key
    for row in rows:
        assert row["critical_sharpness"] == pytest.approx(2 / row["critical_eta"], rel=1e-12)
        assert row["critical_eta_lo"] <= row["critical_eta"] <= row["critical_eta_hi"]
    config = json.loads((out / "sharpmeter_run.json").read_text())
    last = rows[-1]
    model = GPT2LMHeadModel.from_pretrained(out / f"{PREFIX_CHECKPOINT_DIR}-20").eval()
    assert last["n_params"] == sum(p.numel() for p in model.parameters())
    data = lm_dataset(config["corpus"], config["block_size"], tokenizer=config["tokenizer"])
    # The last 8 blocks never trained; their loss at the end is the run's held-out loss.
    data, tail = data.split_tail(config["heldout_blocks"])
    heldout = json.loads((out / "heldout.json").read_text())
    assert heldout["blocks"] == 8 and heldout["tokens"] == 8 * (config["block_size"] - 1)
    assert heldout["loss"] == pytest.approx(heldout_loss(model, tail), rel=1e-6)
    generator = torch.Generator().manual_seed(config["probe_seed"])
    picked = torch.randperm(len(data), generator=generator)[: config["probe_size"]].tolist()
    probe = default_data_collator([data[i] for i in picked])
    operator = sm.HessianOperator(model, None, probe)
    assert float(operator.loss) == pytest.approx(last["loss"], rel=1e-5)
    top = sm.lanczos(operator, max_iter=80, tol=1e-8)
    assert top.converged and last["lambda_max_converged"]
    assert last["lambda_max"] == pytest.approx(top.value, rel=1e-4)  # tol 1e-3 on the residual
    trace = sm.hutchinson(operator, num_matvecs=64, seed=1)
    spread = math.hypot(last["hessian_trace_stderr"], trace.stderr)
    assert abs(last["hessian_trace"] - trace.value) <= 4 * spread
    assert config["size"] == "tiny" and config["max_steps"] == 20
    assert is_finished(out, config) and not is_finished(tmp_path / "elsewhere", config)
    with pytest.raises(ValueError, match="other settings \\(max_steps\\)"):
        is_finished(out, {**config, "max_steps": 40})
    assert list(out.glob("wandb/offline-run-*"))  # report_to: wandb, offline without a key


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_bf16_autocast_run_measures_every_measure(tmp_path, device):
    """gpt_gpu.yaml's bf16 training (on CUDA with SDPA's fused kernels, on CPU with its
    autocast); the measurements run outside autocast and through the math kernel."""
    out = tmp_path / "run"
    on_device = ["--use_cpu", str(device == "cpu").lower()]
    done = launch(
        [sys.executable], out, *QUICK, *on_device, "--bf16", "true", "--report_to", "none"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rows_of(out)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    assert all(r["hessian_trace"] > 0 and r["critical_sharpness"] > 0 for r in rows)


def test_bpe_on_a_local_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    out, cache = tmp_path / "run", tmp_path / "cache"
    bpe = ["--corpus", str(corpus), "--tokenizer", "bpe", "--vocab_size", "300"]
    extra = [*bpe, "--cache_dir", str(cache), "--measures", "critical", "--report_to", "none"]
    done = launch([sys.executable], out, *QUICK, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    data = lm_dataset(str(corpus), 64, tokenizer="bpe", vocab_size=300, cache_dir=cache)
    assert data.vocab_size <= 300 and list(cache.glob("bpe-*/tokenizer.json"))
    model = build_gpt("tiny", vocab_size=data.vocab_size, block_size=64)
    rows = rows_of(out)
    assert rows[0]["n_params"] == sum(p.numel() for p in model.parameters())
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert not (out / "wandb").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "gigantic"], "unknown model size"),
        (["--corpus", "/no/such/corpus.txt"], "/no/such/corpus.txt"),
        (["--measures", "curvature"], "measures"),
    ],
)
def test_bad_config_stops_before_training(tmp_path, extra, message):
    out = tmp_path / "run"
    done = launch([sys.executable], out, *extra)
    assert done.returncode != 0 and message in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_two_gloo_ranks_log_what_one_process_logs(tmp_path):
    single = launch([sys.executable], tmp_path / "one", *QUICK)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2"]
    double = launch(command, tmp_path / "two", *QUICK)
    assert single.returncode == 0 and double.returncode == 0, double.stderr[-3000:]
    one, two = rows_of(tmp_path / "one"), rows_of(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert set(one[0]) == set(two[0])
    assert all(r["status"] == "ok" for r in one + two)
    assert len(list((tmp_path / "two").glob("wandb/offline-run-*"))) == 1  # rank 0's run only


class FakeTrainer:
    """Stands in for transformers' Trainer: train() does nothing (or raises ``failure``)."""

    built = 0
    failure: Exception | None = None

    def __init__(self, model, args, train_dataset) -> None:
        type(self).built += 1
        self.model = model
        self.args = args
        self.callback_handler = SimpleNamespace(callbacks=[])

    def add_callback(self, callback) -> None:
        pass

    def train(self, resume_from_checkpoint=None) -> None:
        type(self).resumed_from = resume_from_checkpoint
        if self.failure is not None:
            raise self.failure


@pytest.fixture
def no_training(monkeypatch):
    """train_gpt runs through, building its model, without training it."""
    monkeypatch.setattr(train, "Trainer", FakeTrainer)
    monkeypatch.setattr(FakeTrainer, "built", 0)
    monkeypatch.setattr(FakeTrainer, "failure", None)
    monkeypatch.setattr(FakeTrainer, "resumed_from", None, raising=False)
    return FakeTrainer


def run_arguments(out: Path, *extra: str) -> tuple:
    return parse_config([str(CONFIG), "--output_dir", str(out), "--report_to", "none", *extra])


TOY_DATA = SimpleNamespace(vocab_size=256)


def test_the_done_marker_is_written_whole_or_not_at_all(tmp_path, no_training, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()  # as the Trainer makes it
    arguments = run_arguments(out, *QUICK)

    def disk_full(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sinks.os, "replace", disk_full)
    with pytest.raises(train.DoneMarkerError, match="No space left") as failed:
        train.train_gpt(*arguments, dataset=TOY_DATA)
    message = str(failed.value)  # one line: what finished, what is intact, how to recover
    assert "\n" not in message and message.startswith("training finished and ")
    assert (
        f"{out / 'sharpness.jsonl'} is intact" in message and str(out / train.DONE_FILE) in message
    )
    assert "free space and rerun" in message
    assert os.listdir(out) == []  # no marker, no temporary file (and no lock)
    monkeypatch.undo()
    monkeypatch.setattr(train, "Trainer", FakeTrainer)
    train.train_gpt(*arguments, dataset=TOY_DATA)
    assert is_finished(out, train.run_config(*arguments))


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", "\xff"])
def test_a_broken_done_marker_is_one_line_saying_how_to_recover(tmp_path, text):
    marker = tmp_path / train.DONE_FILE
    marker.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError) as broken:
        is_finished(tmp_path, {"size": "tiny"})
    message = str(broken.value)
    assert "\n" not in message and str(marker) in message
    assert "remove it to train this run again" in message


def test_a_run_on_a_folder_another_live_run_holds_is_refused(tmp_path, no_training, hold):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_NAME
    holder = hold(RUN_HOLDER, str(out))
    with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
        train.train_gpt(*run_arguments(out, *QUICK), dataset=TOY_DATA)
    assert no_training.built == 0 and list(out.iterdir()) == [lock]

    # The recipe says so in one line and leaves the folder as it was.
    done = launch([sys.executable], out, *QUICK, "--report_to", "none")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert str(lock) in line and f"pid {holder.pid}" in line
    assert list(out.iterdir()) == [lock]


def test_a_run_releases_its_folder_when_it_ends_and_when_it_fails(tmp_path, no_training):
    out = tmp_path / "run"
    arguments = run_arguments(out, *QUICK)
    train.train_gpt(*arguments, dataset=TOY_DATA)
    assert (out / train.DONE_FILE).is_file() and not (out / LOCK_NAME).exists()
    no_training.failure = RuntimeError("diverged")
    with pytest.raises(RuntimeError, match="diverged"):
        train.train_gpt(*run_arguments(tmp_path / "failed", *QUICK), dataset=TOY_DATA)
    assert not (tmp_path / "failed" / LOCK_NAME).exists()


def test_a_finished_folder_trained_again_has_no_marker_until_it_finishes(tmp_path, no_training):
    out = tmp_path / "run"
    train.train_gpt(*run_arguments(out, *QUICK), dataset=TOY_DATA)
    assert is_finished(out, train.run_config(*run_arguments(out, *QUICK)))
    changed = run_arguments(out, *QUICK, "--learning_rate", "0.5")
    with pytest.raises(train.FinishedRunError, match=r"other settings \(learning_rate\)"):
        train.train_gpt(*changed, dataset=TOY_DATA)  # kept: replacing it must be asked for
    assert no_training.built == 1 and (out / train.DONE_FILE).is_file()
    (out / train.DONE_FILE).unlink()  # the caller's choice
    no_training.failure = RuntimeError("killed midway")
    with pytest.raises(RuntimeError, match="killed midway"):
        train.train_gpt(*changed, dataset=TOY_DATA)
    assert not (out / train.DONE_FILE).exists()  # the old run's marker went with its rows
    no_training.failure = None
    train.train_gpt(*changed, dataset=TOY_DATA)
    assert is_finished(out, train.run_config(*changed))


def test_the_recipe_refuses_to_replace_a_finished_run_in_one_line(tmp_path, no_training):
    out = tmp_path / "run"
    train.train_gpt(*run_arguments(out, *QUICK), dataset=TOY_DATA)
    done = launch([sys.executable], out, *QUICK, "--report_to", "none", "--learning_rate", "0.5")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "other settings (learning_rate)" in line and f"remove {out / train.DONE_FILE}" in line


def test_resume_true_is_the_runs_own_last_checkpoint(tmp_path, no_training):
    out = tmp_path / "run"
    train.train_gpt(*run_arguments(out, *QUICK, "--resume_from_checkpoint", "true"), TOY_DATA)
    assert no_training.resumed_from is None  # no checkpoint yet: from scratch
    for step in (5, 10):
        (out / f"{PREFIX_CHECKPOINT_DIR}-{step}").mkdir()
    train.train_gpt(*run_arguments(out, *QUICK, "--resume_from_checkpoint", "True"), TOY_DATA)
    assert no_training.resumed_from == str(out / f"{PREFIX_CHECKPOINT_DIR}-10")


def test_a_run_started_over_moves_the_earlier_attempts_wandb_runs_aside(tmp_path, no_training):
    """A killed attempt's offline W&B run must not be synced beside the new one's."""
    out = tmp_path / "run"
    killed = out / "wandb" / "offline-run-20250101_000000-abc"
    killed.mkdir(parents=True)
    (out / f"{PREFIX_CHECKPOINT_DIR}-5").mkdir()
    resumed = run_arguments(out, *QUICK, "--resume_from_checkpoint", "true")
    train.train_gpt(*resumed, dataset=TOY_DATA)
    assert killed.is_dir()  # a resumed run continues that attempt
    (out / train.DONE_FILE).unlink()
    train.train_gpt(*run_arguments(out, *QUICK), dataset=TOY_DATA)
    assert not killed.exists() and (out / "wandb" / "earlier" / killed.name).is_dir()


def test_a_full_disk_at_the_heldout_loss_is_one_line(tmp_path, no_training, monkeypatch):
    def disk_full(output_dir, model, blocks):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "write_heldout_loss", disk_full)
    blocks = SimpleNamespace(vocab_size=256, split_tail=lambda count: (TOY_DATA, TOY_DATA))
    out = tmp_path / "run"
    with pytest.raises(train.DoneMarkerError) as failed:
        train.train_gpt(*run_arguments(out, *QUICK, "--heldout_blocks", "1"), dataset=blocks)
    message = str(failed.value)
    assert "\n" not in message and str(out / train.HELDOUT_FILE) in message
    assert "No space left" in message and not (out / train.DONE_FILE).exists()


def exit_code_in_wandb(out: Path) -> int:
    """The exit code the one offline W&B run under ``out`` recorded at its end (wandb's service
    writes the file asynchronously, even after ``finish()``, so its last record may still be
    half-written when read)."""
    [run_file] = out.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(DecodeError):
            records = wandb_records.records(run_file)
            exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
            if exits:
                return exits[-1]
        assert time.monotonic() < deadline, f"{run_file} never recorded the run's end"
        time.sleep(0.5)


@pytest.mark.parametrize(
    ("failure", "exit_code"),
    [(None, 0), (RuntimeError("out of memory"), 1), (KeyboardInterrupt(), 255)],
    ids=["finished", "raised", "interrupted"],
)
def test_the_wandb_run_records_how_training_ended(
    tmp_path, no_training, monkeypatch, failure, exit_code
):
    """A run that raised must not read as finished in W&B: its exit code is the one wandb gives
    an uncaught exception (1), or Ctrl-C (255)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    no_training.failure = failure
    out = tmp_path / "run"
    arguments = run_arguments(out, *QUICK, "--report_to", "wandb")
    if failure is None:
        train.train_gpt(*arguments, dataset=TOY_DATA)
    else:
        with pytest.raises(type(failure)):
            train.train_gpt(*arguments, dataset=TOY_DATA)
    assert exit_code_in_wandb(out) == exit_code


def test_a_wandb_run_that_cannot_start_online_trains_offline(tmp_path, no_training, monkeypatch):
    """A key and no network: wandb.init retries for its init_timeout, then raises (simulated
    here); the run warns and trains with an offline W&B run instead of stopping."""
    monkeypatch.setenv("WANDB_MODE", "online")
    real_init = wandb.init

    def init(**kwargs):
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("Timed out while retrying: no such host")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    out = tmp_path / "run"
    arguments = run_arguments(out, *QUICK, "--report_to", "wandb")
    with pytest.warns(SinkWarning, match="could not start online .* offline"):
        train.train_gpt(*arguments, dataset=TOY_DATA)
    assert is_finished(out, train.run_config(*arguments))
    assert exit_code_in_wandb(out) == 0
