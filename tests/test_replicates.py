"""Several seeds per model size (issue 16): runs at one size that differ in seed are replicates,
a size's value is the mean over its seeds with their standard error, the scaling fits take every
run and are repeated on the size means, a mix-up (two runs, one seed) is refused by name, and a
study with one run per size gives the numbers it always gave."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from test_analysis_integrity import fit, markdown, runs_table

from sharpmeter.paper.analysis import (
    compare_fits,
    curves_from_records,
    extrapolation_error,
    final_value,
    load_runs,
    regress_final,
    select_runs,
)
from sharpmeter.paper.analysis.prediction import against_last_seen
from sharpmeter.paper.compare import analyse_curves
from sharpmeter.paper.records import write_records
from sharpmeter.paper.report import load_analysis
from sharpmeter.paper.simulator import simulate_run

SIZES = {"a": 1e7, "b": 5e7, "c": 2e8, "d": 1e9}
SEEDS = (0, 1, 2)
MAX_STEPS = 600


def write_run(
    root: Path, name: str, n_params: float, seed: int | None, noise: int, level: float = 1.0
) -> Path:
    """A run as the training callback leaves it: wide rows of a simulated run (its noise drawn
    from ``noise``, its sharpness times ``level``) and metadata with the run's seed, finished."""
    run = simulate_run(n_params, n_checkpoints=60, seed=noise)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "run": name,
            "n_params": n_params,
            "step": 10 * (k + 1),
            "critical_sharpness": level * sharpness,
            "loss": loss,
            "lr": 1e-3,
            "status": "ok",
        }
        for k, (sharpness, loss) in enumerate(zip(run.sharpness, run.loss))
    ]
    path = folder / "sharpness.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    meta = {
        "run": name,
        "n_params": n_params,
        "max_steps": MAX_STEPS,
        "seed": seed,
        "finished": True,
    }
    (folder / "sharpness.meta.json").write_text(json.dumps(meta))
    return path


def write_study(root: Path, seeds=SEEDS, spread: float = 0.0) -> Path:
    """Every size trained with every seed; seed s's sharpness is moved by ``spread * (s - 1)``
    at every size: seeds that disagree by as much everywhere."""
    for i, (name, n) in enumerate(SIZES.items()):
        for seed in seeds:
            level = 1 + spread * (seed - 1)
            write_run(root, f"{name}-s{seed}", n, seed, noise=100 * seed + i, level=level)
    return root


def width(interval: tuple[float, float]) -> float:
    return interval[1] - interval[0]


# ---- replicates -----------------------------------------------------------------------------


def test_runs_at_one_size_that_differ_in_seed_are_replicates(tmp_path):
    _, _, analysis = load_analysis([write_study(tmp_path)])
    assert {n: list(by_seed) for n, by_seed in analysis.replicates.items()} == {
        n: list(SEEDS) for n in SIZES.values()
    }
    for n, by_seed in analysis.replicates.items():
        finals = [final_value(t, s, 0.2) for t, s in by_seed.values()]
        mean = analysis.final_means[n]
        assert mean.n_seeds == 3 and analysis.finals[n] == pytest.approx(np.mean(finals))
        assert mean.stderr == pytest.approx(np.std(finals, ddof=1) / np.sqrt(3))
        assert width(mean.ci) == pytest.approx(2 * stats.t.ppf(0.975, 2) * mean.stderr)
    assert analysis.scaling.log_linear.n == 12 and analysis.scaling_on_means.log_linear.n == 4
    three_phases = analysis.verdicts[0]
    assert three_phases.holds is True and "in 12 of 12 runs" in three_phases.evidence
    with pytest.raises(ValueError, match="several seeds per size"):
        analysis.curves  # noqa: B018  (a property: reading it is the test)


def test_the_fit_on_every_run_carries_the_seed_to_seed_spread(tmp_path):
    # seeds 10% apart around means that follow the law: only the fit on every run sees them
    _, _, analysis = load_analysis([write_study(tmp_path, spread=0.1)])
    every_run, on_means = analysis.scaling.log_linear, analysis.scaling_on_means.log_linear
    assert every_run.slope == pytest.approx(on_means.slope)  # as many seeds everywhere: one line
    assert width(every_run.slope_ci) >= width(on_means.slope_ci)
    assert width(every_run.slope_ci) > 3 * width(on_means.slope_ci)
    falls = analysis.verdicts[1]
    lo, hi = on_means.slope_ci
    assert f"interval [{lo:.3g}, {hi:.3g}]" in falls.evidence
    assert "on the 4 size means over seeds" in falls.evidence
    lo, hi = every_run.slope_ci
    assert falls.evidence.endswith(f"the fit on all 12 runs, not used, gives [{lo:.3g}, {hi:.3g}]")


def test_the_scaling_verdicts_take_one_point_per_size():
    # no law, each size its own level (what no seed averages away), seeds 0.005 about it: the
    # fit on all 12 runs would call the fall significant, the 4 size means cannot
    levels = {1e7: 1.00, 1e8: 0.94, 1e9: 0.98, 1e10: 0.93}
    t = np.linspace(0, 1, 20)
    curves = {
        n: {
            seed: (t, np.full(t.size, level + shift)) for seed, shift in enumerate((-5e-3, 0, 5e-3))
        }
        for n, level in levels.items()
    }
    analysis = analyse_curves(curves)
    every_run, on_means = analysis.scaling.log_linear, analysis.scaling_on_means.log_linear
    assert (
        every_run.slope_ci[1] < 0
    )  # [-0.0307, -0.0033]: decided, on points that are not independent
    assert on_means.slope_ci == pytest.approx((-0.07521, 0.04121), abs=1e-4)
    falls, preferred = analysis.verdicts[1:3]
    assert falls.holds is None and "interval [-0.0752, 0.0412]" in falls.evidence
    t_statistic = abs(on_means.slope) / on_means.slope_se
    assert falls.p_value == pytest.approx(2 * stats.t.sf(t_statistic, 2))  # K - 2 = 2 dof
    assert falls.p_value == pytest.approx(0.3358, abs=1e-3)  # the 12 runs: 0.020
    assert f"AIC on the 4 size means {analysis.scaling_on_means.log_linear.aic:.2f}" in (
        preferred.evidence
    )


def test_the_peak_ratio_is_each_run_s_own_averaged_over_seeds(tmp_path):
    _, _, analysis = load_analysis([write_study(tmp_path, spread=0.1)])
    ratios = [
        np.mean([s.max() / final_value(t, s, 0.2) for t, s in by_seed.values()])
        for by_seed in analysis.replicates.values()
    ]
    peak = analysis.verdicts[3]
    assert "of peak/final (each run's, averaged over seeds) against N" in peak.evidence
    assert f"peak/final from {min(ratios):.3g} to {max(ratios):.3g}" in peak.evidence
    assert "exact p = 0.0833" in peak.evidence  # ranked over the 4 sizes, not the 12 runs


def test_early_prediction_leaves_every_seed_of_a_size_out_together():
    rng = np.random.default_rng(0)
    n = np.repeat([1e7, 1e8, 1e9, 1e10], 3)
    early = rng.uniform(1, 2, n.size)
    finals = 1 + 0.5 * early - 0.1 * np.log10(n) + rng.normal(0, 0.01, n.size)
    regression = regress_final(n, early, finals)
    for i in range(n.size):
        others = n != n[i]
        manual = regress_final(n[others], early[others], finals[others])
        assert regression.loo_predictions[i] == pytest.approx(manual.predict(early[i], n[i])[0])
    t = np.linspace(0, 1, 21)
    curves = {
        size: {seed: (t, np.where(t <= 0.1, 2 + k + seed / 10, 1 + k / 5)) for seed in SEEDS}
        for k, size in enumerate([1e7, 1e8, 1e9, 1e10, 1e11])
    }
    comparison = against_last_seen(curves)
    by_size = comparison.improvement.reshape(5, 3).mean(axis=1)
    assert comparison.size_improvement == pytest.approx(by_size)


def test_extrapolation_holds_out_every_seed_of_the_largest_size():
    n = np.repeat([1e7, 1e8, 1e9, 1e10], 3)
    values = 2 - 0.1 * np.log10(n) + np.tile([-0.01, 0.0, 0.01], 4)
    extrapolation = extrapolation_error(n, values)
    assert extrapolation.n_target.tolist() == [1e10] * 3 and extrapolation.fit.n == 9
    assert extrapolation.predicted == pytest.approx([1.0] * 3)  # the line through the means


# ---- seeds and mix-ups ----------------------------------------------------------------------


def test_two_runs_at_one_size_with_one_seed_are_refused_naming_both_files(tmp_path, capsys):
    root = write_study(tmp_path, seeds=(0,))
    copy = write_run(root, "a-again", SIZES["a"], seed=0, noise=7)
    with pytest.raises(ValueError, match="several runs share a model size") as caught:
        load_analysis([root])
    message = str(caught.value)
    assert "10M: " in message and f"a-s0 ({root / 'a-s0' / 'sharpness.jsonl'}) seed 0" in message
    assert f"a-again ({copy}) seed 0" in message
    files = sorted(str(path) for path in root.glob("*/sharpness.jsonl"))
    assert fit(files) == 2
    assert f"a-again ({copy}) seed 0" in capsys.readouterr().err
    # nor can a run that recorded no seed be told from a seeded one
    write_run(root, "a-again", SIZES["a"], seed=None, noise=7)
    with pytest.raises(ValueError, match=r"a-again \(.+\) no seed"):
        load_analysis([root])


def test_seeds_come_from_the_rows_when_they_carry_them(tmp_path):
    path = tmp_path / "curves.csv"
    rows = [
        {**row, "seed": seed}
        for i, n in enumerate(SIZES.values())
        for seed in SEEDS
        for row in simulate_run(n, n_checkpoints=20, seed=10 * seed + i).to_records()
    ]
    write_records(path, rows)
    runs = load_runs([path])
    assert [(run.name, run.seed) for run in runs[:3]] == [("10M", 0), ("10M", 1), ("10M", 2)]
    replicates = select_runs(runs).replicates(None)
    assert {n: list(by_seed) for n, by_seed in replicates.items()} == {
        n: list(SEEDS) for n in SIZES.values()
    }
    rows[5]["seed"] = "first"
    write_records(path, rows)
    with pytest.raises(ValueError, match=r"curves\.csv:7: the row has a seed that is not an"):
        load_runs([path])
    meta = tmp_path / "curves.meta.json"
    meta.write_text(json.dumps({"seed": 1.5}))
    with pytest.raises(ValueError, match=r"curves\.meta\.json: a seed that is not an integer"):
        load_runs([path])


def test_rows_with_several_seeds_at_a_size_are_not_one_curve():
    rows = [
        {"n_params": 1e7, "step": step, "seed": seed, "critical_sharpness": 1.0}
        for seed in (0, 1)
        for step in (1, 2)
    ]
    with pytest.raises(ValueError, match=r"replicates of seeds \{'10M': \[0, 1\]\}"):
        curves_from_records(rows)


# ---- what the report and `sharpmeter fit` show -----------------------------------------------


def test_the_report_lists_every_run_with_its_seed_and_each_size_over_its_seeds(tmp_path):
    root = write_study(tmp_path, spread=0.1)
    text = markdown(root)
    table = runs_table(text).splitlines()
    assert table[0].endswith("| run | seed | steps | in fits |") and len(table) == 2 + 12
    assert "| `b-s2` | 2 | 600 of 600 | yes |" in runs_table(text)
    _, _, analysis = load_analysis([root])
    mean = analysis.final_means[SIZES["c"]]
    final = f"| 200,000,000 | 3 | {mean.mean:.4g} ± {mean.stderr:.2g} / "
    assert final in text  # the comparison table, beside the simulator
    phases = text.split("## Three-phase fits (eq. 1)\n\n")[1].split("\n\n")[0]
    assert phases.startswith("| parameters | seeds | S_p |")
    assert all(row.endswith("| 3 of 3 |") for row in phases.splitlines()[2:])
    every_run, on_means = analysis.scaling.log_linear, analysis.scaling_on_means.log_linear
    assert f"| log-linear S = a log10 N + b, all 12 runs | {every_run.slope:.4g} |" in text
    lo, hi = on_means.slope_ci
    assert f"| log-linear S = a log10 N + b, 4 size means | {on_means.slope:.4g} | [" in text
    assert f"[{lo:.3g}, {hi:.3g}]" in text
    assert "Seeds per size: 3. A size's value is the mean of its seeds' values" in text


def test_the_fit_command_prints_seeds_and_the_fits_on_the_means(tmp_path, capsys):
    root = write_study(tmp_path, spread=0.1)
    assert fit(sorted(str(path) for path in root.glob("*/sharpness.jsonl"))) == 0
    out = capsys.readouterr().out
    assert f"b-s1 ({root / 'b-s1' / 'sharpness.jsonl'}), seed 1: fitted" in out
    finals = out.split("Final sharpness")[1].split("\n\n")[0].splitlines()
    assert finals[1].split() == ["N", "points", "final", "±", "se", "seeds", "95%", "interval"]
    assert finals[2].split()[:2] == ["10M", "180"] and finals[2].split()[4] == "3"
    assert "on every run's final value: 12 runs of 4 sizes" in out
    assert "actual" in out and "(mean of 3 seeds)" in out  # the largest size held out whole
    assert "The same fits on the 4 size means (over seeds)" in out
    assert out.count("(3 of 3 seeds fitted)") == 4


def test_an_unfinished_seed_is_marked_with_its_seed(tmp_path):
    root = write_study(tmp_path)
    path = root / "b-s1" / "sharpness.jsonl"
    rows = path.read_text().splitlines()[:50]  # stopped at step 500 of 600
    path.write_text("\n".join(rows) + "\n")
    meta = path.with_name("sharpness.meta.json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "finished": False}))
    _, _, analysis = load_analysis([root])
    assert list(analysis.replicates[SIZES["b"]]) == [0, 2]
    _, _, analysis = load_analysis([root], include_unfinished=True)
    assert analysis.unfinished == {SIZES["b"]: "unfinished: step 500 of 600 (seed 1)"}


# ---- one run per size: nothing changes ----------------------------------------------------


def test_one_run_per_size_gives_the_numbers_it_always_gave(tmp_path):
    root = write_study(tmp_path, seeds=(1,))
    seeded = markdown(root)
    for meta in root.glob("*/sharpness.meta.json"):  # as files written before seeds were read
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "seed": None}))
    plain = markdown(root)
    # the same report, but for the seed column of the runs table
    assert "| run | seed | steps |" in runs_table(seeded) and "seed" not in runs_table(plain)
    assert seeded.replace(runs_table(seeded), "") == plain.replace(runs_table(plain), "")
    for replicate_text in ("Seeds per size", "size means", "over seeds", "| seeds |"):
        assert replicate_text not in plain
    _, _, analysis = load_analysis([root])
    finals = {n: final_value(t, s, 0.2) for n, (t, s) in analysis.curves.items()}
    assert analysis.finals == finals
    assert all(
        mean.n_seeds == 1 and np.isnan(mean.stderr) for mean in analysis.final_means.values()
    )
    old = compare_fits(list(finals), list(finals.values()))
    assert analysis.scaling.log_linear.slope_ci == old.log_linear.slope_ci
    assert analysis.scaling.delta_aic == old.delta_aic and analysis.scaling_on_means is None
