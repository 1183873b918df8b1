"""Records -> curves adapter and the ``sharpmeter fit`` subcommand."""

import argparse
import csv
import json
import math

import numpy as np
import pytest

from sharpmeter.paper.analysis import cli as analysis_cli
from sharpmeter.paper.analysis import curves_from_records, tail_mean

SIZES = [10e6, 125e6, 350e6, 1.3e9, 3e9, 7e9]


def eq1_params(n_params):
    x = math.log10(n_params) - 7.0
    return 2.0 + 0.35 * x, 1.2 - 0.12 * x, 0.15 - 0.005 * x, 3.0 + 0.2 * x


def eq1(t, s_p, s_f, t_p, lam):
    return s_f + (s_p - s_f) * (t / t_p if t < t_p else math.exp(-lam * (t - t_p)))


def long_rows(n_checkpoints=200, sizes=SIZES):
    """Simulator-shaped long rows: noise-free eq. (1) sharpness and a loss curve."""
    rows = []
    for n in sizes:
        for i in range(n_checkpoints):
            t = i / (n_checkpoints - 1)
            base = {"source": "simulated", "n_params": n, "step": i, "fraction": t}
            rows.append({**base, "quantity": "sharpness", "value": eq1(t, *eq1_params(n))})
            rows.append({**base, "quantity": "loss", "value": 3.0 + math.exp(-5 * t)})
    return rows


def parse(argv):
    parser = argparse.ArgumentParser(prog="sharpmeter")
    analysis_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_curves_from_long_rows():
    curves = curves_from_records(long_rows(n_checkpoints=50))
    assert list(curves) == SIZES
    t, values = curves[7e9]
    assert t.size == 50 and t[0] == 0.0 and t[-1] == 1.0
    assert values[0] == pytest.approx(eq1(0.0, *eq1_params(7e9)))
    loss_t, loss = curves_from_records(long_rows(n_checkpoints=50), quantity="loss")[1e7]
    assert loss[0] == pytest.approx(4.0)


def test_curves_from_wide_rows_skip_failed_measurements():
    rows = [
        {"step": 200, "n_params": "1000", "run": "a", "critical_sharpness": "3.0", "loss": 1.0},
        {"step": 0, "n_params": 1000, "run": "a", "critical_sharpness": 1.0, "loss": 2.0},
        {"step": 100, "n_params": 1000, "run": "a", "critical_sharpness": None, "status": "nan"},
        {"step": 50, "n_params": 1000, "run": "a", "critical_sharpness": float("nan")},
        {"step": 0, "n_params": 2000, "run": "b", "critical_sharpness": 5.0},
    ]
    curves = curves_from_records(rows)
    t, values = curves[1000.0]
    assert t.tolist() == [0.0, 1.0]
    assert values.tolist() == [1.0, 3.0]
    assert curves_from_records(rows, quantity="loss")[1000.0][1].tolist() == [2.0, 1.0]


def test_curves_refuse_ambiguous_or_empty_records():
    rows = [
        {"step": 0, "n_params": 1000, "run": "a", "critical_sharpness": 1.0},
        {"step": 0, "n_params": 1000, "run": "b", "critical_sharpness": 1.0},
    ]
    with pytest.raises(ValueError, match="several runs"):
        curves_from_records(rows)
    with pytest.raises(ValueError, match="no finite values"):
        curves_from_records(rows, quantity="hessian_trace")
    with pytest.raises(ValueError, match="n_params"):
        curves_from_records([{"step": 0, "critical_sharpness": 1.0}])
    with pytest.raises(ValueError, match="neither step nor fraction"):
        curves_from_records([{"n_params": 10, "critical_sharpness": 1.0}])


def test_tail_mean_is_last_ten_percent():
    values = np.arange(200.0)
    assert tail_mean(values) == pytest.approx(np.mean(values[-20:]))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_fit_command_prints_scaling_and_phase_fits(tmp_path, capsys):
    path = tmp_path / "curves.jsonl"
    write_jsonl(path, long_rows())
    args = parse(["fit", str(path), "--bootstrap", "200"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "best by AIC" in out
    assert "fitted without 7B" in out
    assert "boot" in out
    # noise-free eq. (1): the three-phase fit of 10M prints the exact parameters
    row_10m = next(line for line in out.splitlines() if line.strip().startswith("10M   2.0000"))
    assert "1.2000" in row_10m and "0.1500" in row_10m and "3.0000" in row_10m


def test_fit_command_reads_csv_and_plots(tmp_path, capsys):
    path = tmp_path / "curves.csv"
    rows = long_rows(n_checkpoints=60, sizes=SIZES[:4])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    figure = tmp_path / "fit.png"
    args = parse(["fit", str(path), "--plot", "--output", str(figure)])
    assert args.handler(args) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_fit_command_with_too_few_sizes(tmp_path, capsys):
    path = tmp_path / "one.jsonl"
    write_jsonl(path, long_rows(n_checkpoints=30, sizes=SIZES[:1]))
    args = parse(["fit", str(path)])
    assert args.handler(args) == 0
    assert "no scaling fit: needs at least 3 model sizes, got 1" in capsys.readouterr().out
    args = parse(["fit", str(path), "--plot", "--output", str(tmp_path / "x.png")])
    assert args.handler(args) == 2


def test_fit_command_reports_bad_input(tmp_path, capsys):
    args = parse(["fit", str(tmp_path / "missing.jsonl")])
    assert args.handler(args) == 2
    path = tmp_path / "curves.jsonl"
    write_jsonl(path, long_rows(n_checkpoints=30))
    args = parse(["fit", str(path), "--quantity", "hessian_trace"])
    assert args.handler(args) == 2
    assert (
        "no run to fit hessian_trace; no finite hessian_trace: 10M, 125M, 350M, 1.3B, 3B, 7B"
        in capsys.readouterr().err
    )


def test_fit_command_refuses_a_quantity_that_is_not_sharpness(tmp_path, capsys):
    path = tmp_path / "curves.jsonl"
    write_jsonl(path, long_rows(n_checkpoints=30))  # logs a loss beside the sharpness
    args = parse(["fit", str(path), "--quantity", "loss"])
    assert args.handler(args) == 2
    captured = capsys.readouterr()
    assert "'loss' is not a measure of sharpness; use one of sharpness, critical_sharpness" in (
        captured.err
    )
    assert "Three-phase fits" not in captured.out


def test_fit_command_takes_a_wandb_exports_prefixed_sharpness_column(tmp_path, capsys):
    path = tmp_path / "wandb_export.csv"
    column = "train/sharpness/critical_sharpness"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "n_params", "step", column, "train/loss"])
        for n in SIZES[:4]:
            for step in range(1, 41):
                value = 2 + math.log10(n) * (1 - math.exp(-step / 10))
                writer.writerow([f"r{n:.0f}", n, step, value, 3.0])
    args = parse(["fit", str(path), "--quantity", column])
    assert args.handler(args) == 0
    assert "fitted: 4" in capsys.readouterr().out
    args = parse(["fit", str(path), "--quantity", "train/loss"])
    assert args.handler(args) == 2
    assert "'train/loss' is not a measure of sharpness" in capsys.readouterr().err
