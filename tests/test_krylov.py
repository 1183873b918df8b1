"""trace_and_top: the top eigenpair and the trace from one Krylov basis, against exact answers."""

from __future__ import annotations

import pytest
import torch
from conftest import causal_lm_loss, matrix_with_spectrum

import sharpmeter as sm
from sharpmeter.measure.estimators import trace_and_top
from sharpmeter.measure.estimators._operator import CountingOperator
from sharpmeter.measure.estimators.eigen import _Lanczos
from sharpmeter.measure.estimators.krylov import PROBE_STREAM, _DeflatedProbes
from sharpmeter.measure.estimators.trace import _rademacher

N = 200
# A few dominant eigenvalues over a flat bulk (a typical Hessian), with a negative tail.
OUTLIERS = torch.cat(
    [torch.tensor([50.0, 40.0, 30.0, 20.0, 10.0]), torch.linspace(-0.5, 1.5, N - 5)]
)
FLAT = torch.linspace(0.5, 1.5, N)
# One far outlier, which Lanczos resolves in a few steps, above twenty which it has not yet.
MANY = torch.cat(
    [torch.tensor([100.0]), torch.linspace(10, 30, 20), torch.linspace(-0.5, 1.5, N - 21)]
)


def z_scores(a: torch.Tensor, seeds: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Errors and standardised errors of the trace over ``seeds`` runs."""
    exact = float(a.trace())
    results = [trace_and_top(a, seed=s, **kwargs) for s in range(seeds)]
    errors = torch.tensor([r.trace.value - exact for r in results])
    return errors, errors / torch.tensor([r.trace.stderr for r in results])


@pytest.mark.parametrize("spectrum", [OUTLIERS, FLAT], ids=["outliers", "flat"])
def test_trace_unbiased_and_stderr_honest(spectrum):
    a = matrix_with_spectrum(spectrum)
    errors, z = z_scores(a, 300, num_matvecs=30, lanczos_tol=1e-3)
    # Unbiased: the mean error is within 4 of its own standard errors of zero.
    assert abs(float(errors.mean())) <= 4 * float(errors.std()) / len(errors) ** 0.5
    # Honest: the standardised errors spread like a t with 29 degrees of freedom (sd 1.04).
    assert 0.85 <= float(z.std()) <= 1.2
    assert 0.9 <= float((z.abs() <= 2).double().mean()) <= 0.99


def test_target_mode_unbiased_and_grows_the_basis_only_when_it_pays():
    a = matrix_with_spectrum(MANY)
    options = {"rel_stderr": 0.02, "lanczos_tol": 1e-3, "lanczos_max_iter": 40}
    errors, z = z_scores(a, 300, **options)
    assert abs(float(errors.mean())) <= 4 * float(errors.std()) / len(errors) ** 0.5
    assert 0.8 <= float(z.std()) <= 1.4
    grown = trace_and_top(a, **options)
    alone = sm.lanczos(a, tol=1e-3, max_iter=40)
    assert grown.rank > alone.iterations + 5  # the other outliers are worth deflating
    plain = sm.hutchinson(a, grown.num_matvecs)
    assert grown.trace.stderr < plain.stderr / 2
    # A flat spectrum needs no deflation: Lanczos stops where it converges.
    flat = matrix_with_spectrum(FLAT)
    kept = trace_and_top(flat, rel_stderr=0.05, lanczos_tol=1e-2, lanczos_max_iter=40)
    assert kept.rank == sm.lanczos(flat, tol=1e-2, max_iter=40).iterations
    assert kept.trace.num_matvecs == 8


def test_top_eigenpair_matches_exact_and_is_lanczos_own():
    a = matrix_with_spectrum(OUTLIERS)
    r = trace_and_top(a, lanczos_tol=1e-10, lanczos_max_iter=60, num_matvecs=4)
    assert r.top.converged
    assert r.top.value == pytest.approx(50.0, rel=1e-10)
    y = r.top.vector
    true_residual = torch.linalg.vector_norm(a @ y - r.top.value * y) / r.top.value
    assert float(true_residual) == pytest.approx(r.top.residual, abs=1e-9)
    # With no extra steps the top pair is lanczos's, bit for bit, at the same cost.
    for v0 in (None, torch.ones(N, dtype=torch.float64)):
        shared = trace_and_top(a, lanczos_tol=1e-3, seed=3, v0=v0)
        alone = sm.lanczos(a, k=1, max_iter=30, tol=1e-3, seed=3, v0=v0)
        assert torch.equal(shared.top.values, alone.values)
        assert torch.equal(shared.top.vectors, alone.vectors)
        assert shared.top.num_matvecs == alone.num_matvecs == shared.rank
        assert (
            shared.num_matvecs
            == alone.num_matvecs + shared.trace.num_matvecs
            == alone.num_matvecs + 8
        )


def test_gpt2_both_match_the_dense_reference(gpt2_reference):
    model, batch, hessian = gpt2_reference
    spectrum = torch.linalg.eigvalsh(hessian)
    exact_top, exact_trace = float(spectrum[-1]), float(spectrum.sum())
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    r = trace_and_top(op, lanczos_tol=1e-8, lanczos_max_iter=80, num_matvecs=40, min_rank=30)
    assert r.num_matvecs == op.num_matvecs == r.rank + 40
    assert r.top.converged
    # Ritz value error <= residual^2 |lambda| / gap, well inside the residual.
    assert abs(r.top.value - exact_top) <= r.top.residual * abs(exact_top)
    assert abs(r.trace.value - exact_trace) <= 4 * r.trace.stderr
    assert 0 < r.trace.stderr < abs(exact_trace)
    target = trace_and_top(op, rel_stderr=0.2, seed=1)  # the trace nearly cancels: -37.5
    assert abs(target.trace.value - exact_trace) <= 4 * target.trace.stderr


def test_deflation_beats_plain_hutchinson_at_equal_hvps():
    a = matrix_with_spectrum(OUTLIERS)
    exact = float(a.trace())
    shared = [trace_and_top(a, min_rank=10, num_matvecs=20, seed=s) for s in range(20)]
    budget = shared[0].num_matvecs
    assert all(r.num_matvecs == budget for r in shared)
    plain = [sm.hutchinson(a, budget, seed=s) for s in range(20)]

    def rms(results) -> float:
        errors = torch.tensor([r.trace.value if hasattr(r, "trace") else r.value for r in results])
        return float((errors - exact).pow(2).mean().sqrt())

    assert rms(shared) < rms(plain) / 3
    assert max(r.trace.stderr for r in shared) < min(p.stderr for p in plain) / 3


def test_pilot_deflated_along_equals_projecting_on_the_final_basis():
    a = matrix_with_spectrum(OUTLIERS)
    op = CountingOperator(a)
    krylov = _Lanczos(op, 20, None, 0)
    krylov.run(1, 1e-2)
    start = krylov.size
    probes = _DeflatedProbes(op, krylov, seed=5)
    probes.draw(6, keep=True)
    for _ in range(5):
        krylov.step()
        probes.deflate(krylov)
    assert krylov.size == start + 5
    basis = krylov.basis[: krylov.size]
    generator = torch.Generator().manual_seed(5 + PROBE_STREAM)
    for sample in probes.samples:
        z = _rademacher(op, 1, generator)[:, 0]
        z = z - basis.T @ (basis @ z)
        assert sample == pytest.approx(float(z @ a @ z), rel=1e-10, abs=1e-10)


def test_fewer_probes_are_a_prefix_of_more():
    a = matrix_with_spectrum(OUTLIERS)
    few = trace_and_top(a, num_matvecs=5, seed=2)
    many = trace_and_top(a, num_matvecs=12, seed=2)
    assert torch.equal(few.trace.samples, many.trace.samples[:5])


def test_exact_when_the_basis_spans_the_space():
    a = matrix_with_spectrum(torch.tensor([4.0, 3.0, 2.0, 1.0, -1.0, 0.5]))
    r = trace_and_top(a, lanczos_tol=1e-12, min_rank=6, lanczos_max_iter=6)
    assert r.rank == 6 and r.trace.num_matvecs == 0 and r.trace.stderr == 0
    assert r.trace.value == pytest.approx(9.5, rel=1e-12)
    assert r.num_matvecs == 6


def test_same_seed_same_result_and_global_rng_untouched():
    state = torch.get_rng_state()
    a = matrix_with_spectrum(OUTLIERS)
    first, second = trace_and_top(a, seed=4), trace_and_top(a, seed=4)
    assert first.trace.value == second.trace.value and first.top.value == second.top.value
    assert trace_and_top(a, seed=5).trace.value != first.trace.value
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_input():
    a = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_matvecs"):
        trace_and_top(a, num_matvecs=1)
    with pytest.raises(ValueError, match="max_matvecs"):
        trace_and_top(a, num_matvecs=8, max_matvecs=4)
    with pytest.raises(ValueError, match="rel_stderr"):
        trace_and_top(a, rel_stderr=0.0)
    with pytest.raises(ValueError, match="lanczos_tol"):
        trace_and_top(a, lanczos_tol=0.0)
    with pytest.raises(ValueError, match="min_rank"):
        trace_and_top(a, min_rank=0)
    with pytest.raises(ValueError, match="square"):
        trace_and_top(torch.ones(2, 3))


def test_target_on_a_zero_trace_spends_the_most_probes_and_stops():
    a = torch.diag(torch.tensor([1.0, -1.0] * 50, dtype=torch.float64))
    r = trace_and_top(a, rel_stderr=0.02, max_matvecs=50, lanczos_max_iter=10)
    assert r.rank == 10 and r.trace.num_matvecs == 50
    assert abs(r.trace.value) <= 4 * r.trace.stderr
