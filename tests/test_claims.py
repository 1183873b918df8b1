"""The verdicts added for issue 16 -- early prediction, the edge of stability, the same story
across measures -- and the multiple-comparisons note, each on curves with a known answer: the
simulator's own curves give the paper's answer, curves built against a claim give "no", too
few sizes leave it undecided."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_report import SIZES, write_runs

from sharpmeter.paper.analysis.inference import holm, sign_interval
from sharpmeter.paper.compare import Verdict, analyse_curves, multiplicity_note
from sharpmeter.paper.report import write_report
from sharpmeter.paper.simulator import PAPER_SCALES, simulate_run

EARLY = "The first 10% of training predicts the final value"
EDGE = "Sharpness settles at the edge of stability"
SAME_STORY = "The same story across measures"
SCALES = tuple(PAPER_SCALES.values())


def simulated(sizes=SCALES, seed: int = 42) -> dict:
    """The paper's runs, one per size, with the seeds of the simulated study."""
    return {n: simulate_run(n, seed=seed + i) for i, n in enumerate(sizes)}


def sharpness(runs: dict) -> dict:
    return {n: (run.t, run.sharpness) for n, run in runs.items()}


def constant_lr(runs: dict, ratio: float) -> dict:
    """A learning rate per run that puts its final sharpness at ``ratio`` times ``2 / lr``."""
    return {
        n: (run.t, np.full(run.t.size, 2 * ratio / run.final_sharpness)) for n, run in runs.items()
    }


def verdict(curves: dict, claim: str, **options) -> Verdict:
    analysis = analyse_curves(curves, final_fraction=0.1, **options)
    return next(v for v in analysis.verdicts if v.claim.startswith(claim))


# ---- early prediction -----------------------------------------------------------------------


def early_and_final(final_of, seed: int = 5) -> dict:
    """Six sizes whose first 10% of training sits at a random level E (unrelated to anything)
    and whose rest sits at ``final_of(E, log10 N)``, 1% noise on every point."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, 200)
    curves = {}
    for n in SCALES:
        early = rng.uniform(1, 5)
        s = np.where(t <= 0.1, early, final_of(early, np.log10(n)))
        curves[n] = (t, s + 0.01 * rng.standard_normal(t.size))
    return curves


def test_early_values_that_add_to_the_size_predict_the_final_value():
    curves = early_and_final(lambda early, decades: 2 + 0.3 * early - 0.1 * decades)
    early = verdict(curves, EARLY)
    assert early.holds is True, early.line()
    assert "smaller error than log10 N alone in 6 of 6 sizes" in early.evidence
    assert early.p_value == pytest.approx(2 / 64)  # six of six, the smallest two-sided p


def test_early_values_are_not_credited_with_what_the_size_predicts():
    # the finals are a law of the size alone: the regression on the early mean and log10 N
    # beats the last value seen in 6 of 6 sizes (RMSE 0.0026 against 1.55), through log10 N
    curves = early_and_final(lambda early, decades: 2 - 0.1 * decades)
    early = verdict(curves, EARLY)
    assert early.holds is None, early.line()
    assert early.evidence.startswith(
        "leave-one-size-out RMSE 0.0026 of the regression on the early mean and log10 N, "
        "against 0.00136 for log10 N alone (1.55 for the last value seen at t <= 0.1"
    )
    assert "smaller error than log10 N alone in 1 of 6 sizes" in early.evidence
    assert early.p_value == pytest.approx(14 / 64)  # 1 of 6: P(<= 1 or >= 5 of 6)


@pytest.mark.parametrize("seed", [42, 0, 7])
def test_the_simulator_s_early_values_add_nothing_certain_to_its_size(seed):
    # eq. (1) makes the early mean and the final value both functions of N: what is left is noise
    early = verdict(sharpness(simulated(seed=seed)), EARLY)
    assert early.holds is None, early.line()
    assert "96.9% sign-test interval of the reduction" in early.evidence


def test_five_sizes_are_too_few_for_a_sign_test_interval():
    early = verdict(sharpness(simulated(SCALES[:5])), EARLY)
    assert early.holds is None
    assert "of 5 sizes, too few for a sign-test interval at 95% (needs 6 sizes)" in early.evidence


def test_three_sizes_are_too_few_for_the_regression():
    early = verdict(sharpness(simulated(SCALES[:3])), EARLY)
    assert early.holds is None and "need at least 4 points, got 3" in early.evidence


def test_a_run_first_measured_after_the_cutoff_is_named():
    curves = sharpness(simulated())
    t, s = curves[1e7]
    curves[1e7] = (t[t > 0.2], s[t > 0.2])
    early = verdict(curves, EARLY)
    assert early.holds is None and "not measured by then: 10M" in early.evidence


def test_four_differences_of_one_sign_decide_nothing():
    # a bootstrap of four positive differences never crosses 0; the sign test knows 1/8 of
    # chance orderings do that
    interval = sign_interval([0.1, 0.2, 0.3, 0.4])
    assert np.isnan(interval.ci).all() and not interval.excludes_zero
    assert interval.p_value == pytest.approx(0.125)


# ---- the edge of stability ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [42, 0, 7])
def test_sharpness_at_two_over_the_learning_rate_is_at_the_edge(seed):
    runs = simulated(seed=seed)
    edge = verdict(sharpness(runs), EDGE, learning_rates=constant_lr(runs, 1.0))
    assert edge.holds is True, edge.line()
    assert len(re.findall(r"\d[MB] [\d.]+ \[", edge.evidence)) == len(runs)  # every run's interval


@pytest.mark.parametrize("ratio", [0.1, 4.0])
def test_sharpness_far_from_two_over_the_learning_rate_is_not(ratio):
    runs = simulated()
    edge = verdict(sharpness(runs), EDGE, learning_rates=constant_lr(runs, ratio))
    assert edge.holds is False, edge.line()


def test_a_run_without_a_learning_rate_leaves_the_edge_undecided():
    runs = simulated()
    rates = constant_lr(runs, 1.0)
    del rates[7e9]
    edge = verdict(sharpness(runs), EDGE, learning_rates=rates)
    assert edge.holds is None and "7B (no lr logged)" in edge.evidence
    rates[7e9] = (runs[7e9].t, np.zeros(runs[7e9].t.size))  # measured without an optimizer
    edge = verdict(sharpness(runs), EDGE, learning_rates=rates)
    assert edge.holds is None and "7B (no positive lr beside S)" in edge.evidence
    assert verdict(sharpness(runs), EDGE).holds is None


# ---- the same story across measures ---------------------------------------------------------


def test_two_measures_of_the_simulated_runs_tell_the_same_story():
    trace = {n: (t, 40 * s) for n, (t, s) in sharpness(simulated(seed=7)).items()}
    same = verdict(sharpness(simulated()), SAME_STORY, other_measures={"hessian_trace": trace})
    assert same.holds is True, same.line()
    assert "agree on three phases, falls, peak grows" in same.evidence
    assert "hessian_trace: three phases yes, falls yes, peak grows yes" in same.evidence


def test_a_measure_that_grows_with_scale_tells_another_story():
    grown = {n: (t, s * np.log10(n) ** 3) for n, (t, s) in sharpness(simulated(seed=7)).items()}
    same = verdict(
        sharpness(simulated()),
        SAME_STORY,
        quantity="critical_sharpness",
        other_measures={"lambda_max": grown},
    )
    assert same.holds is False and "measures disagree on falls" in same.evidence
    assert "critical_sharpness: three phases yes, falls yes" in same.evidence
    assert "lambda_max: three phases yes, falls no" in same.evidence


def test_a_measure_of_fewer_sizes_says_on_how_many_it_answers():
    runs = sharpness(simulated())
    grown = {n: (t, s * np.log10(n) ** 3) for n, (t, s) in sharpness(simulated(seed=7)).items()}
    del grown[min(grown)]  # its final value is missing at the smallest size
    same = verdict(
        runs, SAME_STORY, quantity="critical_sharpness", other_measures={"lambda_max": grown}
    )
    assert f"lambda_max ({len(runs) - 1} of {len(runs)} sizes): three phases yes" in same.evidence
    assert "critical_sharpness: three phases" in same.evidence


def test_one_measure_cannot_agree_with_itself():
    same = verdict(sharpness(simulated()), SAME_STORY)
    assert same.holds is None and "needs a second measure" in same.evidence


def test_measures_that_decide_nothing_leave_it_undecided():
    # two sizes decide no scaling claim, and four points are too few for a three-phase fit
    t = np.array([0.25, 0.5, 0.75, 1.0])
    short = {n: (t, np.array([1.0, 3.0, 2.0, 1.5]) / (1 + k)) for k, n in enumerate([1e7, 1e8])}
    trace = {n: (t, 40 * s) for n, (t, s) in short.items()}
    same = verdict(short, SAME_STORY, other_measures={"hessian_trace": trace})
    assert same.holds is None and "no claim decided by two measures" in same.evidence


# ---- several claims on one study ------------------------------------------------------------


def test_the_note_counts_the_decisions_and_holm_keeps_the_strong_ones():
    runs = simulated()
    losses = {n: (run.t, run.loss) for n, run in runs.items()}
    trace = {n: (t, 40 * s) for n, (t, s) in sharpness(simulated(seed=7)).items()}
    analysis = analyse_curves(
        sharpness(runs),
        final_fraction=0.1,
        losses=losses,
        learning_rates=constant_lr(runs, 1.0),
        other_measures={"hessian_trace": trace},
    )
    # early prediction adds nothing certain to the size on the simulator's curves
    answers = [True] * 5 + [None] + [True] * 2
    assert [v.holds for v in analysis.verdicts] == answers, [v.line() for v in analysis.verdicts]
    note = analysis.multiplicity
    assert note.startswith("7 of 8 verdicts decided on one study; with 8 tests at level 0.05 ")
    # the AIC rule counts at its measured wrong-form rate on 6 sizes, not at 0.05
    assert (
        "(Log-linear law preferred over the power law: a wrong decision in up to 17% of "
        "studies, measured), about 0.52 false decisions are expected by chance alone" in note
    )
    assert "picked the wrong form in up to 17% of simulated studies" in analysis.verdicts[2].line()
    # falls with scale, peak ratio, flatter is better and early prediction carry a p-value
    assert "Holm's correction over the 4 verdicts with a p-value keeps" in note
    assert "; not " not in note


def test_holm_drops_a_decision_that_only_a_single_test_would_make():
    verdicts = [Verdict("A", True, "", 0.001), Verdict("B", True, "", 0.03)]
    verdicts.append(Verdict("C", None, "", 0.5))  # undecided, but one of the tests made
    assert holm([v.p_value for v in verdicts]) == [True, False, False]
    note = multiplicity_note(verdicts)
    assert note.startswith("2 of 3 verdicts decided")
    assert note.endswith(
        "over the 3 verdicts with a p-value keeps A (p = 0.001); not B (p = 0.03)."
    )


def test_without_a_decision_by_p_value_the_note_has_no_holm_sentence():
    t = np.linspace(0, 1, 60)
    rising = {n: (t, 1 + k + 5 * t**2) for k, n in enumerate([1e7, 1e8])}
    note = analyse_curves(rising).multiplicity
    assert note.startswith("1 of 8 verdicts decided") and "Holm" not in note


# ---- the report -----------------------------------------------------------------------------


def test_the_report_shows_the_new_verdicts_and_the_note(tmp_path):
    root = write_runs(tmp_path / "study")
    for name in SIZES:  # a second measure beside the critical sharpness
        path = root / name / "sharpness.jsonl"
        rows = [json.loads(line) for line in path.open()]
        rows = [{**row, "hessian_trace": 40 * row["critical_sharpness"]} for row in rows]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    files = write_report([root], out=tmp_path / "out")
    markdown = files.markdown.read_text()
    # four sizes: the regression runs, a sign-test interval needs six
    assert f"{EARLY} beyond what the model size does: **undecided**" in markdown
    assert "(needs 6 sizes)" in markdown
    # write_runs's learning rate, 1e-3 and decaying, is far below 2 / S for S near 1
    assert f"{EDGE}: S lr / 2 within [0.5, 2]: **no** (S = critical_sharpness;" in markdown
    assert f"{SAME_STORY}: three phases, falls, peak grows agree: **yes**" in markdown
    assert "hessian_trace: three phases yes, falls yes" in markdown
    assert "verdicts decided on one study; with 8 tests at level 0.05" in markdown
    assert "correction over the" in files.html.read_text()  # the apostrophe is escaped there
