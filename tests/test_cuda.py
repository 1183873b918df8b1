"""On a CUDA GPU: the estimators through the math-kernel fallback of fused attention, batched
Hessian-vector products, and FSDP2 through accelerate (bf16 training is ``test_train``'s
``[cuda]`` case). Skipped without a GPU (CI has none); where one is lent:
``python -m pytest -q tests -k cuda``, or all device checks at once: ``benchmarks/gpu_checks.sh``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import causal_lm_loss, float64_gpt2, token_batch
from test_train import NEEDS_CUDA, ROOT, launch, rows_of

import sharpmeter as sm
from sharpmeter.measure.loss import move_to

pytestmark = NEEDS_CUDA
ACCELERATE = [str(Path(sys.executable).parent / "accelerate"), "launch"]
QUICK = ["--max_steps", "30", "--every", "10", "--hvp_every", "10", "--logging_steps", "10"]
QUICK += ["--report_to", "none"]


def estimates(device: str) -> list[float]:
    model = float64_gpt2(n_layer=2).float().to(device)  # default attention: SDPA's fused kernels
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


def test_batched_products_on_cuda_equal_single_ones():
    """8 products in one batched backward through fused attention's math fallback: the single
    products to float32 rounding, and Hutchinson's samples with them."""
    model = float64_gpt2(n_layer=2).float().cuda()
    batch = move_to(token_batch(batch_size=8, seed=3), torch.device("cuda"))
    single = sm.HessianOperator(model, causal_lm_loss, batch)
    batched = sm.HessianOperator(model, causal_lm_loss, batch, products_per_call=8)
    block = torch.randn(single.dim, 8, generator=torch.Generator().manual_seed(0)).cuda()
    many, one = batched @ block, single @ block
    assert float(torch.linalg.matrix_norm(many - one) / torch.linalg.matrix_norm(one)) < 1e-5
    one, many = (sm.hutchinson(op, 16, seed=0).samples for op in (single, batched))
    assert float(torch.linalg.vector_norm(many - one) / torch.linalg.vector_norm(one)) < 1e-5
    assert batched.products_per_call == 8  # no fallback


def gpt_gpu_without_budget(folder: Path) -> Path:
    """configs/gpt_gpu.yaml without its time budgets, which would skip most of a short run's
    measurements (a line left out would fall back to the meter's default budget)."""
    lines = (ROOT / "configs/gpt_gpu.yaml").read_text().splitlines()
    budgets = ("max_fraction", "hvp_max_fraction")
    kept = [line for line in lines if not line.startswith(budgets)]
    config = folder / "gpt_gpu.yaml"
    config.write_text("\n".join([*kept, *(f"{key}: null" for key in budgets), ""]))
    return config


def test_fsdp2_config_trains_and_measures_critical_sharpness(tmp_path):
    """FSDP2 on every GPU against one unsharded process on one GPU with the same global batch
    (each step's examples are the same: rank r takes every n-th batch of the one sampler), both
    in bf16: the same curve to bf16's precision over 30 steps (10% on critical sharpness, 2%
    on the probe loss; a shard's sum taken for the mean would be n times off)."""
    ranks = torch.cuda.device_count()
    config = gpt_gpu_without_budget(tmp_path)
    run = [*QUICK, "--size", "d384-l6", "--measures", "critical"]
    fsdp = ["--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"), "--num_processes"]
    done = launch([*ACCELERATE, *fsdp, str(ranks)], tmp_path / "fsdp", *run, config=config)
    assert done.returncode == 0, done.stderr[-3000:]
    per_device = yaml.safe_load(config.read_text())["per_device_train_batch_size"]
    batch = ["--per_device_train_batch_size", str(per_device * ranks)]
    done = launch([sys.executable], tmp_path / "one", *run, *batch, config=config)
    assert done.returncode == 0, done.stderr[-3000:]
    rows, reference = rows_of(tmp_path / "fsdp"), rows_of(tmp_path / "one")
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == [10, 20, 30]
    assert all(r["status"] == "ok" for r in [*rows, *reference]), rows + reference
    for row, expected in zip(rows, reference, strict=True):
        assert row["lr"] == pytest.approx(expected["lr"], rel=1e-6)
        assert row["loss"] == pytest.approx(expected["loss"], rel=2e-2)
        assert row["critical_sharpness"] == pytest.approx(expected["critical_sharpness"], rel=0.1)
