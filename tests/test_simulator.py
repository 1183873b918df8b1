"""Tests of sharpmeter.paper.simulator: the paper's tables, the stated equations, options and
errors."""

from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
import pytest

import sharpmeter.paper.records
import sharpmeter.paper.simulator
from sharpmeter.paper.records import read_records
from sharpmeter.paper.simulator import (
    PAPER,
    PAPER_SCALES,
    format_size,
    model,
    parse_size,
    simulate_run,
    simulate_study,
)
from sharpmeter.paper.simulator import cli as simulator_cli

# The paper's numbers, typed from its text (shared/seeds/001_807f2370f7b47ade.txt).
SCALE_NAMES = ["10M", "125M", "350M", "1.3B", "3B", "7B"]
TABLE1 = {  # peak S, final S, loss, mean accuracy
    "10M": (2.0644, 1.2785, 5.009, 0.3616),
    "125M": (2.4108, 1.1669, 4.1508, 0.4532),
    "350M": (2.5996, 1.1217, 3.8431, 0.4843),
    "1.3B": (2.7585, 1.0646, 3.4863, 0.5344),
    "3B": (2.8945, 1.0135, 3.2753, 0.5674),
    "7B": (2.9976, 0.9804, 3.077, 0.603),
}
TABLE2 = {  # HellaSwag, ARC-Easy, PIQA, WinoGrande, LAMBADA
    "10M": (0.3658, 0.387, 0.4318, 0.3266, 0.2966),
    "125M": (0.4474, 0.477, 0.5057, 0.441, 0.3951),
    "350M": (0.4743, 0.5041, 0.5521, 0.4598, 0.4312),
    "1.3B": (0.548, 0.5612, 0.5921, 0.5121, 0.4586),
    "3B": (0.558, 0.6098, 0.631, 0.5317, 0.5064),
    "7B": (0.6144, 0.6286, 0.6508, 0.578, 0.5432),
}
TABLE3 = {
    "10M": (1.6862, 1.5989, 1.3202),
    "125M": (1.8694, 1.6828, 1.2426),
    "350M": (1.9433, 1.7149, 1.2006),
    "1.3B": (2.0468, 1.7373, 1.1447),
    "3B": (2.1125, 1.7603, 1.1155),
    "7B": (2.1803, 1.7713, 1.0747),
}
WITHIN_RUN = {  # Section 3.3: r(sharpness, loss), r(sharpness, gradient norm)
    "10M": (0.4445, 0.9218),
    "7B": (0.5335, 0.9849),
}


@pytest.fixture(scope="module")
def paper_study():
    return simulate_study()


@pytest.fixture(scope="module")
def paper_rows(paper_study):
    return {row.name: row for row in paper_study.rows}


# --- the paper preset reproduces the published tables ------------------------------------------


def test_paper_scales_are_the_six_of_the_paper():
    assert list(PAPER_SCALES) == SCALE_NAMES
    assert list(PAPER_SCALES.values()) == [1e7, 1.25e8, 3.5e8, 1.3e9, 3e9, 7e9]
    assert PAPER.n_checkpoints == 200 and PAPER.seed == 42


def test_table1_matches_the_paper(paper_rows):
    for name, (peak, final, loss, acc) in TABLE1.items():
        row = paper_rows[name]
        assert row.final_loss == pytest.approx(loss, abs=2e-4), name
        assert row.mean_accuracy == pytest.approx(acc, abs=2e-4), name
        assert row.final_sharpness == pytest.approx(final, abs=0.003), name
        assert row.peak_sharpness == pytest.approx(peak, abs=0.005), name


def test_all_30_cells_of_table2_match_the_paper(paper_rows):
    cells = 0
    for name, accuracies in TABLE2.items():
        got = list(paper_rows[name].accuracy.values())
        np.testing.assert_allclose(got, accuracies, rtol=0, atol=2e-4, err_msg=name)
        cells += len(got)
    assert cells == 30


def test_table3_phase_means_match_the_paper(paper_rows):
    for name, phases in TABLE3.items():
        np.testing.assert_allclose(paper_rows[name].phase_means, phases, rtol=0, atol=0.002)


def test_within_run_correlations_match_section_3_3(paper_rows):
    for name, (r_loss, r_grad) in WITHIN_RUN.items():
        assert paper_rows[name].corr_sharpness_loss == pytest.approx(r_loss, abs=0.002)
        assert paper_rows[name].corr_sharpness_grad == pytest.approx(r_grad, abs=0.002)


def test_tables_print_like_the_paper(paper_study):
    text = str(paper_study)
    for title in ("Table 1:", "Table 2:", "Table 3:"):
        assert title in text
    assert "| Model | Hella. | ARC-E | PIQA | Wino. | LAMB. |" in text
    assert "| 7B | 2.1803 | 1.7718 | 1.0745 |" in paper_study.table3()
    assert len(paper_study.table1().splitlines()) == 4 + 6


def test_columns_are_numpy_arrays_per_row(paper_study):
    cols = paper_study.columns()
    assert list(cols["name"]) == SCALE_NAMES
    np.testing.assert_array_equal(cols["n_params"], list(PAPER_SCALES.values()))
    assert cols["final_sharpness"][0] == paper_study.rows[0].final_sharpness
    assert cols["accuracy_LAMBADA"].shape == (6,)


# --- with noise off the curves are eqs. (1)-(6) ------------------------------------------------


def eq1(t, n):
    """Eq. (1)-(5), written out again independently of the package."""
    x = math.log10(n) - 7.0
    s_p, s_f, t_p, lam = 2.0 + 0.35 * x, 1.2 - 0.12 * x, 0.15 - 0.005 * x, 3.0 + 0.2 * x
    return np.array(
        [
            s_f + (s_p - s_f) * ti / t_p
            if ti < t_p
            else s_f + (s_p - s_f) * math.exp(-lam * (ti - t_p))
            for ti in t
        ]
    )


def eq6(t, n):
    x = math.log10(n) - 7.0
    l_f = 3.5 * (n / 1e9) ** -0.076
    l_0 = 10.0 - 0.1 * x  # recovered, not stated
    return np.array([l_f + (l_0 - l_f) * math.exp(-5.0 * ti) for ti in t])


def oscillation(t, n):
    x = math.log10(n) - 7.0
    a, f, d = 0.04 + 0.01 * x, 7.25 + 1.15 * x, 2.3 - 0.45 * x
    return np.array([a * math.sin(2 * math.pi * f * ti) * math.exp(-d * ti) for ti in t])


@pytest.mark.parametrize("n", [1e7, 3.5e8, 7e9, 7e10])
@pytest.mark.parametrize("n_checkpoints", [200, 37])
def test_noise_free_curves_are_the_stated_equations(n, n_checkpoints):
    r = simulate_run(n, n_checkpoints=n_checkpoints, noise=False, oscillation=False)
    t = np.linspace(0, 1, n_checkpoints)
    np.testing.assert_array_equal(r.t, t)
    np.testing.assert_allclose(r.sharpness, eq1(t, n), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(r.sharpness, r.sharpness_trend)
    np.testing.assert_allclose(r.loss, eq6(t, n), rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.grad_norm, 1.5 * eq1(t, n) + 0.8 * np.exp(-4 * t), atol=1e-12)
    np.testing.assert_array_equal(r.oscillation, 0.0)


def test_noise_free_with_oscillation_adds_the_damped_sine():
    n = 1.3e9
    r = simulate_run(n, noise=False)
    t = np.linspace(0, 1, 200)
    np.testing.assert_allclose(r.oscillation, oscillation(t, n), rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.sharpness, eq1(t, n) + oscillation(t, n), rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.loss, eq6(t, n), rtol=0, atol=1e-12)


def test_scale_parameters_are_eqs_2_to_5():
    assert model.peak_sharpness(1e9) == pytest.approx(2.7)
    assert model.plateau_sharpness(1e9) == pytest.approx(0.96)
    assert model.peak_time(1e9) == pytest.approx(0.14)
    assert model.decay_rate(1e9) == pytest.approx(3.4)
    assert model.loss_floor(1e10) == pytest.approx(3.5 * 10**-0.076)
    # eq. (1) is continuous at the peak, where it reaches S_p
    t_p = model.peak_time(1e9)
    assert float(model.sharpness_trend(t_p, 1e9)) == pytest.approx(2.7)
    assert float(model.sharpness_trend(t_p - 1e-12, 1e9)) == pytest.approx(2.7)


def test_noise_components_are_what_remains():
    r = simulate_run(3e9)
    t = r.t
    np.testing.assert_allclose(r.sharpness_trend, eq1(t, 3e9), atol=1e-12)
    residual = r.sharpness - r.sharpness_trend - r.oscillation
    assert 0.015 < residual.std() < 0.035  # the recovered 0.025 noise
    assert 0.003 < (r.loss - r.loss_trend).std() < 0.007
    # G = 1.5 S + 0.8 exp(-4t) + 0.04 z (SIMULATOR.md): on these 200 draws the spread of z is
    # 1.015, so 0.035 or 0.045 lands outside (the correlation tests cannot tell them apart)
    grad_residual = r.grad_norm - 1.5 * r.sharpness - 0.8 * np.exp(-4 * t)
    assert grad_residual.std() == pytest.approx(0.04 * 1.015, abs=0.001)


# --- seeds, options, qualitative claims --------------------------------------------------------


def test_a_run_with_the_default_seed_is_the_first_scale_of_the_study(paper_study):
    first = simulate_run(1e7)
    np.testing.assert_array_equal(first.sharpness, paper_study.runs[0].sharpness)
    assert first.accuracy == paper_study.runs[0].accuracy
    assert simulate_run(1e7, seed=1).sharpness[5] != first.sharpness[5]


def test_study_is_reproducible_and_noise_free_study_ignores_the_seed():
    a, b = simulate_study(seed=3), simulate_study(seed=3)
    np.testing.assert_array_equal(a.runs[2].grad_norm, b.runs[2].grad_norm)
    c, d = simulate_study(seed=1, noise=False), simulate_study(seed=2, noise=False)
    assert c.rows == d.rows


def test_other_scales_and_checkpoints():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 70B is inside the model's range
        s = simulate_study(["10M", 7e10], n_checkpoints=50)
    assert [r.name for r in s.rows] == ["10M", "70B"]
    assert s.runs[1].sharpness.shape == (50,)
    assert s.rows[1].final_sharpness < s.rows[0].final_sharpness
    assert s.rows[1].peak_sharpness > s.rows[0].peak_sharpness


def test_statistics_windows_scale_with_the_number_of_checkpoints():
    assert PAPER.final_count(200) == 20 and PAPER.final_count(10) == 1
    assert PAPER.phase_slices(200) == (slice(0, 40), slice(40, 120), slice(120, 200))
    r = simulate_run(1e8, n_checkpoints=10)
    assert r.final_sharpness == r.sharpness[-1]
    assert r.phase_means[0] == pytest.approx(r.sharpness[:2].mean())


def test_extrapolating_far_outside_the_paper_range_warns():
    with pytest.warns(RuntimeWarning, match="no rise"):
        simulate_run(1e5)
    with pytest.warns(RuntimeWarning, match="oscillation grows"):
        simulate_run(1e13)


def test_qualitative_claims_hold_over_many_seeds():
    r_grad_ends = []
    for seed in range(100):
        cols = simulate_study(seed=seed).columns()
        assert np.all(np.diff(cols["peak_sharpness"]) > 0), seed
        assert np.all(np.diff(cols["final_sharpness"]) < 0), seed
        assert np.all(np.diff(cols["final_loss"]) < 0), seed
        assert np.all(np.diff(cols["mean_accuracy"]) > 0), seed
        assert np.all(cols["phase1"] > cols["phase2"]), seed
        assert np.all(cols["phase2"] > cols["phase3"]), seed
        assert np.all(np.diff(cols["phase1"] - cols["phase3"]) > 0), seed
        r_grad_ends.append(cols["corr_sharpness_grad"][[0, -1]])
    r_grad_ends = np.array(r_grad_ends)
    assert np.all(r_grad_ends[:, 1] > r_grad_ends[:, 0])  # coupling stronger at 7B than at 10M


# --- records -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_curves_round_trip_through_record_files(tmp_path, suffix):
    s = simulate_study(["10M", "1.3B"], n_checkpoints=12)
    rows = s.to_records()
    assert len(rows) == 2 * 12 * 3
    assert rows[0] == {
        "source": "simulated",
        "n_params": 10_000_000,
        "step": 0,
        "fraction": 0.0,
        "quantity": "sharpness",
        "value": float(s.runs[0].sharpness[0]),
    }
    path = tmp_path / f"curves{suffix}"
    sharpmeter.paper.records.write_records(path, rows)
    assert read_records(path) == rows
    grad = [
        r["value"] for r in rows if r["n_params"] == 1_300_000_000 and r["quantity"] == "grad_norm"
    ]
    np.testing.assert_array_equal(grad, s.runs[1].grad_norm)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1e9, float("nan"), float("inf"), "7B", True, None])
def test_bad_model_size_is_a_clear_error(n):
    with pytest.raises(ValueError, match="n_params"):
        simulate_run(n)


@pytest.mark.parametrize("k", [9, 0, -5, 20.0, True])
def test_too_few_checkpoints_is_a_clear_error(k):
    with pytest.raises(ValueError, match="n_checkpoints must be an integer >= 10"):
        simulate_run(1e9, n_checkpoints=k)
    with pytest.raises(ValueError, match="n_checkpoints"):
        simulate_study(n_checkpoints=k)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'chinchilla'; known presets: paper"):
        simulate_run(1e9, preset="chinchilla")
    with pytest.raises(ValueError, match="unknown preset"):
        simulate_study(preset="Paper")


@pytest.mark.parametrize(
    "scales, message",
    [([], "at least one"), (["1B", 1e9], "distinct"), ("7B", "not one string"), (["7Q"], "7Q")],
)
def test_bad_scales_are_a_clear_error(scales, message):
    with pytest.raises(ValueError, match=message):
        simulate_study(scales)


def test_sizes_parse_and_format():
    assert [parse_size(s) for s in ("10M", "125m", "1.3B", "70B", "2T", "350K", "1e9")] == [
        1e7,
        1.25e8,
        1.3e9,
        7e10,
        2e12,
        3.5e5,
        1e9,
    ]
    assert [format_size(n) for n in PAPER_SCALES.values()] == SCALE_NAMES
    for bad in ("", "B", "-1B", "0M", "1.3X", "1,3B"):
        with pytest.raises(ValueError):
            parse_size(bad)


# --- command line ------------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser(prog="sharpmeter")
    simulator_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["simulate", *argv])


def test_cli_writes_curves_tables_and_figure(tmp_path, capsys):
    out = tmp_path / "sim"
    args = _parse(
        ["--scales", "10M,125M,70B", "--checkpoints", "20", "--seed", "7", "--out", str(out)]
        + ["--format", "csv", "--no-oscillation", "--plot"]
    )
    assert args.handler(args) == 0
    rows = read_records(out / "curves.csv")
    assert len(rows) == 3 * 20 * 3
    assert {r["n_params"] for r in rows} == {10_000_000, 125_000_000, 70_000_000_000}
    expected = simulate_study(["10M", "125M", "70B"], n_checkpoints=20, seed=7, oscillation=False)
    assert rows == expected.to_records()
    assert (out / "tables.md").read_text() == expected.to_markdown()
    assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 70B |" in capsys.readouterr().out


def test_cli_defaults_reproduce_the_paper(tmp_path):
    args = _parse(["--out", str(tmp_path), "--no-noise"])
    assert args.handler(args) == 0
    rows = read_records(tmp_path / "curves.jsonl")
    assert len(rows) == 6 * 200 * 3
    assert "Table 3" in (tmp_path / "tables.md").read_text()
    assert not (tmp_path / "figure1.png").exists()


def test_cli_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parse(["--scales", "10M,huge"])
    assert "cannot read model size 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--preset", "nope"])
    args = _parse(["--checkpoints", "5", "--out", str(tmp_path / "x")])
    assert args.handler(args) == 2
    assert "n_checkpoints must be an integer >= 10" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
