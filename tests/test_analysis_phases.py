"""Three-phase model: fit recovery, detection on noisy oscillating curves, phase means."""

import numpy as np
import pytest

from sharpmeter.paper.analysis import (
    detect_phases,
    fit_three_phase,
    peak_to_plateau_ratio,
    phase_means,
    three_phase_curve,
)

T = np.linspace(0.0, 1.0, 200)
SIZES = [10e6, 125e6, 350e6, 1.3e9, 3e9, 7e9]


def paper_params(n_params):
    """Eqs. (2)-(5) of the paper, written here independently of the simulator."""
    x = np.log10(n_params) - 7.0
    return {
        "s_p": 2.0 + 0.35 * x,
        "s_f": 1.2 - 0.12 * x,
        "t_p": 0.15 - 0.005 * x,
        "lam": 3.0 + 0.2 * x,
    }


def eq1(t, s_p, s_f, t_p, lam):
    """Eq. (1), typed from the paper (not the library's implementation)."""
    return np.array(
        [s_f + (s_p - s_f) * ti / t_p if ti < t_p else
         s_f + (s_p - s_f) * np.exp(-lam * (ti - t_p)) for ti in t]
    )  # fmt: skip


def test_curve_matches_eq1():
    p = paper_params(1.3e9)
    np.testing.assert_allclose(three_phase_curve(T, **p), eq1(T, **p), rtol=0, atol=1e-14)


@pytest.mark.parametrize("n_params", SIZES)
def test_noise_free_fit_recovers_parameters(n_params):
    p = paper_params(n_params)
    fit = fit_three_phase(T, eq1(T, **p))
    assert fit.converged
    for name, true in p.items():
        assert getattr(fit, name) == pytest.approx(true, abs=1e-6), name
    assert fit.peak_to_plateau == pytest.approx(p["s_p"] / p["s_f"], abs=1e-6)
    assert fit.rss < 1e-20


def test_fit_on_unsorted_irregular_times():
    rng = np.random.default_rng(3)
    t = rng.uniform(0, 1, 150)
    p = paper_params(350e6)
    fit = fit_three_phase(t, eq1(t, **p))
    for name, true in p.items():
        assert getattr(fit, name) == pytest.approx(true, abs=1e-6), name


def test_noisy_fit_lies_within_its_own_intervals():
    p = paper_params(7e9)
    rng = np.random.default_rng(42)
    fit = fit_three_phase(T, eq1(T, **p) + 0.025 * rng.standard_normal(T.size))
    for name, true in p.items():
        lo, hi = fit.ci[name]
        assert lo <= true <= hi, (name, true, fit.ci[name])
        assert fit.stderr[name] > 0
    assert fit.residual_std == pytest.approx(0.025, rel=0.15)
    # delta-method interval of the ratio covers the true ratio too
    ratio = p["s_p"] / p["s_f"]
    assert abs(fit.peak_to_plateau - ratio) < 2.5 * fit.peak_to_plateau_se


def test_noisy_fit_intervals_have_nominal_coverage():
    p = paper_params(125e6)
    clean = eq1(T, **p)
    rng = np.random.default_rng(7)
    trials = 60
    hits = dict.fromkeys(p, 0)
    for _ in range(trials):
        fit = fit_three_phase(T, clean + 0.05 * rng.standard_normal(T.size))
        for name, true in p.items():
            lo, hi = fit.ci[name]
            hits[name] += lo <= true <= hi
    for name, count in hits.items():
        assert count / trials >= 0.85, (name, count)


def test_decay_time_and_predict():
    p = paper_params(1e9)
    fit = fit_three_phase(T, eq1(T, **p))
    assert fit.decay_time(0.05) == pytest.approx(p["t_p"] + np.log(20) / p["lam"], abs=1e-6)
    np.testing.assert_allclose(fit.predict(T), eq1(T, **p), atol=1e-9)


def oscillating_noisy(n_params, seed):
    """Eq. (1) plus a damped edge-of-stability oscillation and noise, as the paper describes."""
    x = np.log10(n_params) - 7.0
    rng = np.random.default_rng(seed)
    oscillation = (0.04 + 0.01 * x) * np.sin(2 * np.pi * (7.25 + 1.15 * x) * T)
    oscillation *= np.exp(-(2.3 - 0.45 * x) * T)
    return eq1(T, **paper_params(n_params)) + oscillation + 0.025 * rng.standard_normal(T.size)


@pytest.mark.parametrize("n_params", SIZES)
def test_detect_phases_on_noisy_oscillating_curves(n_params):
    p = paper_params(n_params)
    s = oscillating_noisy(n_params, seed=int(np.log10(n_params) * 10))
    seg = detect_phases(T, s)
    assert abs(seg.peak_time - p["t_p"]) < 0.03
    assert seg.peak_index < seg.plateau_index < seg.n
    # the plateau starts once the smooth decay has mostly run its course
    remaining = np.exp(-p["lam"] * (seg.plateau_time - p["t_p"]))
    assert 0.05 < remaining < 0.35
    assert seg.peak_value == pytest.approx(p["s_p"], abs=0.15)
    rise, decay, plateau = seg.means(s)
    assert plateau < decay < seg.peak_value and plateau < rise < seg.peak_value


def test_detect_phases_without_plateau():
    t = np.linspace(0, 1, 50)
    seg = detect_phases(t, 1 + t)
    assert seg.peak_index == 49
    assert seg.plateau_index == 50
    assert seg.plateau_time == np.inf
    assert np.isnan(seg.means(1 + t)[2])


def test_phase_means_fixed_ranges():
    s = np.concatenate([np.full(40, 2.0), np.full(80, 1.5), np.full(80, 1.0)])
    assert phase_means(s, (40, 120)) == (2.0, 1.5, 1.0)


def test_peak_to_plateau_ratio_from_table1():
    # Table 1: peak and final sharpness at 10M and 7B; the summary quotes 1.61 and 3.09
    assert 2.0644 / 1.2785 == pytest.approx(1.61, abs=0.005)
    curve = np.concatenate([np.linspace(1.5, 2.9976, 30), np.full(20, 0.9804)])
    assert peak_to_plateau_ratio(curve, 0.4) == pytest.approx(3.058, abs=1e-3)


@pytest.mark.parametrize(
    ("t", "s", "message"),
    [
        (T[:5], T[:5], "at least 6"),
        (T, T[:-1], "differ in length"),
        (T, np.where(T > 0.5, np.nan, 1.0), "NaN"),
        (T - 0.5, T, "non-negative"),
        (np.zeros(10), np.arange(10.0), "distinct"),
    ],
)
def test_fit_bad_input(t, s, message):
    with pytest.raises(ValueError, match=message):
        fit_three_phase(t, s)


def test_detect_and_means_bad_input():
    with pytest.raises(ValueError, match="at least 5"):
        detect_phases([0, 1, 2], [1, 2, 1])
    with pytest.raises(ValueError, match="tolerance"):
        detect_phases(T, T, tolerance=1.5)
    with pytest.raises(ValueError, match="boundaries"):
        phase_means(np.ones(10), (6, 3))
    with pytest.raises(ValueError, match="t_p"):
        three_phase_curve(T, 2.0, 1.0, 0.0, 3.0)
