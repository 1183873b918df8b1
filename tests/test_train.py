"""recipes/train_gpt.py: one process, two gloo ranks, and bad configs that stop before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharpmeter.data import lm_dataset
from sharpmeter.gpt import build_gpt
from sharpmeter.records import read_records
from sharpmeter.train import is_finished

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "train_gpt.py"
CONFIG = ROOT / "configs" / "tiny.yaml"
QUICK = ["--size", "tiny", "--max_steps", "20", "--every", "5", "--logging_steps", "5"]
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
    out = tmp_path / "run"
    done = launch([sys.executable], out, *QUICK)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rows_of(out)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(r["status"] == "ok" for r in rows), rows
    for key in ("critical_sharpness", "hessian_trace", "lambda_max", "loss"):
        assert all(isinstance(r[key], float) for r in rows), key
    config = json.loads((out / "sharpmeter_run.json").read_text())
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
