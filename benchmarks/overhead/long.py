"""The long run at the default schedule: both arms at once, in two child processes of one torch
thread each, released together; the parent compares them and writes ``results/overhead_long.md``."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from benchmarks._common import (
    REPO,
    command_line,
    describe_gpt2,
    header,
    num_params,
    python_module,
    save_markdown,
)
from benchmarks.overhead.tables import LONG_TITLE, long_section
from benchmarks.overhead.training import SIZES, continue_training, make_trainer
from sharpmeter.harness.data import lm_dataset
from sharpmeter.integrations.hf import SharpnessCallback
from sharpmeter.measure.options import MeterOptions
from sharpmeter.paper.records import read_records

# What the children re-invoke, from the repository root.
MODULE = "benchmarks.overhead"

ARMS = ("without", "with")


class Progress(TrainerCallback):
    """Prints elapsed seconds a few times per run (the same cheap call in both arms)."""

    def __init__(self, arm: str, steps: int, callback: SharpnessCallback | None) -> None:
        self.arm, self.callback = arm, callback
        self.interval = max(steps // 20, 1)
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.interval == 0:
            line = (
                f"[{self.arm}] step {state.global_step}: {time.perf_counter() - self.started:.0f} s"
            )
            meter = self.callback.meter if self.callback else None
            if meter is not None:
                line += f", measuring {meter.measuring_seconds:.0f} s (last at {meter.last_step})"
            print(line, flush=True)
        return control


def long_worker(args: argparse.Namespace) -> None:
    """One arm of the long run: set up, wait for the parent's go, train, write the results."""
    torch.set_num_threads(args.threads)
    workdir, arm = Path(args.worker_dir), args.worker_arm
    dataset = lm_dataset(block_size=SIZES[args.size].n_positions)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trainer(args, dataset, output_dir, args.long)
        # No schedule argument: MeterOptions' default schedule, with its time budget.
        callback = SharpnessCallback.attach(trainer) if arm == "with" else None
        trainer.add_callback(Progress(arm, args.long, callback))
        (workdir / f"{arm}.ready").touch()
        while not (workdir / "go").exists():
            time.sleep(0.01)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        jsonl = Path(output_dir) / "sharpness.jsonl"
        rows = read_records(jsonl) if callback else []
    torch.save(trainer.model.state_dict(), workdir / f"{arm}.pt")
    meter = callback.meter if callback else None
    result = {
        "seconds": seconds,
        "loss": output.training_loss,
        "rows": rows,
        "minor_faults": faults,
        "n_params": num_params(trainer.model),
        "ledgers": [ledger_record(ledger) for ledger in meter.ledgers] if meter else None,
        "meter_measuring_seconds": meter.measuring_seconds if meter else None,
        "meter_training_seconds": meter.training_seconds if meter else None,
    }
    (workdir / f"{arm}.json").write_text(json.dumps(result))
    print(f"[{arm}] done: {seconds:.1f} s", flush=True)
    keep_busy(trainer, workdir)


def ledger_record(ledger) -> dict:
    """A schedule's account at the end of the run, with the schedule it keeps."""
    return {
        **ledger.state_dict(),
        "schedule": repr(ledger.schedule),
        "max_fraction": ledger.schedule.max_fraction,
    }


def keep_busy(trainer, workdir: Path) -> None:
    """Untimed training steps until both arms are done, so the arm still timed never runs alone
    on the machine (the arm that finishes first would otherwise speed up the other's tail)."""
    while not all((workdir / f"{arm}.json").exists() for arm in ARMS):
        continue_training(trainer, 1)


def run_arms(args: argparse.Namespace) -> tuple[dict, dict, bool]:
    """Both arms at once; returns their results and whether the final parameters are equal."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [*python_module(MODULE), "--size", args.size]
        command += ["--long", str(args.long), "--batch-size", str(args.batch_size)]
        command += ["--lr", repr(args.lr), "--seed", str(args.seed), "--threads", str(args.threads)]
        command += ["--worker-dir", workdir, "--worker-arm"]
        children = {arm: subprocess.Popen([*command, arm], cwd=REPO) for arm in ARMS}
        try:
            # Released together once both have built their data, model and Trainer.
            while not all((Path(workdir) / f"{arm}.ready").exists() for arm in ARMS):
                if any(child.poll() is not None for child in children.values()):
                    raise SystemExit("a child exited before training started")
                time.sleep(0.05)
            (Path(workdir) / "go").touch()
            codes = {arm: child.wait() for arm, child in children.items()}
        finally:
            for child in children.values():
                if child.poll() is None:
                    child.kill()
        if any(codes.values()):
            raise SystemExit(f"a child failed: exit codes {codes}")
        results = {arm: json.loads((Path(workdir) / f"{arm}.json").read_text()) for arm in ARMS}
        states = {arm: torch.load(Path(workdir) / f"{arm}.pt", weights_only=True) for arm in ARMS}
    without, with_ = states["without"], states["with"]
    identical = without.keys() == with_.keys() and all(
        torch.equal(without[k], with_[k]) for k in without
    )
    return results["without"], results["with"], identical


def main_long(args: argparse.Namespace, out: Path | None) -> None:
    started = time.perf_counter()
    print(f"long run: {args.long} steps, both arms at once", flush=True)
    without, with_, identical = run_arms(args)
    size, ledgers = SIZES[args.size], with_["ledgers"]
    extra = [
        f"{describe_gpt2(size, with_['n_params'])}, random init",
        f"data: KJV bytes (`sharpmeter.harness.data.lm_dataset`), batch {args.batch_size} x "
        f"{size.n_positions}; AdamW lr {args.lr:g} constant, max_grad_norm 1, seed {args.seed}; "
        "`Trainer(use_cpu=True, report_to=[], save_strategy='no', disable_tqdm=True)`",
        "callback: `SharpnessCallback.attach(trainer)`, no schedule argument: the default "
        "schedules, "
        + "; ".join(f"{', '.join(book['measures'])}: `{book['schedule']}`" for book in ledgers)
        + f"; measures {', '.join(MeterOptions().measures)}, "
        f"probe of 8 training examples, trace 8 HVPs, Lanczos <= {MeterOptions().lanczos_max_iter} "
        "steps",
        "both arms at the same time, two child processes of "
        f"{args.threads} torch thread(s) each, released together after building data, model "
        "and Trainer (no warm-up run); the arm that finishes first goes on with untimed "
        "training steps until the other is done, so neither runs alone; seconds: wall time of "
        "`trainer.train()`; whole "
        f"benchmark {(time.perf_counter() - started) / 60:.1f} min",
        "short runs on the plain every-10 grid and the cost of each measure: `results/overhead.md`",
    ]
    lines = header(
        f"Training overhead of SharpnessCallback: {LONG_TITLE.lower()}", command_line(), extra
    )
    lines += long_section(args, without, with_, identical)
    print("\n".join(lines))
    if out is not None:
        save_markdown(out, lines)
