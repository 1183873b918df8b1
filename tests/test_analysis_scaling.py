"""Scaling-law fits against the paper's Table 1 (values typed from the paper's text)."""

import numpy as np
import pytest

from sharpmeter.paper.analysis import (
    bootstrap_fit,
    compare_fits,
    extrapolation_error,
    fit_log_linear,
    fit_power_law,
)

# Table 1 of the paper: model size and final sharpness
N = [10e6, 125e6, 350e6, 1.3e9, 3e9, 7e9]
FINAL_S = [1.2785, 1.1669, 1.1217, 1.0646, 1.0135, 0.9804]


def test_log_linear_reproduces_paper_eq7():
    fit = fit_log_linear(N, FINAL_S)
    assert fit.slope == pytest.approx(-0.1055, abs=1e-4)
    assert fit.intercept == pytest.approx(2.0196, abs=1e-4)
    assert fit.r2 == pytest.approx(0.9983, abs=1e-4)
    assert fit.aic == pytest.approx(-61.86, abs=0.01)
    assert fit.n == 6


def test_power_law_r2_and_aic_match_paper():
    fit = fit_power_law(N, FINAL_S)
    assert fit.r2 == pytest.approx(0.9945, abs=1e-4)
    assert fit.aic == pytest.approx(-54.92, abs=0.01)
    assert fit.exponent < 0
    # the power law's own curve, evaluated on the original scale
    residuals = np.array(FINAL_S) - fit.coefficient * np.array(N) ** fit.exponent
    assert fit.rss == pytest.approx(float(residuals @ residuals), rel=1e-12)


def test_compare_fits_picks_log_linear_by_aic():
    comparison = compare_fits(N, FINAL_S)
    assert comparison.best == "log-linear"
    assert comparison.best_fit is comparison.log_linear
    assert comparison.delta_aic == pytest.approx(-54.92 + 61.86, abs=0.02)
    assert comparison.relative_likelihood == pytest.approx(np.exp(-comparison.delta_aic / 2))


def test_bic_and_aicc_follow_their_formulas():
    fit = fit_log_linear(N, FINAL_S)
    n, k = 6, 2
    base = n * np.log(fit.rss / n)
    assert fit.bic == pytest.approx(base + k * np.log(n))
    assert fit.aicc == pytest.approx(fit.aic + 2 * k * (k + 1) / (n - k - 1))


def test_predict_and_intervals():
    fit = fit_log_linear(N, FINAL_S)
    assert fit.predict(1e9) == pytest.approx(-0.1055 * 9 + 2.0196, abs=2e-3)
    assert isinstance(fit.predict(1e9), float)
    assert fit.predict([1e8, 1e9]).shape == (2,)
    lo, hi = fit.slope_ci
    assert lo < fit.slope < hi
    c_lo, c_hi = fit.predict_interval(7e10)
    p_lo, p_hi = fit.predict_interval(7e10, kind="prediction")
    assert p_lo < c_lo < fit.predict(7e10) < c_hi < p_hi
    # a wider level gives a wider band
    w_lo, w_hi = fit.predict_interval(7e10, level=0.99)
    assert w_lo < c_lo and w_hi > c_hi


def test_t_intervals_cover_true_slope_at_nominal_rate():
    rng = np.random.default_rng(0)
    x = np.array(N)
    hits = 0
    trials = 400
    for _ in range(trials):
        y = -0.1 * np.log10(x) + 2.0 + 0.01 * rng.standard_normal(x.size)
        lo, hi = fit_log_linear(x, y).slope_ci
        hits += lo <= -0.1 <= hi
    assert 0.91 <= hits / trials <= 0.99


def test_power_law_recovers_exact_law():
    n = np.geomspace(1e6, 1e10, 5)
    fit = fit_power_law(n, 3.0 * n**-0.05)
    assert fit.exponent == pytest.approx(-0.05, abs=1e-12)
    assert fit.coefficient == pytest.approx(3.0, rel=1e-12)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.aic < -300
    lo, hi = fit.coefficient_ci
    assert lo <= fit.coefficient <= hi


@pytest.mark.parametrize("method", ["residual", "pairs"])
def test_bootstrap_intervals_bracket_the_fit(method):
    fit = fit_log_linear(N, FINAL_S)
    boot = bootstrap_fit(fit, n_resamples=400, seed=1, method=method)
    assert boot.slope_ci[0] < fit.slope < boot.slope_ci[1]
    assert boot.intercept_ci[0] < fit.intercept < boot.intercept_ci[1]
    lo, hi = boot.predict_interval(7e10)
    assert lo < fit.predict(7e10) < hi
    again = bootstrap_fit(fit, n_resamples=400, seed=1, method=method)
    assert again.slope_ci == boot.slope_ci


def test_extrapolation_to_the_largest_scale():
    e = extrapolation_error(N, FINAL_S)
    assert e.n_target.tolist() == [7e9]
    fit = fit_log_linear(N[:-1], FINAL_S[:-1])
    assert e.predicted[0] == pytest.approx(fit.predict(7e9))
    assert e.rel_error[0] == pytest.approx((fit.predict(7e9) - 0.9804) / 0.9804)
    assert e.max_abs_rel_error < 0.01
    assert e.covered.all()
    two = extrapolation_error(N, FINAL_S, form="power-law", n_holdout=2)
    assert two.n_target.tolist() == [3e9, 7e9]


@pytest.mark.parametrize(
    ("n_params", "values", "message"),
    [
        ([1e7, 1e8], [1.0, 0.9], "at least 3"),
        ([1e7, 1e8, 1e9], [1.0, 0.9], "differ in length"),
        ([1e7, 1e8, 1e9], [1.0, np.nan, 0.8], "NaN"),
        ([1e7, -1e8, 1e9], [1.0, 0.9, 0.8], "positive"),
        ([1e7, 0.0, 1e9], [1.0, 0.9, 0.8], "positive"),
        ([1e8, 1e8, 1e8], [1.0, 0.9, 0.8], "distinct"),
        ([[1e7, 1e8, 1e9]], [[1.0, 0.9, 0.8]], "one-dimensional"),
        (["a", "b", "c"], [1.0, 0.9, 0.8], "numbers"),
    ],
)
@pytest.mark.parametrize("fitter", [fit_log_linear, fit_power_law])
def test_bad_input_raises(fitter, n_params, values, message):
    with pytest.raises(ValueError, match=message):
        fitter(n_params, values)


def test_power_law_rejects_non_positive_values():
    with pytest.raises(ValueError, match="positive values"):
        fit_power_law([1e7, 1e8, 1e9], [1.0, 0.0, 0.8])
    fit_log_linear([1e7, 1e8, 1e9], [1.0, 0.0, -0.8])  # fine for the log-linear form


def test_other_bad_arguments():
    fit = fit_log_linear(N, FINAL_S)
    with pytest.raises(ValueError, match="level"):
        fit_log_linear(N, FINAL_S, level=1.5)
    with pytest.raises(ValueError, match="positive"):
        fit.predict(0.0)
    with pytest.raises(ValueError, match="kind"):
        fit.predict_interval(1e9, kind="band")
    with pytest.raises(ValueError, match="method"):
        bootstrap_fit(fit, n_resamples=50, method="wild")
    with pytest.raises(ValueError, match="n_holdout"):
        extrapolation_error(N, FINAL_S, n_holdout=4)
    with pytest.raises(ValueError, match="form"):
        extrapolation_error(N, FINAL_S, form="cubic")
