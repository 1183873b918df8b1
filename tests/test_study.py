"""The CPU scale study end to end, small: its report's numbers come from the logged JSONL."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from sharpmeter.analysis import compare_fits, curves_from_records, tail_mean
from sharpmeter.records import read_records

RECIPE = Path(__file__).parent.parent / "recipes" / "scale_study.py"
SMALL = ["--sizes", "tiny", "small", "medium", "--max_steps", "60", "--every", "5"]


def run_study(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RECIPE), "--output_dir", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env={"WANDB_MODE": "offline", "PATH": "/usr/bin:/bin", "HOME": str(out)},
    )


def test_small_study_report_is_computed_from_the_logs(tmp_path):
    out = tmp_path / "study"
    done = run_study(out, *SMALL)
    assert done.returncode == 0, done.stderr[-2000:]
    paths = [out / name / "sharpness.jsonl" for name in ("tiny", "small", "medium")]
    rows = [row for path in paths for row in read_records(path)]
    assert {row["step"] for row in rows} == set(range(5, 61, 5))
    curves = curves_from_records(rows, quantity="critical_sharpness")
    sizes = np.array(sorted(curves))
    finals = [tail_mean(curves[n][1], 0.2) for n in sizes]
    report = (out / "report.md").read_text()
    for n, final in zip(sizes, finals):
        assert f"| {n:,.0f} | 12 | {final:.4g} ± " in report
    slope = compare_fits(sizes, finals).log_linear.slope
    assert f"| log-linear S = a log10 N + b | {slope:.4g} |" in report
    assert (out / "curves.png").stat().st_size > 10_000
    assert "data:image/png;base64," in (out / "report.html").read_text()
    for name in ("tiny", "small", "medium"):  # each run's W&B folder beside its JSONL
        assert len(list(out.glob(f"{name}/wandb/offline-run-*"))) == 1, name

    # Interrupted and run again: finished sizes are not retrained, and a size trained again
    # (here: its folder lost) gets the same curve, whatever trained before it in the process.
    before = [p.stat().st_mtime_ns for p in paths]
    first_small = read_records(paths[1])
    shutil.rmtree(out / "small")
    again = run_study(out, *SMALL)
    assert again.returncode == 0 and again.stdout.count("already trained") == 2
    assert [paths[0].stat().st_mtime_ns, paths[2].stat().st_mtime_ns] == [before[0], before[2]]
    measured = ("critical_sharpness", "loss", "lr")
    assert [[r[k] for k in measured] for r in read_records(paths[1])] == [
        [r[k] for k in measured] for r in first_small
    ]

    # The same output_dir with other settings is refused before anything trains.
    changed = run_study(out, *SMALL, "--learning_rate", "1e-3")
    assert changed.returncode != 0 and "other settings (learning_rate)" in changed.stderr


def test_bad_input_fails_before_training(tmp_path):
    done = run_study(tmp_path, "--sizes", "tiny", "gigantic")
    assert done.returncode != 0 and "unknown model size" in done.stderr
    assert not list(tmp_path.glob("tiny"))
    done = run_study(tmp_path, "--max_steps", "20", "--every", "5")
    assert done.returncode != 0 and "leaves 4 measurements on the schedule" in done.stderr
    done = run_study(tmp_path, "--quantity", "lambda_max")
    assert done.returncode != 0 and "needs the 'spectral' measure" in done.stderr
    done = run_study(tmp_path, "--size", "tiny")
    assert done.returncode != 0 and "not 'size'" in done.stderr
    done = run_study(tmp_path, "--corpus", "missing/corpus.txt")
    assert done.returncode != 0 and "missing/corpus.txt" in done.stderr
