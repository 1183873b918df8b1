"""The CPU scale study end to end, small: its report's numbers come from the logged JSONL."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from conftest import RUN_HOLDER

from sharpmeter.harness import study
from sharpmeter.harness.commands import run_study_command
from sharpmeter.harness.runlock import LOCK_NAME
from sharpmeter.harness.study import parse_study
from sharpmeter.harness.train import DONE_FILE, resume_checkpoint, run_config
from sharpmeter.paper.analysis import compare_fits, curves_from_records, tail_mean
from sharpmeter.paper.analysis.runs import load_runs
from sharpmeter.paper.compare import schedule_verdict
from sharpmeter.paper.records import read_records

RECIPE = Path(__file__).parent.parent / "recipes" / "scale_study.py"
SMALL = ["--sizes", "tiny", "small", "medium", "--max_steps", "60", "--every", "5"]


def run_study(out: Path, *extra: str, config: Path | None = None) -> subprocess.CompletedProcess:
    """The recipe in a process of its own, on ``config`` (None: its default, study_cpu.yaml)."""
    configs = [] if config is None else [str(config)]
    return subprocess.run(
        [sys.executable, str(RECIPE), *configs, "--output_dir", str(out), *extra],
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

    # Options that only change what is logged, and how, keep the finished sizes.
    quiet = ["--disable_tqdm", "true", "--logging_steps", "7", "--report_to", "none"]
    logged_otherwise = run_study(out, *SMALL, *quiet)
    assert logged_otherwise.returncode == 0, logged_otherwise.stderr[-2000:]
    assert logged_otherwise.stdout.count("already trained") == 3
    assert not list(out.glob("**/sharpmeter.lock"))

    # The same output_dir with other settings is refused before anything trains.
    changed = run_study(out, *SMALL, "--learning_rate", "1e-3")
    assert changed.returncode != 0 and "other settings (learning_rate)" in changed.stderr


def test_bad_input_fails_before_training(tmp_path):
    done = run_study(tmp_path, "--sizes", "tiny", "gigantic")
    assert done.returncode != 0 and "unknown model size" in done.stderr
    assert not list(tmp_path.glob("tiny"))
    done = run_study(tmp_path, "--max_steps", "20", "--every", "5")
    assert done.returncode != 0 and "leaves 4 critical measurements on its schedule" in done.stderr
    done = run_study(tmp_path, "--quantity", "lambda_max")
    assert done.returncode != 0 and "needs the 'spectral' measure" in done.stderr
    done = run_study(tmp_path, "--size", "tiny")
    assert done.returncode != 0 and "not 'size'" in done.stderr
    done = run_study(tmp_path, "--corpus", "missing/corpus.txt")
    assert done.returncode != 0 and "missing/corpus.txt" in done.stderr


CONFIG = Path(__file__).parent.parent / "configs" / "study_cpu.yaml"
TINY = ["--sizes", "tiny", "--max_steps", "60", "--every", "5"]


def study_arguments(out: Path, *extra: str) -> list[str]:
    return [str(CONFIG), "--output_dir", str(out), *TINY, *extra]


def study_command(out: Path, *extra: str) -> int:
    """``sharpmeter study`` in this process (SystemExit: its one-line error)."""
    return run_study_command(
        Namespace(config=str(CONFIG), overrides=[*study_arguments(out)[1:], *extra])
    )


def finish_without_training(out: Path, config: dict | None = None) -> Path:
    """The marker a finished ``tiny`` run of :data:`TINY` leaves (``config``: another one)."""
    arguments = parse_study(study_arguments(out)).size_arguments("tiny")
    marker = Path(arguments.training.output_dir) / DONE_FILE
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps(config if config is not None else run_config(*arguments)))
    return marker


def test_a_study_resumes_each_run_from_its_own_checkpoints_never_from_a_path(tmp_path):
    """One checkpoint given to every run would start seed 1 from seed 0's weights."""
    out = tmp_path / "study"
    checkpoint = out / "tiny" / "seed0" / "checkpoint-50"
    with pytest.raises(ValueError, match=r"resume_from_checkpoint .*'true'.*not a path"):
        parse_study(
            study_arguments(out, "--seeds", "0", "1", "--resume_from_checkpoint", str(checkpoint))
        )
    checkpoint.mkdir(parents=True)
    config = parse_study(
        study_arguments(out, "--seeds", "0", "1", "--resume_from_checkpoint", "true")
    )
    assert [resume_checkpoint(run.training) for run in config.runs()] == [str(checkpoint), None]


def test_a_quantity_the_report_would_refuse_is_refused_before_training(tmp_path):
    with pytest.raises(
        ValueError, match=r"'critical_sharpnes' .* did you mean 'critical_sharpness'"
    ):
        parse_study(study_arguments(tmp_path, "--quantity", "critical_sharpnes"))
    for logged in ("loss", "stability_ratio", "critical_eta"):  # logged, but no sharpness
        with pytest.raises(ValueError, match=f"'{logged}' is not a measure of sharpness"):
            parse_study(study_arguments(tmp_path, "--quantity", logged))
    assert not tmp_path.joinpath("tiny").exists()
    config = parse_study(study_arguments(tmp_path, "--quantity", "critical_sharpness"))
    assert config.study.quantity == "critical_sharpness"


def test_logging_options_do_not_make_a_finished_run_another_one(tmp_path):
    out = tmp_path / "study"
    finish_without_training(out)
    logging = ["--disable_tqdm", "true", "--logging_steps", "7", "--report_to", "none"]
    config = parse_study(study_arguments(out, *logging, "--save_strategy", "steps"))
    assert config.size_arguments("tiny").finished()
    with pytest.raises(ValueError, match=r"other settings \(learning_rate\)"):
        parse_study(study_arguments(out, *logging, "--learning_rate", "1e-3"))


def test_a_marker_that_still_lists_logging_options_is_accepted(tmp_path):
    # Markers written before logging options were left out of the comparison list them.
    out = tmp_path / "study"
    arguments = parse_study(study_arguments(out)).size_arguments("tiny")
    finish_without_training(out, {**run_config(*arguments), "logging_steps": 3})
    assert parse_study(study_arguments(out)).size_arguments("tiny").finished()


def test_a_broken_marker_is_one_line_naming_it(tmp_path):
    out = tmp_path / "study"
    marker = finish_without_training(out)
    marker.write_text("")  # what a full disk left
    with pytest.raises(SystemExit) as failed:
        study_command(out)
    message = str(failed.value)
    assert "\n" not in message and str(marker) in message and "remove it" in message


def test_a_study_on_a_folder_another_live_run_holds_writes_nothing(tmp_path, hold):
    out = tmp_path / "study"
    out.mkdir()
    lock = out / LOCK_NAME
    holder = hold(RUN_HOLDER, str(out))
    with pytest.raises(SystemExit) as refused:
        study_command(out)
    message = str(refused.value)
    assert "\n" not in message and str(lock) in message and f"pid {holder.pid}" in message
    assert list(out.iterdir()) == [lock]


def test_a_study_releases_its_folder_when_it_fails(tmp_path, monkeypatch):
    def broken_corpus(*args, **kwargs):
        raise RuntimeError("corpus gone")

    monkeypatch.setattr(study, "load_data", broken_corpus)
    config = parse_study(study_arguments(tmp_path / "study"))
    with pytest.raises(RuntimeError, match="corpus gone"):
        study.run_study(config)
    assert not (tmp_path / "study" / LOCK_NAME).exists()


CLAIMS = Path(__file__).parent.parent / "configs" / "claims_cpu.yaml"
# configs/claims_cpu.yaml shrunk to seconds: two sizes, two seeds, 20 steps, critical only (the
# HVP measures are tested elsewhere; here they would only multiply the seven runs' cost)
CLAIMS_SHRUNK = [
    *("--sizes", "tiny", "small", "--seeds", "0", "1", "--max_steps", "20", "--every", "2"),
    *("--measures", "critical", "--probe_size", "4"),
    *("--warmup_steps", "2", "--restart_cycles", "2", "--disable_tqdm", "true"),
]


def test_seeds_and_schedules_each_train_into_a_folder_of_their_own(tmp_path):
    config = parse_study([str(CLAIMS), "--output_dir", str(tmp_path), *CLAIMS_SHRUNK])
    trained = {
        str(Path(run.training.output_dir).relative_to(tmp_path)): (
            run.model.size,
            run.training.seed,
            run.training.data_seed,
            run.training.lr_scheduler_type.value,
            run.training.lr_scheduler_kwargs,
        )
        for run in config.runs()
    }
    restarts = ("small", 0, 0, "cosine_with_restarts", {"num_cycles": 2})
    assert trained == {
        "tiny/seed0": ("tiny", 0, 0, "cosine", None),
        "small/seed0": ("small", 0, 0, "cosine", None),
        "tiny/seed1": ("tiny", 1, 0, "cosine", None),
        "small/seed1": ("small", 1, 0, "cosine", None),
        "schedules/cosine": ("small", 0, 0, "cosine", {}),
        "schedules/linear": ("small", 0, 0, "linear", {}),
        "schedules/cosine_with_restarts": restarts,
    }
    assert [run.training.run_name for run in config.ladder()][:2] == ["tiny/seed0", "small/seed0"]


def test_seeds_pin_the_data_order_a_config_leaves_to_seed(tmp_path):
    # no data_seed: transformers would draw each run's data order from its own seed
    config = tmp_path / "study.yaml"
    config.write_text("sizes: [tiny]\nmax_steps: 60\nevery: 5\nseed: 7\nuse_cpu: true\n")
    argv = [str(config), "--output_dir", str(tmp_path / "study")]
    single = parse_study(argv).ladder()
    assert [(r.training.seed, r.training.data_seed) for r in single] == [(7, None)]
    replicated = parse_study([*argv, "--seeds", "3", "4"]).ladder()
    assert [(r.training.seed, r.training.data_seed) for r in replicated] == [(3, 7), (4, 7)]


def test_the_claims_study_shrunk_reports_its_seeds_and_trains_its_schedules(tmp_path):
    out = tmp_path / "claims"
    done = run_study(out, *CLAIMS_SHRUNK, config=CLAIMS)
    assert done.returncode == 0, done.stderr[-2000:]
    ladder = [out / size / f"seed{seed}" for seed in (0, 1) for size in ("tiny", "small")]
    schedules = [out / "schedules" / name for name in ("cosine", "linear", "cosine_with_restarts")]
    for folder in ladder + schedules:
        assert (folder / DONE_FILE).is_file(), folder
    assert not (out / "tiny" / "sharpness.jsonl").exists()
    first, second = (read_records(out / "small" / f"seed{k}" / "sharpness.jsonl") for k in (0, 1))
    assert [row["lr"] for row in first] == [row["lr"] for row in second]
    assert first[0]["loss"] != second[0]["loss"]  # another initialisation

    report = (out / "report.md").read_text()
    assert "Seeds per size: 2." in report and "| seed |" in report
    for folder in ladder:
        run = folder.relative_to(out).as_posix()
        assert f"| `{run}` | {run[-1]} |" in report, run
    assert "4 runs (4 fitted)" in report  # the schedules: one size, outside the scaling fits

    # Restarts raise the learning rate again halfway; linear and cosine decay throughout.
    lr = {p.name: [row["lr"] for row in read_records(p / "sharpness.jsonl")] for p in schedules}
    assert lr["cosine"] != lr["linear"]
    after_warmup = {name: rates[1:] for name, rates in lr.items()}
    for name in ("cosine", "linear"):
        assert after_warmup[name] == sorted(after_warmup[name], reverse=True), name
    restarted = after_warmup["cosine_with_restarts"]
    assert restarted != sorted(restarted, reverse=True)
    runs = {p.name: load_runs([p / "sharpness.jsonl"])[0] for p in schedules}
    curves = {name: run.curve("critical_sharpness") for name, run in runs.items()}
    verdict = schedule_verdict(curves, runs["cosine_with_restarts"].curve("lr"))
    section = report[report.index("## Schedule sensitivity") :]  # and the report shows it
    assert verdict.line() in section and "](schedules.png)" in section

    again = run_study(out, *CLAIMS_SHRUNK, config=CLAIMS)
    assert again.returncode == 0 and again.stdout.count("already trained") == 7
