"""A bfloat16 model (as GPUs train them) runs every measure, close to float32's numbers.

Losses are compared in float32, and the vectors of Lanczos and Hutchinson are float32, so only the
model's own bf16 rounding separates the two: 0.1-1.3% for curvature, by CPU, and for critical
sharpness what the loss noise floor (bf16 epsilon times the loss) allows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import causal_lm_loss, float64_gpt2, token_batch

import sharpmeter as sm

# Relative differences from float32 seen: ~1e-3 for trace and lambda_max on a CPU with AVX-512,
# 1.3e-2 for the trace on an AVX2-only CPU (its bf16 matmuls round differently); ~4e-2 for the
# directional sharpness, whose direction comes from a bf16 Adam state.
TOLERANCES = {"hessian_trace": 3e-2, "lambda_max": 3e-2, "directional_sharpness": 0.1}


def measure(model: torch.nn.Module, batch: dict) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    causal_lm_loss(model, batch).backward()
    optimizer.step()
    optimizer.zero_grad()
    meter = sm.SharpnessMeter(
        model,
        batch,
        measures=("critical", "directional", "trace", "spectral"),
        schedule=sm.Schedule(every=1),
        trace_num_matvecs=32,
        lanczos_max_iter=30,
    )
    return meter.measure(1, optimizer=optimizer)


def test_bf16_model_measures_close_to_float32():
    base = float64_gpt2(n_layer=2)
    batch = token_batch(batch_size=8, seed=3)
    full = measure(copy.deepcopy(base).float(), batch)
    half = measure(copy.deepcopy(base).to(torch.bfloat16), batch)
    assert half["status"] == "ok" and full["status"] == "ok"
    assert half["loss_noise_floor"] == pytest.approx(2**-7 * half["loss"])
    assert half["loss"] == pytest.approx(full["loss"], rel=1e-3)
    assert half["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-2)
    for column, tolerance in TOLERANCES.items():
        assert half[column] == pytest.approx(full[column], rel=tolerance), column
    # Near eta_c the loss changes by less than the bf16 noise floor: a coarser bracket.
    assert half["critical_sharpness"] == pytest.approx(full["critical_sharpness"], rel=0.15)


def train_inside_one_autocast_region(measure: bool) -> tuple[list[dict], list[torch.Tensor]]:
    """Six AdamW steps of a float32 GPT-2 inside one bf16 autocast region, as a loop wrapped
    in ``accelerator.autocast()``, measured after each step (the documented order)."""
    model = float64_gpt2(n_layer=2).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    meter = sm.SharpnessMeter(model, token_batch(4, seed=999), measures=("critical",))
    rows = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for step in range(6):
            model(**token_batch(4, seed=step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if measure:
                rows.append(meter.measure(step, optimizer=optimizer))
    return rows, [p.detach().clone() for p in model.parameters()]


def test_measuring_inside_the_callers_autocast_region_sees_the_moved_parameters():
    """Inside one autocast region torch reuses the bf16 casts it made of each weight. The
    measurement neither reads that cache (its row's loss was the pre-step parameters', its
    line search never saw the loss move) nor leaves its casts in it (training would change)."""
    rows, measured = train_inside_one_autocast_region(measure=True)
    _, reference = train_inside_one_autocast_region(measure=False)
    assert all(torch.equal(a, b) for a, b in zip(measured, reference))
    model = float64_gpt2(n_layer=2).float()
    with torch.no_grad():
        for p, value in zip(model.parameters(), measured):
            p.copy_(value)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = float(model.eval()(**token_batch(4, seed=999)).loss)
    # (the stale casts were 1e-3 off; the measurement runs attention on the math backend)
    assert rows[-1]["loss"] == pytest.approx(fresh, rel=1e-4)
    assert all(row["critical_status"] == "ok" for row in rows)
    # float32 parameters computing in bf16: bf16's epsilon is the loss's noise floor
    assert rows[-1]["loss_noise_floor"] == pytest.approx(2**-7 * rows[-1]["loss"])
