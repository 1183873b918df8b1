"""The report: computed from the JSONL files, figures embedded, CLI entry points."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from sharpmeter.cli import main
from sharpmeter.paper.analysis import compare_fits
from sharpmeter.paper.analysis.runs import load_runs
from sharpmeter.paper.compare import RESTARTS, schedule_verdict
from sharpmeter.paper.records import RecordWarning
from sharpmeter.paper.report import (
    _stability_lines,
    find_runs,
    find_schedule_runs,
    load_analysis,
    stability_line,
    write_report,
)
from sharpmeter.paper.simulator import simulate_run

CONFIGS = Path(__file__).parent.parent / "configs"
SIZES = {"a": 1e7, "b": 5e7, "c": 2e8, "d": 1e9}


def write_runs(root, statuses=("ok",)):
    """One folder per size with wide rows as the callback writes them, from the simulator."""
    for i, (name, n) in enumerate(SIZES.items()):
        run = simulate_run(n, n_checkpoints=60, seed=i)
        folder = root / name
        folder.mkdir(parents=True)
        rows = [
            {
                "run": name,
                "n_params": n,
                "step": 10 * (k + 1),
                "critical_sharpness": s,
                "loss": loss,
                "lr": 1e-3 * (1 + k) ** -0.5,
                "status": statuses[k % len(statuses)],
            }
            for k, (s, loss) in enumerate(zip(run.sharpness, run.loss))
        ]
        (folder / "sharpness.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "a" / "wandb" / "offline-run-20261123_120000-abc123").mkdir(parents=True)
    (root / "a" / "wandb" / "run-20261123_110000-old999").mkdir(parents=True)  # an older attempt
    return root


def test_report_numbers_come_from_the_logs(tmp_path):
    root = write_runs(tmp_path / "study", statuses=("ok", "ok", "nondescent"))
    files = write_report([root], out=root)
    markdown = files.markdown.read_text()
    finals = []
    for name, n in SIZES.items():
        rows = [json.loads(line) for line in (root / name / "sharpness.jsonl").open()]
        values = np.array([r["critical_sharpness"] for r in rows])
        # final: the last 20% of training time, steps 480..600 of 600 (13 measurements)
        tail = np.array([r["critical_sharpness"] for r in rows if r["step"] >= 480])
        final, stderr = tail.mean(), tail.std(ddof=1) / np.sqrt(tail.size)
        finals.append(final)
        robust = np.sort(tail)[2:-2].mean()  # 20% trimmed: 2 of 13 cut from each end
        row = f"| {n:,.0f} | 60 | {final:.4g} ± {stderr:.2g} | {robust:.4g} ["
        assert row in markdown
        assert f"(median {np.median(tail):.4g}) | {values.max():.4g} |" in markdown
        # final beside the simulator's, then the raw peak over final (not a grid's peak)
        cells = [
            re.escape(f"{n:,.0f}"),
            re.escape(f"{final:.4g}"),
            re.escape(f"{values.max() / final:.3g}"),
        ]
        compared = rf"\| {cells[0]} \| {cells[1]} / [^|]+ \| {cells[2]} / "
        assert re.search(compared, markdown), compared
    slope = compare_fits(list(SIZES.values()), finals).log_linear.slope
    assert f"| log-linear S = a log10 N + b | {slope:.4g} |" in markdown
    assert "Final sharpness falls with scale: **yes**" in markdown
    assert "measurements with a status other than ok: 80" in markdown
    assert f"wandb sync {root / 'a' / 'wandb' / 'offline-run-20261123_120000-abc123'}" in markdown
    assert "old999" not in markdown
    assert [f.name for f in files.figures] == ["curves.png", "scaling.png"]
    assert "](curves.png)" in markdown
    # no schedule runs: no section, and the note counts the ladder's 8 verdicts alone
    assert "Schedule sensitivity" not in markdown and "of 8 verdicts decided" in markdown


def test_html_report_is_self_contained(tmp_path):
    root = write_runs(tmp_path / "study")
    files = write_report([root], out=tmp_path / "out")
    page = files.html.read_text()
    assert page.count("data:image/png;base64,") == 2
    encoded = page.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(encoded) == (tmp_path / "out" / "curves.png").read_bytes()
    assert "<table>" in page and "Final sharpness falls with scale: <b>yes</b>" in page
    assert "src='curves.png'" not in page


def test_stability_line_is_two_over_the_learning_rate(tmp_path):
    root = write_runs(tmp_path / "study")
    path = root / "a" / "sharpness.jsonl"
    rows = [json.loads(line) for line in path.open()]
    [run] = load_runs([path])
    t, line = stability_line(run)
    assert t[-1] == 1.0 and line == pytest.approx([2 / r["lr"] for r in rows])
    path.write_text("".join(json.dumps({**r, "lr": float("nan")}) + "\n" for r in rows))
    assert stability_line(load_runs([path])[0]) is None


def test_each_size_gets_its_own_two_over_lr_line(tmp_path):
    """Sizes trained at their own rates: the smallest run's 2 / lr was drawn for every size,
    which put the larger sizes' edge of stability 3-10 times too low."""
    root = write_runs(tmp_path / "study")
    for scale, name in enumerate(SIZES, start=1):
        path = root / name / "sharpness.jsonl"
        rows = [json.loads(line) for line in path.open()]
        path.write_text("".join(json.dumps({**r, "lr": r["lr"] / scale}) + "\n" for r in rows))
    _, _, analysis = load_analysis([root])
    lines = _stability_lines(analysis)
    assert len(lines) == len(SIZES)
    firsts = [line[1][0] for line in lines]
    assert firsts == pytest.approx([2 / 1e-3 * scale for scale in range(1, len(SIZES) + 1)])


def test_runs_without_a_plan_that_end_at_different_steps_are_warned_of(tmp_path):
    """A W&B or pandas export carries no max_steps: a run killed at half its length was
    stretched over the whole axis and fitted as finished, with nothing said."""
    root = write_runs(tmp_path / "study")
    path = root / "b" / "sharpness.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: len(lines) // 2]))
    with pytest.warns(RecordWarning, match=r"no planned max_steps end at different steps \(b "):
        load_analysis([root])


def test_runs_are_found_by_folder_file_or_study(tmp_path):
    root = write_runs(tmp_path / "study")
    by_study = find_runs([root])
    assert [r.name for r in by_study] == list(SIZES)
    assert find_runs([root / "b", root / "c" / "sharpness.jsonl"])[1].name == "c"
    with pytest.raises(ValueError, match="no sharpness.jsonl"):
        find_runs([tmp_path / "empty"])
    seeds = tmp_path / "seeds"  # a study with several seeds: <size>/seed<k>, and schedules/
    for folder in ("a/seed0", "a/seed1", "b/seed0", "schedules/linear"):
        (seeds / folder).mkdir(parents=True)
        (seeds / folder / "sharpness.jsonl").write_text("")
    found = [r.jsonl.relative_to(seeds).parent.as_posix() for r in find_runs([seeds])]
    assert found == ["a/seed0", "a/seed1", "b/seed0"]
    for folder in ("a", "c"):  # a study without seeds written into the same folder
        (seeds / folder).mkdir(exist_ok=True)
        (seeds / folder / "sharpness.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"two studies.*\(a, c, a/seed0, a/seed1, b/seed0\)"):
        find_runs([seeds])  # neither pooled nor half of it picked (the seeds were skipped)


def test_cli_compare_and_report(tmp_path, capsys):
    root = write_runs(tmp_path / "study")
    assert main(["compare", str(root), "--out", str(tmp_path / "fig")]) == 0
    printed = capsys.readouterr().out
    assert "## Verdicts on the paper's claims" in printed and "shape RMSE" in printed
    assert (tmp_path / "fig" / "compare.png").stat().st_size > 10_000
    assert main(["report", str(root)]) == 0
    assert (root / "report.html").is_file() and (root / "report.md").is_file()
    assert str(root / "report.html") in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no sharpness.jsonl"):
        main(["report", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="no run to fit lambda_max; no finite lambda_max: a, b"):
        main(["compare", str(root), "--quantity", "lambda_max"])
    with pytest.raises(SystemExit, match="unknown model size"):
        main(["study", str(CONFIGS / "study_cpu.yaml"), "--sizes", "tiny", "huge"])


SCHEDULE_SIZE = SIZES["b"]
SCHEDULE_STEPS = 600  # 60 measurements, every 10 steps


def schedule_lr(name: str, t: np.ndarray, peak: float = 1e-3) -> np.ndarray:
    """The learning rate of transformers' schedules (no warmup): restarts take 4 cycles."""
    if name == "linear":
        return peak * (1 - t)
    cycles = 4 if name == RESTARTS else 1
    return peak * 0.5 * (1 + np.cos(np.pi * ((cycles * t) % 1.0)))


def write_schedules(study, restarts_spike: bool):
    """``<study>/schedules/<schedule>/``: one size's curve under cosine and linear, and under
    restarts with the spikes the paper describes just after each restart (or without them)."""
    for seed, name in enumerate(("cosine", "linear", RESTARTS), start=3):
        curve = simulate_run(SCHEDULE_SIZE, n_checkpoints=60, seed=seed).sharpness
        steps = 10 * np.arange(1, curve.size + 1)
        t = steps / SCHEDULE_STEPS
        if name == RESTARTS and restarts_spike:
            for restart in (0.25, 0.5, 0.75):
                curve[np.searchsorted(t, restart, side="right")] *= 3.0
        folder = study / "schedules" / name
        folder.mkdir(parents=True)
        rows = [
            {
                "run": f"schedules/{name}",
                "n_params": SCHEDULE_SIZE,
                "step": int(step),
                "critical_sharpness": float(s),
                "loss": 3.0,
                "lr": float(lr),
                "status": "ok",
            }
            for step, s, lr in zip(steps, curve, schedule_lr(name, t), strict=True)
        ]
        (folder / "sharpness.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return study / "schedules"


def file_verdict(schedules):
    """The verdict computed straight from the schedule runs' files."""
    runs = {
        folder.name: load_runs([folder / "sharpness.jsonl"])[0] for folder in schedules.iterdir()
    }
    curves = {name: run.curve("critical_sharpness") for name, run in runs.items()}
    return schedule_verdict(curves, runs[RESTARTS].curve("lr"))


@pytest.mark.parametrize("restarts_spike, answer", [(True, "yes"), (False, "no")])
def test_a_study_with_schedule_runs_reports_their_verdict(tmp_path, restarts_spike, answer):
    root = write_runs(tmp_path / "study")
    schedules = write_schedules(root, restarts_spike)
    verdict = file_verdict(schedules)
    assert verdict.holds is (answer == "yes"), verdict.line()
    files = write_report([root], out=root)  # found under the study folder
    markdown = files.markdown.read_text()
    section = markdown[markdown.index("## Schedule sensitivity") : markdown.index("## Files")]
    claim = "Cosine with restarts makes sharpness spike where cosine and linear decay smoothly"
    assert f"- {claim}: **{answer}** (restarts at t = 0.25, 0.50, 0.75;" in section
    assert verdict.line() in section
    # the claim is one more tested on the study: counted, and with a p-value for Holm to rank
    assert "of 9 verdicts decided" in markdown
    holm = markdown[markdown.index("Holm's correction") :].split("\n")[0]
    assert ("Cosine with restarts" in holm) is (answer == "yes"), holm
    assert "includes the schedule-sensitivity verdict below" in markdown
    for name in ("cosine", "linear", RESTARTS):  # each run listed, compared, its ratio shown
        assert re.search(rf"\| {name} \| 50,000,000 \| 60 \| [^|]+ \| [^|]+ \[", section), name
        assert (
            f"| `schedules/{name}` | 600 (no planned max_steps: t = step / last step) | yes |"
            in section
        )
        assert f"`{schedules / name / 'sharpness.jsonl'}` (" in markdown  # under Files
    assert "](schedules.png)" in section
    assert [f.name for f in files.figures] == ["curves.png", "scaling.png", "schedules.png"]
    assert (root / "schedules.png").stat().st_size > 10_000
    assert files.html.read_text().count("data:image/png;base64,") == 3
    # the ladder is the ladder: the schedule runs are not among its fitted runs
    assert f"{len(SIZES)} runs ({len(SIZES)} fitted)" in markdown


def test_schedule_runs_are_found_under_a_study_folder_or_named(tmp_path, capsys):
    root = write_runs(tmp_path / "study")
    schedules = write_schedules(root, restarts_spike=True)
    found = find_schedule_runs([root, root / "a"])  # a run folder holds no schedules
    assert [r.name for r in found] == ["cosine", "cosine_with_restarts", "linear"]
    assert find_schedule_runs([root / "a", root / "b" / "sharpness.jsonl"]) == []
    assert find_runs([root]) == find_runs([root / name for name in SIZES])  # not the ladder's
    ladder = [str(root / name) for name in SIZES]
    out = tmp_path / "named"
    assert main(["report", *ladder, "--schedules", str(schedules), "--out", str(out)]) == 0
    assert file_verdict(schedules).line() in (out / "report.md").read_text()
    assert main(["report", *ladder, "--out", str(tmp_path / "ladder")]) == 0
    assert "Schedule sensitivity" not in (tmp_path / "ladder" / "report.md").read_text()
    # study.py names none with schedules=[] when the study trains none
    assert (
        "Schedule sensitivity"
        not in write_report([root], tmp_path / "none", schedules=[]).markdown.read_text()
    )
    capsys.readouterr()


def test_a_schedule_run_that_cannot_be_compared_says_why(tmp_path):
    root = write_runs(tmp_path / "study")
    schedules = write_schedules(root, restarts_spike=True)
    (schedules / RESTARTS / "sharpness.jsonl").write_text("")
    markdown = write_report([root], out=root).markdown.read_text()
    assert "spike where cosine and linear decay smoothly: **undecided** (needs a" in markdown
    assert f"| {RESTARTS} | unknown | 0 | n/a | n/a |" in markdown
    assert "| empty file |" in markdown


def test_a_schedule_run_without_a_final_value_is_left_out_saying_so(tmp_path):
    root = write_runs(tmp_path / "study")
    schedules = write_schedules(root, restarts_spike=True)
    path = schedules / "linear" / "sharpness.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows[40:]:  # no_increase from step 410 of 600: no value in the last 20%
        row.update(critical_sharpness=None, critical_status="no_increase")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    markdown = write_report([root], out=root).markdown.read_text()
    assert "| no final critical_sharpness: no point in the last 20% of training" in markdown


def test_a_held_out_loss_beside_every_run_decides_flatter_is_better(tmp_path):
    root = write_runs(tmp_path / "study")
    for i, name in enumerate(SIZES):
        heldout = {"loss": 3.0 - 0.5 * i, "blocks": 8, "tokens": 504}
        (root / name / "heldout.json").write_text(json.dumps(heldout))
    runs = load_runs(sorted(root.glob("*/sharpness.jsonl")))
    assert [run.heldout_loss for run in runs] == [3.0, 2.5, 2.0, 1.5]
    text = Path(write_report([root], out=root).markdown).read_text()
    line = next(line for line in text.splitlines() if "Flatter is better" in line)
    assert "with the final held-out loss" in line
    (root / "b" / "heldout.json").unlink()  # one run without: the probe loss, for every size
    text = Path(write_report([root], out=root).markdown).read_text()
    assert "final probe loss (a training batch)" in text
    (root / "c" / "heldout.json").write_text("{}")
    with pytest.raises(ValueError, match="heldout.json: cannot read the held-out loss"):
        load_runs(sorted(root.glob("*/sharpness.jsonl")))


def test_a_curve_with_values_below_zero_is_drawn_on_a_symmetric_log_axis():
    from matplotlib.figure import Figure

    from sharpmeter.paper.report import _value_scale

    axes = Figure().subplots()
    axes.plot([0.1, 0.5, 1.0], [30.0, -22.0, 4.0])  # a trace on a training batch
    _value_scale(axes)
    low, high = axes.get_ylim()
    assert axes.get_yscale() == "symlog" and low < -22.0 and high > 30.0  # every point shown
    axes = Figure().subplots()
    axes.plot([0.1, 0.5, 1.0], [30.0, 22.0, 4.0])
    _value_scale(axes)
    assert axes.get_yscale() == "log"


# Flat noise on which eq. (1)'s least-squares search runs out of evaluations (S_f off to 1e4,
# lambda to 0): a fit that did not converge.
UNCONVERGED = (
    [0.044, 0.103, 0.182, 0.207, 0.226, 0.293, 0.372, 0.394, 0.428, 0.471, 0.495]
    + [0.533, 0.575, 0.6, 0.643, 0.688, 0.759, 0.783, 0.801, 0.841, 0.889, 1.0],
    [1.107, 0.891, 1.039, 0.965, 0.896, 0.97, 1.046, 0.969, 0.885, 1.019, 0.987]
    + [0.926, 1.045, 0.94, 0.934, 1.051, 1.097, 1.122, 1.039, 0.968, 0.979, 1.071],
)


def test_a_fit_that_did_not_converge_is_not_drawn_and_the_report_says_so(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from sharpmeter.paper.analysis import fit_three_phase
    from sharpmeter.paper.compare import analyse_curves
    from sharpmeter.paper.report import Figure, plot_curves, report_blocks

    t, s = map(np.array, UNCONVERGED)
    assert not fit_three_phase(t, s).converged  # the case this test is about
    curves = {n: (run.t, run.sharpness) for n in (1e7, 1e8, 1e9) for run in [simulate_run(n)]}
    analysis = analyse_curves({**curves, 3e9: (t, s)})
    assert "did not converge" in analysis.phase_fits[3e9][None]
    assert "1 fits failed" in analysis.verdicts[0].evidence
    dotted = []
    plot = Axes.plot

    def spy(axes, *args, **kwargs):
        if kwargs.get("linestyle") == ":":
            dotted.append(kwargs["color"])
        return plot(axes, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    plot_curves(analysis, tmp_path / "curves.png", "sharpness")
    assert len(dotted) == 3  # the three converged fits, not the fourth
    blocks = report_blocks(analysis, [], "sharpness", 0.2, "t", [tmp_path / "a", tmp_path / "b"])
    [curves_figure] = [b for b in blocks if isinstance(b, Figure) and b.path.name == "a"]
    assert "No dotted line for 3B: eq. (1) has no fit there" in curves_figure.caption
