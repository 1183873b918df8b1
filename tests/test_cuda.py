"""On a CUDA GPU: the estimators through the math-kernel fallback of fused attention, and FSDP2
through accelerate (bf16 training is ``test_train``'s ``[cuda]`` case). Skipped without a GPU
(CI has none); where one is lent: ``python -m pytest -q tests -k cuda``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import causal_lm_loss, tiny_gpt2, token_batch
from test_train import NEEDS_CUDA, ROOT, launch, rows_of

import sharpmeter as sm
from sharpmeter.measure.loss import move_to

pytestmark = NEEDS_CUDA
ACCELERATE = [str(Path(sys.executable).parent / "accelerate"), "launch"]
QUICK = ["--max_steps", "30", "--every", "10", "--logging_steps", "10", "--report_to", "none"]


def estimates(device: str) -> list[float]:
    model = tiny_gpt2(n_layer=2).float().to(device)  # default attention: SDPA's fused kernels
    batch = move_to(token_batch(batch_size=8, seed=3), torch.device(device))
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    return [
        sm.lanczos(op, k=1, max_iter=40, tol=1e-6).value,
        sm.hutchinson(op, num_matvecs=16, seed=0).value,
        sm.critical_sharpness(
            model, causal_lm_loss, batch, op.gradient, eta0=0.1, precision_bits=10
        ).value,
    ]


def test_estimators_on_cuda_give_the_cpu_numbers():
    assert estimates("cuda") == pytest.approx(estimates("cpu"), rel=1e-3)


def gpt_gpu_without_budget(folder: Path) -> Path:
    """configs/gpt_gpu.yaml without its time budget, which would skip most of a short run's
    measurements."""
    lines = (ROOT / "configs/gpt_gpu.yaml").read_text().splitlines()
    config = folder / "gpt_gpu.yaml"
    config.write_text("\n".join(line for line in lines if not line.startswith("max_fraction")))
    return config


def test_fsdp2_config_trains_and_measures_critical_sharpness(tmp_path):
    out = tmp_path / "run"
    fsdp = ["--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"), "--num_processes"]
    done = launch(
        [*ACCELERATE, *fsdp, str(torch.cuda.device_count())],
        out,
        *QUICK,
        "--size",
        "d384-l6",
        "--measures",
        "critical",
        config=gpt_gpu_without_budget(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rows_of(out)
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), rows
    assert all(r["critical_sharpness"] > 0 for r in rows)
