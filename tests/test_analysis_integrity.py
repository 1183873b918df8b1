"""What the analysis reads is what it reports: torn and bad lines, repeated steps, unfinished,
empty or diverged runs and non-finite values are each named, never silently used or dropped
(issue 13)."""

from __future__ import annotations

import argparse
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from sharpmeter.measure.schedule import Schedule
from sharpmeter.paper.analysis import cli as analysis_cli
from sharpmeter.paper.analysis import compare_fits, final_stderr, load_runs, select_runs
from sharpmeter.paper.compare import analyse_curves
from sharpmeter.paper.records import RecordWarning, read_records
from sharpmeter.paper.report import load_analysis, render_markdown, report_blocks

SIZES = {"a": 1e6, "b": 4e6, "c": 1.6e7, "d": 6.4e7}
PLANNED = 150
STEPS = list(range(10, PLANNED + 1, 10))
FIGURES = (Path("curves.png"), Path("scaling.png"))  # named in the blocks, never drawn here


def sharpness(n_params: float, step: int) -> float:
    """A rise, a decay and a plateau that falls with size, with a wobble (no exact fit)."""
    t = step / PLANNED
    shape = 1 + 4 * t / 0.2 if t < 0.2 else 1 + 4 * math.exp(-5 * (t - 0.2))
    return shape * (3 - 0.3 * math.log10(n_params)) * (1 + 0.02 * math.sin(7 * step))


def wide_rows(name: str, steps=STEPS) -> list[dict]:
    n = SIZES[name]
    return [
        {
            "run": name,
            "n_params": n,
            "step": step,
            "critical_sharpness": sharpness(n, step),
            "loss": 4 - math.log10(n) / 4 + 1 / step,
            "lr": 1e-3,
            "status": "ok",
        }
        for step in steps
    ]


def write_run(
    root: Path,
    name: str,
    rows: list[dict],
    max_steps: int | None = PLANNED,
    finished: bool | None = True,
) -> Path:
    """A run's rows and its metadata; ``finished=None``: a file from before it was recorded."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sharpness.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    if max_steps is not None:
        meta = {"run": name, "n_params": SIZES.get(name), "max_steps": max_steps}
        if finished is not None:
            meta["finished"] = finished
        (folder / "sharpness.meta.json").write_text(json.dumps(meta))
    return path


def write_study(root: Path, **replaced: list[dict]) -> Path:
    for name in SIZES:
        write_run(root, name, replaced.get(name, wide_rows(name)))
    return root


def write_killed_study(root: Path, measured: int = 6) -> Path:
    """Every size finished but ``b``, killed after its ``measured`` first measurements (at step
    60 of 150 by default; 14 reach step 140, into the last 10% of training)."""
    write_study(root)
    write_run(root, "b", wide_rows("b", steps=STEPS[:measured]), finished=False)
    return root


def markdown(root: Path, **options) -> str:
    files, _, analysis = load_analysis([root], **options)
    blocks = report_blocks(analysis, files, "critical_sharpness", 0.2, "t", FIGURES)
    return render_markdown(blocks, relative_to=root)


def runs_table(text: str) -> str:
    return text.split("## Runs\n\n")[1].split("\n\n")[0]


def table_row(text: str, first_cell: str) -> str:
    """The row of the report's runs table that starts with ``first_cell``."""
    rows = runs_table(text).splitlines()
    return next(line for line in rows if line.startswith(f"| {first_cell} |"))


def fit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sharpmeter")
    analysis_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["fit", *argv])
    return args.handler(args)


# ---- reading: torn lines and parse errors --------------------------------------------------


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "critical_sha')
    with pytest.warns(RecordWarning, match=r"rows\.jsonl:3: dropped a torn last line"):
        assert read_records(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2}')  # whole, only the newline missing: kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_records(path) == [{"step": 1}, {"step": 2}]


def test_a_bad_line_names_its_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"n_params": 10, "step": 1}\n{"n_params": 10, "step": 2}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n\n{"step": 2,, }\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not a JSON line") as caught:
        load_runs([good, bad])
    assert "char" not in str(caught.value) and "column" not in str(caught.value)
    bad.write_bytes(b'{"step": 1}\n\xff\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a JSON line \(not UTF-8\)"):
        read_records(bad)


def test_a_row_without_size_names_its_file_and_line(tmp_path):
    first = write_run(tmp_path, "a", wide_rows("a"))
    second = write_run(tmp_path, "b", [*wide_rows("b")[:2], {"step": 30, "critical_sharpness": 1}])
    with pytest.raises(ValueError, match=r"b/sharpness\.jsonl:3: the row has no positive n_params"):
        load_runs([first, second])


# ---- duplicate steps: the last write wins, named --------------------------------------------


def test_a_file_appended_twice_reads_as_one_copy(tmp_path):
    once = write_study(tmp_path / "once")
    twice = write_study(tmp_path / "twice", a=wide_rows("a") * 2)
    with pytest.warns(RecordWarning) as caught:
        _, _, doubled = load_analysis([twice])
    message = str(caught[0].message)
    assert "a/sharpness.jsonl: 15 measurements logged more than once" in message
    assert "step 10 on lines 1 and 16 (kept line 16)" in message and "and 10 more" in message
    _, _, single = load_analysis([once])
    t, s = doubled.curves[SIZES["a"]]
    assert t.size == len(STEPS)
    assert final_stderr(t, s) == final_stderr(*single.curves[SIZES["a"]])
    assert doubled.finals == single.finals


def test_a_conflicting_repeat_is_resolved_by_the_last_write(tmp_path):
    rows = wide_rows("c")
    relogged = {**rows[-1], "critical_sharpness": 5030.0}  # step 150 logged again after a resume
    conflicted = write_study(tmp_path / "conflicted", c=[*rows, relogged])
    replaced = write_study(tmp_path / "replaced", c=[*rows[:-1], relogged])
    with pytest.warns(RecordWarning, match=r"step 150 on lines 15 and 16 \(kept line 16\)"):
        _, _, resolved = load_analysis([conflicted])
    _, _, expected = load_analysis([replaced])
    assert resolved.finals == expected.finals
    # the earlier write loses even when it is the plausible one
    flipped = write_study(tmp_path / "flipped", c=[*rows[:-1], relogged, rows[-1]])
    with pytest.warns(RecordWarning, match=r"lines 15 and 16 \(kept line 16\)"):
        _, _, kept_last = load_analysis([flipped])
    _, _, clean = load_analysis([write_study(tmp_path / "clean")])
    assert kept_last.finals == clean.finals


def test_the_fit_command_resolves_repeats_too(tmp_path, capsys):
    root = write_study(tmp_path, d=wide_rows("d") * 2)
    files = sorted(str(path) for path in root.glob("*/sharpness.jsonl"))
    with pytest.warns(RecordWarning, match="d/sharpness.jsonl: 15 measurements"):
        assert fit(files) == 0
    assert "     64M      15" in capsys.readouterr().out  # 15 points, not 30


# ---- unfinished runs ------------------------------------------------------------------------


def test_an_unfinished_run_is_named_and_left_out(tmp_path):
    root = write_killed_study(tmp_path)
    files, _, analysis = load_analysis([root])
    assert sorted(analysis.curves) == [SIZES["a"], SIZES["c"], SIZES["d"]]
    text = markdown(root)
    row = table_row(text, "4,000,000")
    assert "| 6 | n/a |" in row and row.endswith("| `b` | 60 of 150 | unfinished: step 60 of 150 |")
    assert "Left out: `b` (unfinished: step 60 of 150)" in text
    assert "4 runs (3 fitted)" in text


def test_an_unfinished_run_fitted_on_request_keeps_its_place_on_the_axis(tmp_path):
    root = write_killed_study(tmp_path, measured=14)
    _, _, analysis = load_analysis([root], include_unfinished=True)
    t, s = analysis.curves[SIZES["b"]]
    assert t[-1] == pytest.approx(140 / 150)  # not stretched to 1
    assert analysis.finals[SIZES["b"]] == pytest.approx(np.mean(s[t >= 0.8]))
    text = markdown(root, include_unfinished=True)
    marked = "| 4,000,000 (unfinished: step 140 of 150) |"
    tables = [part for part in text.split("\n\n") if part.startswith("| parameters |")]
    assert len(tables) == 3 and all(marked in table for table in tables)  # runs, compare, phases
    assert "Included as asked although unfinished" in text


def test_an_unfinished_run_that_stopped_before_the_final_fraction_has_no_final_value(tmp_path):
    root = write_killed_study(tmp_path)  # step 60 of 150: t = 0.4, far from the end
    _, _, analysis = load_analysis([root], include_unfinished=True)
    assert SIZES["b"] not in analysis.curves
    reason = (
        "no final critical_sharpness: no point in the last 20% of training (the last at t = 0.4)"
        " (unfinished: step 60 of 150)"
    )
    assert table_row(markdown(root, include_unfinished=True), "4,000,000").endswith(f"| {reason} |")


def test_the_compare_and_report_commands_take_include_unfinished(tmp_path, capsys):
    from sharpmeter.cli import main

    root = write_killed_study(tmp_path, measured=14)
    assert main(["compare", str(root)]) == 0
    assert "Left out: `b` (unfinished: step 140 of 150)" in capsys.readouterr().out
    assert main(["compare", str(root), "--include-unfinished"]) == 0
    assert "Included as asked although unfinished" in capsys.readouterr().out
    assert main(["report", str(root), "--include-unfinished"]) == 0
    assert "4,000,000 (unfinished: step 140 of 150)" in (root / "report.md").read_text()


# Steps of a finished log-spaced run of 1300 steps (the next would be 1334), and of a finished
# default Schedule(every=10, max_fraction=0.05) run of 1000 whose time budget skipped 960-1000.
LOG_SPACED = [step for step in range(1, 1301) if Schedule(per_decade=8).is_due(step)]
BUDGET_SKIPPED = list(range(10, 951, 10))


@pytest.mark.parametrize(
    ("steps", "planned"), [(LOG_SPACED, 1300), (BUDGET_SKIPPED, 1000)], ids=["log", "budget"]
)
def test_a_run_its_metadata_says_finished_is_fitted_wherever_its_schedule_ended(
    tmp_path, steps, planned
):
    root = write_study(tmp_path)
    write_run(root, "b", wide_rows("b", steps=steps), max_steps=planned, finished=True)
    [run] = load_runs([root / "b" / "sharpness.jsonl"])
    assert run.unfinished is None
    _, _, analysis = load_analysis([root], final_fraction=0.25)
    assert SIZES["b"] in analysis.curves and not analysis.left_out


def test_a_finished_run_not_measured_in_the_final_fraction_has_no_final_value(tmp_path):
    root = write_study(tmp_path)  # log-spaced: the last measurement at step 1000 of 1300
    write_run(root, "b", wide_rows("b", steps=LOG_SPACED), max_steps=1300, finished=True)
    _, _, analysis = load_analysis([root])
    assert [(entry.run.name, entry.left_out) for entry in analysis.left_out] == [
        (
            "b",
            "no final critical_sharpness: no point in the last 20% of training "
            "(the last at t = 0.769)",
        )
    ]


def test_a_run_its_metadata_says_unfinished_is_left_out_even_past_its_last_measurement(tmp_path):
    root = write_study(tmp_path)
    write_run(root, "b", wide_rows("b"), finished=False)  # killed after its last measurement
    [run] = load_runs([root / "b" / "sharpness.jsonl"])
    assert run.unfinished == "unfinished: step 150 of 150"
    write_run(root, "b", wide_rows("b", steps=STEPS[:6]), max_steps=None, finished=False)
    (root / "b" / "sharpness.meta.json").write_text(json.dumps({"finished": False}))
    [run] = load_runs([root / "b" / "sharpness.jsonl"])
    assert run.unfinished == "unfinished: step 60"  # no plan to measure it against


def test_a_finished_record_that_is_not_a_boolean_names_the_metadata_file(tmp_path):
    write_run(tmp_path, "a", wide_rows("a"))
    meta = tmp_path / "a" / "sharpness.meta.json"
    meta.write_text(json.dumps({"max_steps": PLANNED, "finished": "yes"}))
    with pytest.raises(ValueError, match="sharpness.meta.json: finished must be true or false"):
        load_runs([tmp_path / "a" / "sharpness.jsonl"])


def test_an_older_file_is_finished_when_its_steps_show_it_and_else_unknown(tmp_path):
    root = write_study(tmp_path)
    older = {"max_steps": PLANNED, "finished": None}
    write_run(root, "a", wide_rows("a"), max_steps=155, finished=None)  # every 10 of 155: 150
    write_run(root, "b", wide_rows("b", steps=STEPS[:6]), **older)
    write_run(root, "c", wide_rows("c", steps=STEPS[:6]), **older)
    (root / "c" / "sharpmeter_run.json").write_text("{}")  # the harness saw training end
    write_run(root, "d", wide_rows("d", steps=LOG_SPACED), max_steps=1300, finished=None)
    runs = {run.name: run for run in load_runs(sorted(root.glob("*/sharpness.jsonl")))}
    assert runs["a"].unfinished is None and runs["a"].progress == "150 of 155"
    assert runs["c"].unfinished is None
    unknown = "finished? unknown (older file): step {} of {}"
    assert runs["b"].unfinished == unknown.format(60, PLANNED)
    assert runs["d"].unfinished == unknown.format(1000, 1300)  # log-spaced: not guessed
    text = markdown(root)
    assert f"Left out: `b` ({unknown.format(60, PLANNED)})" in text
    assert table_row(text, "4,000,000").endswith(f"| {unknown.format(60, PLANNED)} |")


def test_without_a_plan_the_last_step_is_the_axis_and_the_report_says_so(tmp_path):
    root = write_study(tmp_path)
    write_run(root, "b", wide_rows("b", steps=STEPS[:6]), max_steps=None)
    (root / "b" / "sharpness.meta.json").unlink()  # written before max_steps was recorded
    [run] = load_runs([root / "b" / "sharpness.jsonl"])
    assert run.unfinished is None and run.curve(None)[0][-1] == 1.0
    assert "60 (no planned max_steps: t = step / last step)" in table_row(
        markdown(root), "4,000,000"
    )


def test_the_fit_command_leaves_unfinished_runs_out_unless_asked(tmp_path, capsys):
    root = write_killed_study(tmp_path, measured=14)
    files = sorted(str(path) for path in root.glob("*/sharpness.jsonl"))
    assert fit(files) == 0
    out = capsys.readouterr().out
    assert "Runs found: 4, fitted: 3" in out and "left out: unfinished: step 140 of 150" in out
    assert fit([*files, "--include-unfinished"]) == 0
    out = capsys.readouterr().out
    assert "Runs found: 4, fitted: 4" in out
    finals = out.split("Final")[1].split("\n\n")[0]
    assert "(unfinished: step 140 of 150)" in table_row_of(finals, "4M")


def table_row_of(text: str, size: str) -> str:
    return next(line for line in text.splitlines() if line.strip().startswith(size))


# ---- every run listed, with why it is not fitted --------------------------------------------


def test_every_run_found_is_listed_with_why_it_is_not_fitted(tmp_path):
    root = write_study(tmp_path)
    write_run(root, "empty", [], max_steps=PLANNED)
    (root / "empty" / "sharpness.meta.json").write_text(json.dumps({"run": "empty"}))
    failed = [{**row, "run": "failed", "critical_sharpness": None} for row in wide_rows("c")]
    write_run(root, "failed", failed)
    diverged = wide_rows("d")
    for row in diverged[-3:]:  # the probe loss went NaN at step 130 and stayed so
        row.update(run="diverged", critical_sharpness=None, status="nonfinite")
        del row["loss"]
    write_run(root, "diverged", [{**row, "run": "diverged"} for row in diverged])
    text = markdown(root)
    assert "7 runs (4 fitted)" in text
    table = runs_table(text)
    assert len(table.splitlines()) == 2 + 7
    assert table.count("| yes |") == 4
    assert "| `empty` | no step logged | empty file |" in table
    assert "| `failed` | 150 of 150 | no finite critical_sharpness |" in table
    assert "| `diverged` | 150 of 150 | diverged: probe loss not finite from step 130 |" in table


def test_no_run_to_fit_names_every_run_and_its_reason(tmp_path):
    write_run(tmp_path, "a", [])
    write_run(tmp_path, "b", wide_rows("b", steps=STEPS[:3]))
    with pytest.raises(
        ValueError, match="no run to fit lambda_max; empty file: a; no finite lambda_max: b"
    ):
        load_analysis([tmp_path], quantity="lambda_max")


# ---- non-finite values ----------------------------------------------------------------------


def test_non_finite_values_are_counted_per_run(tmp_path):
    rows = wide_rows("a")
    for row, value in zip(rows[2:5], [None, float("nan"), float("inf")]):
        row["critical_sharpness"] = value
    root = write_study(tmp_path, a=rows)
    row = table_row(markdown(root), "1,000,000")
    assert row.startswith("| 1,000,000 | 12 | ") and row.endswith("| 3 | `a` | 150 of 150 | yes |")
    csv = tmp_path / "curves.csv"
    csv.write_text(
        "n_params,step,quantity,value\n1000,1,sharpness,2.0\n1000,2,sharpness,NaN\n"
        "1000,3,sharpness,Infinity\n1000,4,sharpness,\n1000,4,loss,1.0\n"
    )
    [entry] = select_runs(load_runs([csv])).entries
    assert (entry.used, entry.not_used) == (1, 3)


def spectral_rows(name: str, statuses: dict[int, str]) -> list[dict]:
    """``name``'s rows with a lambda_max column: ``spectral_status`` by step, ``not_due``
    (NaN) where ``statuses`` names no status, and an unconverged Ritz value of 500 kept in the
    row where the status says so."""
    rows = []
    for row in wide_rows(name):
        status = statuses.get(row["step"], "not_due")
        value = {"ok": 7.0, "not_converged": 500.0, "not_due": None}[status]
        rows.append({**row, "lambda_max": value, "spectral_status": status})
    return rows


def test_a_value_whose_measure_is_not_ok_is_not_used(tmp_path):
    every_50 = {50: "ok", 100: "not_converged", 150: "not_converged"}
    root = write_study(tmp_path, **{name: spectral_rows(name, every_50) for name in SIZES})
    write_run(root, "a", spectral_rows("a", {50: "ok", 100: "ok", 140: "ok", 150: "ok"}))
    runs = load_runs(sorted(root.glob("*/sharpness.jsonl")))
    entries = {e.run.name: e for e in select_runs(runs, "lambda_max").entries}
    # not_due rows count in neither column; the unconverged values are counted, never used
    assert (entries["a"].used, entries["a"].not_used) == (4, 0)
    assert (entries["b"].used, entries["b"].not_used) == (1, 2)
    t, s = entries["b"].run.curve("lambda_max")
    assert t.tolist() == [50 / 150] and s.tolist() == [7.0]
    _, _, analysis = load_analysis([root], quantity="lambda_max")
    assert analysis.finals == {SIZES["a"]: 7.0}  # the others: no value in the last 20%
    reason = "no final lambda_max: no point in the last 20% of training (the last at t = 0.333)"
    assert {entry.run.name: entry.left_out for entry in analysis.left_out} == dict.fromkeys(
        "bcd", reason
    )


def test_a_run_whose_last_values_failed_has_no_final_value(tmp_path):
    rows = wide_rows("b")
    for row in rows[6:]:  # unresolved from step 70 on: the row keeps no value
        row.update(critical_sharpness=None, critical_status="unresolved")
    root = write_study(tmp_path, b=rows)
    _, _, analysis = load_analysis([root])
    assert SIZES["b"] not in analysis.curves
    assert table_row(markdown(root), "4,000,000").endswith(
        "| no final critical_sharpness: no point in the last 20% of training "
        "(the last at t = 0.4) |"
    )


def test_the_fit_command_takes_the_final_fraction_of_training_time(tmp_path, capsys):
    """Every size on one curve of t; one measured log-spaced: its final is the same span of
    training as the others', not its last 10% of measurements (steps 1000-1778 of 2000)."""
    planned = 2000
    log_spaced = [s for s in range(1, planned + 1) if Schedule(per_decade=8).is_due(s)]

    def rows(name: str, steps: list[int]) -> list[dict]:
        return [
            {"run": name, "n_params": SIZES[name], "step": s, "critical_sharpness": 100 + s / 10}
            for s in steps
        ]

    for name in SIZES:
        steps = log_spaced if name == "d" else list(range(10, planned + 1, 10))
        write_run(tmp_path, name, rows(name, steps), max_steps=planned)
    files = sorted(str(path) for path in tmp_path.glob("*/sharpness.jsonl"))
    assert fit([*files, "--final-fraction", "0.25"]) == 0
    finals = capsys.readouterr().out.split("Final")[1].split("\n\n")[0]
    last_quarter = np.arange(1500, 2001, 10)
    assert float(table_row_of(finals, "1M").split()[2]) == pytest.approx(
        100 + last_quarter.mean() / 10, abs=1e-4
    )
    assert float(table_row_of(finals, "64M").split()[2]) == pytest.approx(100 + 1778 / 10)


def test_runs_on_different_probes_are_refused_and_other_dtypes_named(tmp_path):
    root = write_study(
        tmp_path, **{name: [{**r, "probe": "fixed"} for r in wide_rows(name)] for name in SIZES}
    )
    write_run(root, "d", [{**row, "probe": "train"} for row in wide_rows("d")])
    with pytest.raises(ValueError, match=r"different probes .* fixed: a \(.*\); train: d \("):
        load_analysis([root])
    load_analysis([root / name for name in "abc"])  # the runs of one probe
    write_run(root, "d", [{**row, "probe": "fixed"} for row in wide_rows("d")])
    meta = root / "d" / "sharpness.meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "dtype": "bfloat16"}))
    for name in "abc":
        meta = root / name / "sharpness.meta.json"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "dtype": "float32"}))
    with pytest.warns(RecordWarning, match=r"differ in dtype: float32: a .*; bfloat16: d"):
        text = markdown(root)  # and the report says so, beside the runs it fitted
    assert "The runs fitted together differ in dtype: float32: a (" in text


def test_values_too_large_to_square_are_refused_saying_why():
    sizes = [1e7, 1e8, 1e9, 1e10]
    with pytest.raises(
        ValueError, match=r"values reach 1e\+308 in magnitude, outside the 1e-100 to 1e100"
    ):
        compare_fits(sizes, [1.3, 1.2, 1e308, 1.0])
    t = np.arange(1, 61) / 60
    curves = {n: (t, 1 + np.exp(-3 * t) + 0.01 * np.sin(9 * t * k)) for k, n in enumerate(sizes)}
    curves[1e9] = (t, np.where(t == 1, 1e308, curves[1e9][1]))  # one value blows up
    form = analyse_curves(curves).verdicts[2]
    assert form.holds is None and "no scaling fit: values reach" in form.line()
    curves[1e9] = (t, np.where(t > 0.5, 1e308, 1.0))  # the final mean itself overflows
    falls, form = analyse_curves(curves).verdicts[1:3]
    assert falls.holds is None and form.holds is None
    assert "no scaling fit: values contains NaN or infinite values" in form.evidence


def test_the_fit_command_says_why_it_has_no_scaling_fit(tmp_path, capsys):
    rows = wide_rows("c")
    rows[-1]["critical_sharpness"] = 1e308
    root = write_study(tmp_path, c=rows)
    assert fit(sorted(str(path) for path in root.glob("*/sharpness.jsonl"))) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"no scaling fit: values reach \S+ in magnitude, outside the 1e-100 to 1e100", out
    )
    assert "Three-phase fits" in out  # the rest is reported
