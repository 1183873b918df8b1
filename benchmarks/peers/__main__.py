"""Command line of the peers benchmark: ``python -m benchmarks.peers`` (``--help``).

Run in the peers' venv (``bash benchmarks/setup_peers.sh`` creates it)::

    benchmarks/.venv-peers/bin/python -m benchmarks.peers      # writes results/peers.md

Every measurement runs in a worker, a fresh ``python -m benchmarks.peers --worker SPEC``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks._common import RESULTS, run_worker
from benchmarks.peers import __doc__ as description
from benchmarks.peers.accuracy import accuracy_worker
from benchmarks.peers.critical import critical_worker
from benchmarks.peers.problems import ACCURACY_PROBLEMS, SPEED_PROBLEMS
from benchmarks.peers.report import write_report
from benchmarks.peers.speed import memory_worker, speed_builders, speed_worker

# What the workers re-invoke, from the repository root.
MODULE = "benchmarks.peers"

WORKERS = {
    "accuracy": accuracy_worker,
    "speed": speed_worker,
    "memory": memory_worker,
    "critical": critical_worker,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=description.split("\n\n")[0]
    )
    parser.add_argument("--parts", default="accuracy,speed,critical")
    parser.add_argument("--accuracy-problems", default=",".join(ACCURACY_PROBLEMS))
    parser.add_argument("--speed-problems", default=",".join(SPEED_PROBLEMS))
    parser.add_argument("--eigen-budgets", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--trace-budgets", type=int, nargs="+", default=[12, 48])
    parser.add_argument("--seeds", type=int, default=8, help="random starts per eigen budget")
    parser.add_argument("--trace-seeds", type=int, default=10, help="probe sets per trace budget")
    parser.add_argument("--stderr-seeds", type=int, default=3, help="probe sets per stderr try")
    parser.add_argument("--convergence-seeds", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-3, help="relative error on lambda_max")
    parser.add_argument("--trace-rel-stderr", type=float, default=0.02)
    parser.add_argument("--trace-max-budget", type=int, default=1536)
    parser.add_argument("--train-steps", type=int, default=20, help="AdamW steps before measuring")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (speed)")
    parser.add_argument("--repeats-10m", type=int, default=1, help="timed rounds, 10M GPT-2")
    parser.add_argument("--hvps-per-round", type=int, default=3, help="HVPs per tool and round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.md")
    parser.add_argument("--json", type=Path, default=RESULTS / "peers.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_accuracy(args: argparse.Namespace) -> dict:
    """One accuracy worker per small float64 problem (it also runs convergence and side effects)."""
    accuracy = {}
    for name in args.accuracy_problems.split(","):
        spec = {
            "threads": args.threads,
            "kind": "accuracy",
            "problem": name,
            "train_steps": args.train_steps,
            "eigen_budgets": args.eigen_budgets,
            "trace_budgets": args.trace_budgets,
            "seeds": args.seeds,
            "trace_seeds": args.trace_seeds,
            "stderr_seeds": args.stderr_seeds,
            "convergence_seeds": args.convergence_seeds,
            "tol": args.tol,
            "trace_rel_stderr": args.trace_rel_stderr,
            "trace_max_budget": args.trace_max_budget,
        }
        accuracy[name] = run_worker(MODULE, spec, timeout=1800)
        print(f"accuracy {name}: {accuracy[name].get('error', 'done')}", flush=True)
    return accuracy


def run_speed(args: argparse.Namespace) -> tuple[dict, dict]:
    """Per float32 problem, one round-robin speed worker, then a memory worker per row."""
    speed, memory = {}, {}
    for name in args.speed_problems.split(","):
        repeats = args.repeats_10m if name.endswith("10M") else args.repeats
        spec = {
            "threads": args.threads,
            "kind": "speed",
            "problem": name,
            "repeats": repeats,
            "hvps_per_round": args.hvps_per_round,
        }
        speed[name] = run_worker(MODULE, spec, timeout=1800)
        print(f"speed {name}: {speed[name].get('error', 'done')}", flush=True)
        memory[name] = {}
        tools = ["baseline", "gradient", "training step", *speed_builders(None)]
        for tool in tools:
            spec = {"threads": args.threads, "kind": "memory", "problem": name, "tool": tool}
            memory[name][tool] = run_worker(MODULE, spec, timeout=1800)
        print(f"memory {name}: done", flush=True)
    return speed, memory


def run_critical(args: argparse.Namespace) -> dict:
    """One critical-sharpness worker per GPT-2 among the speed problems."""
    critical = {}
    for name in [p for p in args.speed_problems.split(",") if p.startswith("gpt2")]:
        spec = {"threads": args.threads, "kind": "critical", "problem": name}
        critical[name] = run_worker(MODULE, spec, timeout=1800)
        print(f"critical {name}: {critical[name].get('error', 'done')}", flush=True)
    return critical


def main() -> None:
    args = parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec.pop("kind")](spec)))
        return

    started = time.perf_counter()
    parts = args.parts.split(",")
    accuracy = run_accuracy(args) if "accuracy" in parts else {}
    speed, memory = run_speed(args) if "speed" in parts else ({}, {})
    critical = run_critical(args) if "critical" in parts else {}
    raw = {"accuracy": accuracy, "speed": speed, "memory": memory, "critical": critical}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(raw, indent=1))
    write_report(args, raw, time.perf_counter() - started)


if __name__ == "__main__":
    main()
