"""A bfloat16 model (as GPUs train them) runs every measure, close to float32's numbers.

Losses are compared in float32, and the vectors of Lanczos and Hutchinson are float32, so only the
model's own bf16 rounding separates the two: about 1% for curvature, and for critical sharpness
what the loss noise floor (bf16 epsilon times the loss) allows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import causal_lm_loss, float64_gpt2, token_batch

import sharpmeter as sm

# Relative differences from float32 seen: ~1e-3 for trace and lambda_max, ~4e-2 for the
# directional sharpness, whose direction comes from a bf16 Adam state.
TOLERANCES = {"hessian_trace": 1e-2, "lambda_max": 1e-2, "directional_sharpness": 0.1}


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
