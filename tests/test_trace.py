"""hutchinson and hutchpp: the exact trace lies within the reported error, which shrinks."""

from __future__ import annotations

import pytest
import torch
from conftest import causal_lm_loss

import sharpmeter as sm


@pytest.mark.parametrize(("estimator", "budget"), [(sm.hutchinson, 60), (sm.hutchpp, 60)])
def test_gpt2_trace_within_four_stderr(gpt2_reference, estimator, budget):
    model, batch, hessian = gpt2_reference
    exact = float(hessian.trace())
    result = estimator(sm.HessianOperator(model, causal_lm_loss, batch), budget, seed=0)
    assert result.num_matvecs == budget
    assert result.stderr > 0
    assert abs(result.value - exact) <= 4 * result.stderr


@pytest.mark.parametrize("estimator", [sm.hutchinson, sm.hutchpp])
def test_error_shrinks_with_budget(gpt2_reference, estimator):
    _, _, hessian = gpt2_reference
    exact = float(hessian.trace())

    def rms_error(budget: int) -> float:
        errors = [estimator(hessian, budget, seed=s).value - exact for s in range(20)]
        return float(torch.tensor(errors).pow(2).mean().sqrt())

    assert rms_error(96) < 0.6 * rms_error(12)


def test_hutchpp_beats_hutchinson_on_a_low_rank_dominated_spectrum():
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=generator, dtype=torch.float64))
    spectrum = torch.cat(
        [torch.full((10,), 100.0), torch.rand(290, generator=generator, dtype=torch.float64)]
    )
    a = q @ torch.diag(spectrum) @ q.T
    plain = sm.hutchinson(a, 60, seed=1)
    deflated = sm.hutchpp(a, 60, seed=1)
    assert deflated.stderr < plain.stderr / 5
    assert abs(deflated.value - float(spectrum.sum())) <= 4 * deflated.stderr


def test_reported_stderr_is_honest_over_many_seeds():
    """The standardised errors of many runs look like N(0, 1): coverage of +-2 stderr ~ 95%."""
    a = torch.diag(torch.linspace(-1, 3, 50, dtype=torch.float64)) + 0.1
    exact = float(a.trace())
    z = torch.tensor(
        [(r.value - exact) / r.stderr for r in (sm.hutchinson(a, 30, seed=s) for s in range(200))]
    )
    coverage = float((z.abs() <= 2).double().mean())
    assert 0.88 <= coverage <= 0.99


def test_same_seed_same_estimate_and_global_rng_untouched():
    state = torch.get_rng_state()
    a = torch.eye(10, dtype=torch.float64)
    assert sm.hutchinson(a, 8, seed=3).value == sm.hutchinson(a, 8, seed=3).value
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_input():
    with pytest.raises(ValueError, match="num_matvecs"):
        sm.hutchinson(torch.eye(3), num_matvecs=1)
    with pytest.raises(ValueError, match="num_matvecs"):
        sm.hutchpp(torch.eye(3), num_matvecs=3)
    with pytest.raises(ValueError, match="square"):
        sm.hutchinson(torch.ones(2, 3))
