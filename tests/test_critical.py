"""critical_sharpness on quadratics, where lambda_c = d'Hd / d'g exactly."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Quadratic, causal_lm_loss, quadratic_loss, tiny_gpt2, token_batch

import sharpmeter as sm

K = 4
TOLERANCE = 2.0**-K


def exact_critical(quadratic: Quadratic, d: torch.Tensor) -> float:
    return float(d @ quadratic.hessian @ d / (d @ quadratic.gradient()))


def descent_direction(quadratic: Quadratic, seed: int) -> torch.Tensor:
    d = torch.randn(
        quadratic.theta.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    return d if d @ quadratic.gradient() > 0 else -d


@pytest.mark.parametrize("seed", range(5))
def test_quadratic_lambda_c_is_directional_sharpness(quadratic, seed):
    d = descent_direction(quadratic, seed)
    exact = exact_critical(quadratic, d)
    result = sm.critical_sharpness(quadratic, quadratic_loss, None, d, eta0=0.37, k=K)
    assert result.status == "ok"
    assert result.lo < 2 / exact <= result.hi
    assert 1 - result.lo / result.hi <= TOLERANCE
    assert result.value == pytest.approx(exact, rel=TOLERANCE)
    assert result.slope == pytest.approx(float(d @ quadratic.gradient()), rel=1e-12)


def test_gradient_direction_gives_the_rayleigh_quotient(quadratic):
    g = quadratic.gradient()
    result = sm.critical_sharpness(quadratic, quadratic_loss, None, g, eta0=1.0)
    assert result.value == pytest.approx(float(g @ quadratic.hessian @ g / (g @ g)), rel=TOLERANCE)
    op = sm.HessianOperator(quadratic, quadratic_loss, None)
    assert sm.directional_sharpness(op, g).value == pytest.approx(
        float(g @ quadratic.hessian @ g / (g @ g)), rel=1e-12
    )


@pytest.mark.parametrize("scale", [0.25, 3.0, 100.0])
def test_lambda_c_scales_with_the_direction(quadratic, scale):
    d = descent_direction(quadratic, 0)
    base = sm.critical_sharpness(quadratic, quadratic_loss, None, d, eta0=0.1, k=8)
    scaled = sm.critical_sharpness(quadratic, quadratic_loss, None, scale * d, eta0=0.1, k=8)
    assert scaled.value == pytest.approx(scale * base.value, rel=2 * 2.0**-8)


@pytest.mark.parametrize("factor", [0.55, 0.9, 1.1, 1.9])
def test_forward_count_with_a_good_warm_start(quadratic, factor):
    d = descent_direction(quadratic, 1)
    eta_c = 2 / exact_critical(quadratic, d)
    result = sm.critical_sharpness(quadratic, quadratic_loss, None, d, eta0=factor * eta_c, k=K)
    assert result.num_forward == 1 + 2 + K
    cold = sm.critical_sharpness(quadratic, quadratic_loss, None, d, eta0=1e-6 * eta_c, k=K)
    assert cold.num_forward > result.num_forward
    assert cold.value == pytest.approx(result.value, rel=2 * TOLERANCE)


def test_nondescent_direction_stops_after_one_forward(quadratic):
    result = sm.critical_sharpness(quadratic, quadratic_loss, None, -quadratic.gradient())
    assert result.status == "nondescent" and result.num_forward == 1
    assert math.isnan(result.value)


def test_given_gradient_is_used_for_the_descent_check(quadratic):
    g = quadratic.gradient()
    result = sm.critical_sharpness(quadratic, quadratic_loss, None, g, gradient=-g)
    assert result.status == "nondescent"


def test_no_increase_on_a_linear_loss_is_bounded():
    model = Quadratic(
        torch.zeros(3, 3, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
    )
    result = sm.critical_sharpness(
        model, quadratic_loss, None, -torch.ones(3, dtype=torch.float64), max_forward=20
    )
    assert result.status == "no_increase" and result.num_forward == 20
    assert math.isnan(result.value) and result.lo > 0


def test_negative_curvature_direction_never_raises_the_loss(quadratic):
    model = Quadratic(-quadratic.hessian, quadratic.b, quadratic.theta.detach())
    d = descent_direction(model, 2)
    assert sm.critical_sharpness(model, quadratic_loss, None, d).status == "no_increase"


def test_non_finite_base_loss():
    model = Quadratic(
        torch.eye(2, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
    )
    result = sm.critical_sharpness(
        model, lambda m, b: m(b) * float("nan"), None, torch.ones(2, dtype=torch.float64)
    )
    assert result.status == "nonfinite" and result.num_forward == 1


def test_non_finite_loss_counts_as_an_increase():
    """L = -theta + 0 * sqrt(1 - theta) falls linearly until it turns NaN at theta = 1."""

    class EdgeOfDomain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

        def forward(self, _):
            return (-self.theta + 0 * torch.sqrt(1 - self.theta)).sum()

    direction = -torch.ones(1, dtype=torch.float64)  # theta - eta d = eta
    result = sm.critical_sharpness(EdgeOfDomain(), quadratic_loss, None, direction, eta0=0.3)
    assert result.status == "ok"
    assert result.lo < 1.0 <= result.hi
    assert result.value == pytest.approx(2.0, rel=TOLERANCE)


def test_parameters_restored_bit_identically_and_rng_untouched():
    model = tiny_gpt2(dropout=0.1).train()
    batch = token_batch()
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    result = sm.critical_sharpness(model, causal_lm_loss, batch, op.gradient, eta0=0.1)
    assert result.status == "ok" and math.isfinite(result.value)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert torch.equal(torch.get_rng_state(), rng)
    # Along the gradient the line search sees second order plus the rest: same ballpark.
    directional = sm.directional_sharpness(op, op.gradient).value
    assert 0.25 < result.value / directional < 4


def test_bad_input(quadratic):
    d = descent_direction(quadratic, 0)
    with pytest.raises(ValueError, match="eta0"):
        sm.critical_sharpness(quadratic, quadratic_loss, None, d, eta0=0.0)
    with pytest.raises(ValueError, match="length"):
        sm.critical_sharpness(quadratic, quadratic_loss, None, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        sm.critical_sharpness(quadratic, quadratic_loss, None, d * float("inf"))
    with pytest.raises(ValueError, match="k"):
        sm.critical_sharpness(quadratic, quadratic_loss, None, d, k=0)
    with pytest.raises(ValueError, match="gradient="):
        sm.directional_sharpness(torch.eye(12, dtype=torch.float64), d)


def test_known_loss_and_gradient_save_the_base_forward(quadratic):
    d = descent_direction(quadratic, 1)
    eta_c = 2 / exact_critical(quadratic, d)
    with torch.no_grad():
        loss = float(quadratic_loss(quadratic, None))
    result = sm.critical_sharpness(
        quadratic,
        quadratic_loss,
        None,
        d,
        eta0=1.1 * eta_c,
        k=K,
        gradient=quadratic.gradient(),
        loss=loss,
    )
    assert result.num_forward == 2 + K
    assert result.value == pytest.approx(exact_critical(quadratic, d), rel=TOLERANCE)
