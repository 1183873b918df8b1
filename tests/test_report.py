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
from sharpmeter.paper.report import find_runs, stability_line, write_report
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
