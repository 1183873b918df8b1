"""Correlations, the PAC-Bayes bound and early prediction, against the paper's Table 1."""

import numpy as np
import pytest
from scipy import stats

from sharpmeter.paper.analysis import (
    bound_accuracy_correlation,
    early_prediction,
    effective_sample_size,
    pac_bayes_bound,
    pac_bayes_terms,
    pearson,
    regress_final,
    spearman,
    within_run_correlations,
)

# Table 1 of the paper
N = np.array([10e6, 125e6, 350e6, 1.3e9, 3e9, 7e9])
FINAL_S = np.array([1.2785, 1.1669, 1.1217, 1.0646, 1.0135, 0.9804])
LOSS = np.array([5.009, 4.1508, 3.8431, 3.4863, 3.2753, 3.077])
ACC = np.array([0.3616, 0.4532, 0.4843, 0.5344, 0.5674, 0.603])


def test_cross_scale_correlations_match_paper():
    loss = pearson(FINAL_S, LOSS)
    acc = pearson(FINAL_S, ACC)
    assert loss.r == pytest.approx(0.9945, abs=1e-4)
    assert acc.r == pytest.approx(-0.9992, abs=1e-4)
    assert pearson(np.log10(N), FINAL_S).r == pytest.approx(-0.9991, abs=1e-4)
    assert loss.ci[0] < loss.r < loss.ci[1] <= 1.0
    assert acc.ci[1] < 0
    assert acc.p_value == pytest.approx(stats.pearsonr(FINAL_S, ACC).pvalue, rel=1e-6)
    assert acc.n == acc.n_effective == 6


def test_fisher_interval_formula():
    c = pearson(FINAL_S, LOSS, level=0.9)
    half = stats.norm.ppf(0.95) / np.sqrt(6 - 3)
    expected = np.tanh(np.arctanh(c.r) + np.array([-half, half]))
    np.testing.assert_allclose(c.ci, expected, rtol=1e-12)


def test_spearman_on_monotone_data():
    rho = spearman(FINAL_S, ACC)
    assert rho.r == pytest.approx(-1.0)
    assert rho.ci == (-1.0, -1.0)
    assert rho.method == "spearman"


def test_within_run_correlation_accounts_for_autocorrelation():
    t = np.linspace(0, 1, 200)
    rng = np.random.default_rng(0)
    x = np.exp(-3 * t) + 0.05 * rng.standard_normal(t.size)
    y = np.exp(-5 * t) + 0.05 * rng.standard_normal(t.size)
    out = within_run_correlations({"run": x}, {"run": y})
    naive = pearson(x, y)
    assert out["run"].r == pytest.approx(naive.r)
    assert out["run"].n_effective < 100
    assert out["run"].ci[1] - out["run"].ci[0] > naive.ci[1] - naive.ci[0]
    white = rng.standard_normal((2, 400))
    assert effective_sample_size(*white) > 300


def test_pac_bayes_bound_formula():
    m, delta = 1e4, 0.05
    expected = np.sqrt((FINAL_S * np.log(N) + np.log(m / delta)) / m)
    np.testing.assert_allclose(pac_bayes_bound(FINAL_S, N, m, delta), expected, rtol=1e-14)
    terms = pac_bayes_terms(FINAL_S, N, m, delta)
    np.testing.assert_allclose(terms.complexity, FINAL_S * np.log(N))
    assert terms.confidence == pytest.approx(np.log(m / delta))
    assert isinstance(pac_bayes_bound(1.0, 1e9, m), float)


@pytest.mark.parametrize("m", [10, 100, 1000])
def test_bound_accuracy_correlation_near_paper(m):
    # the summary reports r = 0.8825 between the bound and accuracy (m unstated)
    c = bound_accuracy_correlation(FINAL_S, N, ACC, m=m)
    assert c.r == pytest.approx(0.8825, abs=2e-4)


def test_pac_bayes_bad_input():
    with pytest.raises(ValueError, match="delta"):
        pac_bayes_bound(1.0, 1e9, 100, delta=1.5)
    with pytest.raises(ValueError, match="m "):
        pac_bayes_bound(1.0, 1e9, 0)
    with pytest.raises(ValueError, match="non-negative"):
        pac_bayes_bound(-1.0, 1e9, 100)
    with pytest.raises(ValueError, match="differ in length"):
        pac_bayes_bound([1.0, 2.0], [1e9], 100)


def test_correlation_bad_input():
    with pytest.raises(ValueError, match="at least 3"):
        pearson([1, 2], [2, 1])
    with pytest.raises(ValueError, match="constant"):
        pearson([1, 1, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        spearman([1, np.nan, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="differ in length"):
        pearson([1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="different runs"):
        within_run_correlations({"a": [1, 2, 3]}, {"b": [1, 2, 3]})


def synthetic_curves(noise, seed=0):
    """Curves whose final value is an exact linear function of early mean and log10 N."""
    rng = np.random.default_rng(seed)
    x = np.log10(N) - 7
    curves = []
    for xi in x:
        early = 1.5 + 0.2 * xi + 0.1 * np.sin(3 * xi)
        final = 0.4 + 0.5 * early - 0.1 * xi
        curve = np.concatenate([np.full(20, early), np.linspace(early, final, 160), [final] * 20])
        curves.append(curve + noise * rng.standard_normal(curve.size))
    return curves


def test_early_prediction_recovers_exact_relation():
    pred = early_prediction(N, synthetic_curves(noise=0.0))
    b0, b1, b2 = pred.coefficients
    assert b1 == pytest.approx(0.5, abs=1e-9)
    assert b2 == pytest.approx(-0.1, abs=1e-9)
    assert b0 == pytest.approx(0.4 + 0.1 * 7, abs=1e-8)  # log10 N = x + 7
    assert pred.r2 == pytest.approx(1.0)
    assert pred.loo_rmse < 1e-9
    assert pred.predict(1.6, 1e9)[0] == pytest.approx(0.4 + 0.8 - 0.2)


def test_early_prediction_loo_is_honest_under_noise():
    pred = early_prediction(N, synthetic_curves(noise=0.05))
    assert 0.9 < pred.r2 <= 1.0
    in_sample = np.sqrt(pred.rss / pred.n_runs)
    assert pred.loo_rmse > in_sample
    # each leave-one-out prediction comes from a fit without that run
    keep = np.arange(6) != 2
    manual = regress_final(N[keep], pred.early_means[keep], pred.finals[keep])
    assert pred.loo_predictions[2] == pytest.approx(manual.predict(pred.early_means[2], N[2])[0])


def test_early_prediction_bad_input():
    with pytest.raises(ValueError, match="at least 4"):
        regress_final(N[:3], [1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="curves for"):
        early_prediction(N, synthetic_curves(0.0)[:5])
    with pytest.raises(ValueError, match="early_fraction"):
        early_prediction(N, synthetic_curves(0.0), early_fraction=0.0)
    with pytest.raises(ValueError, match="finals"):
        regress_final(N, np.ones(6), np.ones(5))
