"""power_iteration and lanczos against exact eigenvalues (dense matrices and a real GPT-2)."""

from __future__ import annotations

import pytest
import torch
from conftest import causal_lm_loss, matrix_with_spectrum

import sharpmeter as sm
from sharpmeter.measure.estimators.krylov import trace_and_top


def test_lanczos_top_eigenvalues_of_gpt2_hessian(gpt2_reference):
    model, batch, hessian = gpt2_reference
    exact = torch.linalg.eigvalsh(hessian).flip(0)
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    result = sm.lanczos(op, k=3, max_iter=80, tol=1e-10)
    assert result.converged
    assert torch.allclose(result.values, exact[:3], rtol=1e-8, atol=0)
    assert result.num_matvecs == op.num_matvecs == result.iterations
    # The residual it reports is the true one of the returned pair.
    y = result.vector
    true_residual = torch.linalg.vector_norm(hessian @ y - result.value * y) / abs(result.value)
    assert float(true_residual) == pytest.approx(result.residual, abs=1e-9)


def test_lanczos_default_settings_on_gpt2(gpt2_reference):
    """Defaults (k=1, tol=1e-6, at most 30 steps): converged within them, to the dense top
    eigenpair; the residual it reports is the true one."""
    model, batch, hessian = gpt2_reference
    values, vectors = torch.linalg.eigh(hessian)
    top, gap = float(values[-1]), float(values[-1] - values[-2])
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    result = sm.lanczos(op)
    assert result.converged and result.residual <= 1e-6
    assert result.iterations <= 30 and result.num_matvecs == op.num_matvecs == result.iterations
    assert result.values.shape == (1,) and result.vectors.shape == (op.dim, 1)
    # Rayleigh-Ritz: value error <= residual^2 |top| / gap, angle <= residual |top| / gap.
    assert result.value == pytest.approx(top, rel=1e-8)
    y = result.vector
    assert float(torch.linalg.vector_norm(y)) == pytest.approx(1.0, abs=1e-12)
    sine = max(0.0, 1 - float(y @ vectors[:, -1]) ** 2) ** 0.5
    assert sine <= 2 * result.residual * abs(top) / gap
    true_residual = torch.linalg.vector_norm(hessian @ y - result.value * y) / abs(result.value)
    assert float(true_residual) == pytest.approx(result.residual, abs=1e-9)


def test_power_iteration_on_gpt2_within_its_tolerance(gpt2_reference):
    model, batch, hessian = gpt2_reference
    values, vectors = torch.linalg.eigh(hessian)
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    result = sm.power_iteration(op, tol=1e-4, max_iter=1000)
    assert result.converged and result.residual <= 1e-4
    # Rayleigh quotient error is bounded by residual^2 |lambda| / gap; well inside the residual.
    assert abs(result.value - float(values[-1])) <= 1e-4 * abs(float(values[-1]))
    y = result.vector
    true_residual = torch.linalg.vector_norm(hessian @ y - result.value * y) / abs(result.value)
    assert float(true_residual) == pytest.approx(result.residual, rel=1e-6)


@pytest.mark.parametrize("solver", ["power", "lanczos"])
def test_most_positive_eigenvalue_beats_a_larger_negative_one(solver):
    spectrum = torch.linspace(-1.0, 2.0, 40)
    spectrum[0] = -6.0
    a = matrix_with_spectrum(spectrum)
    if solver == "power":
        result = sm.power_iteration(a, tol=1e-8, max_iter=5000)
        assert result.converged
        assert result.value == pytest.approx(2.0, rel=1e-7)
        assert sm.power_iteration(a, which="LM", tol=1e-8, max_iter=5000).value == pytest.approx(
            -6.0, rel=1e-7
        )
    else:
        result = sm.lanczos(a, k=2, tol=1e-10)
        assert result.values[0] == pytest.approx(2.0, rel=1e-8)
        assert result.values[0] > result.values[1]


def test_warm_start_saves_products():
    a = matrix_with_spectrum(torch.cat([torch.tensor([5.0, 4.5]), torch.linspace(0, 4, 60)]))
    cold = sm.power_iteration(a, tol=1e-6, max_iter=2000)
    nearby = a + 1e-3 * matrix_with_spectrum(torch.linspace(-1, 1, 62), seed=1)  # the next step
    warm = sm.power_iteration(nearby, tol=1e-6, max_iter=2000, v0=cold.vector)
    assert warm.num_matvecs < cold.num_matvecs / 3
    cold_lanczos = sm.lanczos(a, tol=1e-8)
    warm_lanczos = sm.lanczos(a, tol=1e-8, v0=cold_lanczos.vector)
    assert warm_lanczos.num_matvecs < cold_lanczos.num_matvecs


def test_lanczos_stops_early_on_an_invariant_subspace():
    a = torch.diag(torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    result = sm.lanczos(a, k=1, v0=torch.tensor([1.0, 1.0, 0, 0, 0], dtype=torch.float64))
    assert result.iterations == 2 and result.converged
    assert result.value == pytest.approx(3.0, rel=1e-12)


def test_lanczos_restarts_when_the_subspace_is_too_small():
    a = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    result = sm.lanczos(a, k=3, v0=torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    assert torch.allclose(
        result.values, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), rtol=1e-10
    )


def test_unconverged_results_say_so():
    a = matrix_with_spectrum(torch.linspace(0, 1, 200))
    assert not sm.power_iteration(a, max_iter=3, tol=1e-10).converged
    result = sm.lanczos(a, k=1, max_iter=5, tol=1e-12)
    assert not result.converged and result.iterations == 5


def test_zero_operator():
    result = sm.power_iteration(torch.zeros(4, 4))
    assert result.value == 0.0 and result.converged


def test_bad_input():
    with pytest.raises(ValueError, match="square"):
        sm.lanczos(torch.ones(3, 4))
    with pytest.raises(ValueError, match="k"):
        sm.lanczos(torch.eye(3), k=0)
    with pytest.raises(ValueError, match="exceeds"):
        sm.lanczos(torch.eye(3), k=4)
    with pytest.raises(ValueError, match="v0"):
        sm.power_iteration(torch.eye(3), v0=torch.ones(4))
    with pytest.raises(ValueError, match="non-zero"):
        sm.power_iteration(torch.eye(3), v0=torch.zeros(3))
    with pytest.raises(ValueError, match="which"):
        sm.power_iteration(torch.eye(3), which="SA")
    with pytest.raises(ValueError, match="tol"):
        sm.lanczos(torch.eye(3), tol=0)


@pytest.mark.parametrize("tol", [1e-3, 1e-8])
def test_power_iteration_la_from_the_negative_eigenvector_finds_the_top(tol):
    """A warm start at the eigenvector of a dominant negative eigenvalue: the shifted pass used
    to start from it, meet tol at once and return -10 as the top (converged)."""
    spectrum = torch.linspace(-9.5, 0.5, 30)
    spectrum[0], spectrum[-1] = -10.0, 1.0
    a = matrix_with_spectrum(spectrum)
    negative = torch.linalg.eigh(a).eigenvectors[:, 0]
    result = sm.power_iteration(a, tol=tol, max_iter=20000, v0=negative)
    assert result.converged
    assert result.value == pytest.approx(1.0, rel=2 * tol)


def test_lanczos_finds_one_copy_of_a_repeated_eigenvalue():
    """The documented limit: single-vector Lanczos sees each distinct eigenvalue once."""
    result = sm.lanczos(torch.diag(torch.tensor([5.0, 5.0, 1.0], dtype=torch.float64)), k=2)
    assert result.values.tolist() == pytest.approx([5.0, 1.0])


@pytest.mark.parametrize(
    "estimate",
    [
        lambda a: sm.power_iteration(a),
        lambda a: sm.lanczos(a),
        lambda a: sm.hutchinson(a, num_matvecs=4),
        lambda a: sm.hutchpp(a, num_matvecs=6),
        lambda a: trace_and_top(a),
    ],
)
def test_an_integer_matrix_is_refused(estimate):
    """Products were cast to the matrix's dtype: unit vectors truncated to 0, and lambda 0
    'converged' for a matrix whose top eigenvalue is 4.73."""
    with pytest.raises(ValueError, match="floating-point"):
        estimate(torch.tensor([[2, 1, 0], [1, 3, 1], [0, 1, 4]]))


@pytest.mark.parametrize(
    "estimate",
    [lambda a: sm.power_iteration(a), lambda a: sm.lanczos(a), lambda a: trace_and_top(a)],
)
def test_a_nonsymmetric_matrix_is_refused_by_the_eigensolvers(estimate):
    """Lanczos reported 5.744 converged (residual from its relation) for [[1, 2], [3, 4]],
    whose eigenvalue is 5.372."""
    with pytest.raises(ValueError, match="symmetric"):
        estimate(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
    # Rounding of a Hessian built column by column is not asymmetry.
    a = matrix_with_spectrum(torch.linspace(1, 4, 8)).float()
    estimate(a + 1e-7 * torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))


def test_hutchinson_takes_a_nonsymmetric_matrix():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    result = sm.hutchinson(a, num_matvecs=64)
    assert abs(result.value - 5.0) <= 4 * result.stderr
