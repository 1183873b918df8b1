"""The loop examples on one process and on two gloo ranks: accelerate's (`accelerate launch`)
and FSDP2's (`torchrun`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"
KEYS = ("loss", "critical_sharpness", "lambda_max", "hessian_trace")


def run(command: list[str], output: Path, example: str = "accelerate_loop.py") -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [*command, str(EXAMPLES / example), "--steps", "10", "--output", str(output)],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    return [json.loads(line) for line in (output / "sharpness.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_measure_what_one_process_measures(tmp_path):
    single = run([sys.executable], tmp_path / "one")
    launcher = Path(sys.executable).parent / "accelerate"
    double = run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2"], tmp_path / "two")
    assert [r["step"] for r in single] == [r["step"] for r in double] == [0, 5, 10]
    assert set(single[0]) == set(double[0])
    assert all(r["status"] == "ok" for r in single + double), [r["status"] for r in single + double]
    # At initialisation the parameters are identical, so the numbers must be too; later the
    # trajectories part (each rank draws its own dropout masks).
    for key in KEYS:
        assert double[0][key] == pytest.approx(single[0][key], rel=1e-5), key


@pytest.mark.slow
def test_fsdp_loop_on_two_ranks_measures_what_one_rank_measures(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    runs = {
        ranks: run([torchrun, f"--nproc_per_node={ranks}"], tmp_path / str(ranks), "fsdp_loop.py")
        for ranks in (1, 2)
    }
    assert [r["step"] for r in runs[1]] == [r["step"] for r in runs[2]] == [10]
    assert all(r["status"] == "ok" for r in runs[1] + runs[2])
    # no dropout and one global batch per step: the two trajectories differ by rounding only
    for key in ("loss", "grad_norm", "critical_sharpness"):
        assert runs[2][0][key] == pytest.approx(runs[1][0][key], rel=1e-4), key
