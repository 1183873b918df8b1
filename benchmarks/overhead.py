"""Training overhead of ``SharpnessCallback``: a ~10M GPT-2 trained by the Hugging Face Trainer on
CPU, with and without the callback at its default settings, in one process.

What is measured:

- **Wall time of ``Trainer.train()``** with and without ``SharpnessCallback.attach(trainer)``
  (default measures ``critical``, ``trace``, ``spectral``; default schedule, every 10 steps;
  default probe, 8 training examples). The runs alternate in one process (without, with,
  without, with, ... ``--pairs`` times), each from the same initial weights and seed, after an
  untimed warm-up run; the overhead ratio is with / without per pair. The callback must not
  change training: the final parameters of every run are compared bit for bit.
- **Each measurement** from the callback's JSONL: ``wall_seconds``, ``critical_num_forward``,
  the HVPs of each estimator. The first measurement of a run is cold (no previous
  :math:`\\eta_c`, no previous eigenvector); the later ones are warm-started.
- **Each measure alone**: after the last run with the callback, training goes on for one
  schedule interval (``every`` steps, same optimizer), then a ``SharpnessMeter`` with a single
  measure is timed on that model, warm-started from the callback's meter as the callback's
  next measurement would be. With the step time this gives the overhead of any schedule.

The table above measures the plain ``every=10`` grid (``GRID``): the meter's default schedule
adds a 5% wall-time budget that only shows over a long run. ``--long STEPS`` measures that:

- **Long run at the default schedule** (``--long STEPS``): the two arms run *at the same time*, as
  two child processes of one torch thread each (same seed, data and initial weights, released
  together once both are set up), so both see the same machine noise: one trains without the
  callback, one with ``SharpnessCallback.attach(trainer)`` and no schedule argument (the meter's
  ``DEFAULT_SCHEDULE``, every 10 steps within 5% of the wall time). Each child writes the wall
  time of ``trainer.train()``, its final state dict and (with the callback) the JSONL rows; the
  parent reports the ratio, checks the final parameters bit for bit, and writes
  ``results/overhead_long.md``.

Targets: training time with / without the callback <= 1.05 at the default schedule; mean
forwards per warm-started critical-sharpness measurement <= 7.

    .venv/bin/python benchmarks/overhead.py              # ~9 minutes, writes results/overhead.md
    .venv/bin/python benchmarks/overhead.py --small      # a ~1M GPT-2, one pair; writes nothing
    .venv/bin/python benchmarks/overhead.py --long 1000  # ~32 minutes, results/overhead_long.md
    .venv/bin/python benchmarks/overhead.py --size 1M --long 60 --out /tmp/long.md   # a check
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    RESULTS,
    GPT2Size,
    command_line,
    fmt,
    gpt2,
    header,
    markdown_table,
    median,
    num_params,
    save_markdown,
)
from transformers import TrainerCallback

import sharpmeter as sm
from sharpmeter.data import BYTE_VOCAB, lm_dataset
from sharpmeter.integrations.hf import SharpnessCallback
from sharpmeter.meter import DEFAULT_MEASURES, DEFAULT_SCHEDULE
from sharpmeter.records import read_records

# The fixed grid this table measures: the meter's default adds a 5% wall-time budget on top,
# which caps the long-run ratio at 1.05 by skipping due steps; the grid shows the raw cost.
GRID = sm.Schedule(every=10)

# Byte-level GPT-2s (vocabulary 256: the KJV bytes); n_positions is the block size trained on.
SIZES = {
    "10M": GPT2Size("10M", vocab_size=BYTE_VOCAB, n_embd=384, n_layer=6, n_head=6, n_positions=256),
    "1M": GPT2Size("1M", vocab_size=BYTE_VOCAB, n_embd=128, n_layer=4, n_head=4, n_positions=128),
}
# What the callback measures by default, then the two optional measures.
SINGLE_MEASURES = ("critical", "trace", "spectral", "directional", "preconditioned")
TARGET_RATIO = 1.05
TARGET_FORWARDS = 7


def training_args(output_dir: str, args: argparse.Namespace, steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=args.seed,
    )


def make_trainer(args: argparse.Namespace, dataset, output_dir: str, steps: int):
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    model = gpt2(SIZES[args.size], seed=args.seed).train()
    arguments = training_args(output_dir, args, steps)
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset)
    trainer.remove_callback(PrinterCallback)  # the callback's rows would be printed
    return trainer


def run_once(args: argparse.Namespace, dataset, with_callback: bool, steps: int) -> dict:
    """One ``Trainer.train()`` from fresh weights: seconds, final loss, parameters, rows."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trainer(args, dataset, output_dir, steps)
        callback = SharpnessCallback.attach(trainer, schedule=GRID) if with_callback else None
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
        jsonl = Path(output_dir) / "sharpness.jsonl"
        rows = read_records(jsonl) if callback else []
    params = [p.detach().clone() for p in trainer.model.parameters()]
    return {
        "seconds": seconds,
        "loss": output.training_loss,
        "params": params,
        "rows": rows,
        "trainer": trainer,
        "callback": callback,
    }


def continue_training(trainer, steps: int) -> None:
    """``steps`` more optimizer steps on the next training batches, as the Trainer takes them."""
    model, optimizer = trainer.model, trainer.optimizer
    model.train()
    batches = iter(trainer.get_train_dataloader())
    for _ in range(steps):
        batch = next(batches)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def time_single_measures(run: dict, measures: list[str], every: int) -> dict[str, dict]:
    """Each measure alone, one schedule interval after the callback's last measurement."""
    trainer, meter = run["trainer"], run["callback"].meter
    continue_training(trainer, every)
    step = meter.last_step + every
    results = {}
    # The HessianOperator every HVP measure builds first: forward + backward with create_graph.
    with sm.measurement(trainer.model):
        start = time.perf_counter()
        sm.HessianOperator(trainer.model, None, meter.probe_batch)
        results["construction"] = {"seconds": time.perf_counter() - start}
    for measure in measures:
        single = sm.SharpnessMeter(
            trainer.model, meter.probe_batch, measures=(measure,), max_grad_norm=meter.max_grad_norm
        )
        # Warm starts as the callback's next measurement would have them (none is kept for
        # the preconditioned eigenvector, which the default measures do not compute).
        single.eta_c, single.top_vector = meter.eta_c, meter.top_vector
        row = single.measure(step, optimizer=trainer.optimizer)
        results[measure] = row
        print(f"  {measure:<15} {row['wall_seconds']:7.2f} s  status {row['status']}", flush=True)
    return results


def hvps(row: dict) -> int:
    """HVPs of a row: the estimators' ``*_num_matvecs``, and 1 for directional sharpness."""
    count = sum(v for k, v in row.items() if k.endswith("_num_matvecs") and v == v)
    return int(count + (row.get("directional_status") == "ok"))


def all_params_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def targets_table(summary: dict) -> list[str]:
    ratio, forwards, implied = summary["ratio"], summary["warm_forwards_mean"], summary["implied"]
    rows = [
        [
            f"training time with / without the callback (every-10 grid, no time budget, "
            f"{summary['steps']} steps, median of {summary['pairs']} pair(s)): target <= "
            f"{TARGET_RATIO} (default schedule: `--long`)",
            f"{ratio:.2f}x ({'met' if ratio <= TARGET_RATIO else 'NOT met'})",
        ],
        [
            "same, implied for a long run on the grid: 1 + warm measurement / (every x step)",
            f"{implied:.2f}x ({'met' if implied <= TARGET_RATIO else 'NOT met'})",
        ],
        [
            f"mean forwards per warm-started critical-sharpness measurement: target <= "
            f"{TARGET_FORWARDS}",
            f"{fmt(forwards)} (max {summary['warm_forwards_max']}, "
            f"{summary['warm_count']} measurements; "
            f"{'met' if forwards <= TARGET_FORWARDS else 'NOT met'})",
        ],
    ]
    return ["## Targets", ""] + markdown_table(["target", "result"], rows)


def runs_table(pairs: list[tuple[dict, dict]], steps: int) -> list[str]:
    rows = []
    for index, (without, with_) in enumerate(pairs, 1):
        measuring = sum(r["wall_seconds"] for r in with_["rows"])
        rows.append(
            [
                str(index),
                fmt(without["seconds"], 4),
                fmt(without["seconds"] / steps),
                fmt(with_["seconds"], 4),
                fmt(measuring, 4),
                fmt((with_["seconds"] - measuring) / steps),
                str(len(with_["rows"])),
                f"{with_['seconds'] / without['seconds']:.2f}x",
            ]
        )
    columns = [
        "pair",
        "without: s",
        "without: s / step",
        "with: s",
        "with: s measuring (JSONL)",
        "with: s / step, measurements left out",
        "measurements",
        "with / without",
    ]
    return ["## Runs (in the order taken: without, then with)", ""] + markdown_table(columns, rows)


def timing_cells(row: dict, position: int, step_seconds: float) -> list[str]:
    """Start (a run's first measurement is cold), seconds, training steps' worth, forwards."""
    return [
        "cold" if position == 0 else "warm",
        fmt(row["wall_seconds"], 3),
        fmt(row["wall_seconds"] / step_seconds, 3),
        str(row.get("critical_num_forward")),
    ]


def value_cells(row: dict) -> list[str]:
    """HVPs in all, the three measured values, the status."""
    return [
        str(hvps(row)),
        fmt(row.get("critical_sharpness"), 4),
        fmt(row.get("lambda_max"), 4),
        fmt(row.get("hessian_trace"), 4),
        row["status"],
    ]


def measurements_table(pairs: list[tuple[dict, dict]], step_seconds: float) -> list[str]:
    rows = []
    for index, (_, with_) in enumerate(pairs, 1):
        for position, row in enumerate(with_["rows"]):
            rows.append(
                [
                    f"{index} / {row['step']}",
                    *timing_cells(row, position, step_seconds),
                    str(row.get("hessian_trace_num_matvecs")),
                    str(row.get("lambda_max_num_matvecs")),
                    *value_cells(row),
                ]
            )
    columns = [
        "pair / step",
        "start",
        "seconds",
        "x training step",
        "critical forwards",
        "trace HVPs",
        "Lanczos HVPs",
        "HVPs",
        "critical_sharpness",
        "lambda_max",
        "hessian_trace",
        "status",
    ]
    return [
        "## Each measurement of the callback (JSONL rows)",
        "",
        "cold: the run's first measurement (line search from the learning rate, Lanczos from a "
        "random vector); warm: from the previous eta_c and top eigenvector. x training step: "
        "over the median training step without the callback.",
        "",
    ] + markdown_table(columns, rows)


def singles_table(singles: dict, warm_rows: list[dict], step_seconds: float, every: int):
    def row_for(label: str, seconds: float, forwards, hvp_count) -> list[str]:
        return [
            label,
            fmt(seconds, 3),
            fmt(seconds / step_seconds, 3),
            str(forwards),
            str(hvp_count),
            f"{1 + seconds / (every * step_seconds):.2f}x",
            str(math.ceil(seconds / ((TARGET_RATIO - 1) * step_seconds))),
        ]

    rows = [
        row_for(
            "HessianOperator construction (fwd + bwd with create_graph), shared by HVP measures",
            singles["construction"]["seconds"],
            "–",
            "–",
        )
    ]
    labels = {
        "critical": "critical (line search, warm eta_c; + fwd + bwd for the probe gradient)",
        "trace": "trace (Hutchinson, 8 probes; + construction)",
        "spectral": "spectral (Lanczos, warm eigenvector, tol 1e-3; + construction)",
        "directional": "directional (1 HVP; + construction)",
        "preconditioned": "preconditioned (Lanczos, cold; + construction)",
    }
    for measure, label in labels.items():
        if measure not in singles:
            continue
        row = singles[measure]
        forwards = row.get("critical_num_forward", "–") if measure == "critical" else "–"
        rows.append(row_for(label, row["wall_seconds"], forwards, hvps(row) or "–"))
    if warm_rows:
        seconds = statistics.mean(r["wall_seconds"] for r in warm_rows)
        forwards = statistics.mean(r["critical_num_forward"] for r in warm_rows)
        hvp_count = statistics.mean(hvps(r) for r in warm_rows)
        rows.append(
            row_for(
                f"all defaults {'+'.join(DEFAULT_MEASURES)} (callback, warm, mean)",
                seconds,
                fmt(forwards),
                fmt(hvp_count),
            )
        )
    columns = [
        "measure (a meter with only it)",
        "seconds",
        "x training step",
        "forwards",
        "HVPs",
        f"training time ratio at every={every}",
        f"smallest `every` for <= {TARGET_RATIO}",
    ]
    return [
        "## Cost of each measure alone",
        "",
        f"A `SharpnessMeter` with one measure, timed once on the model {every} steps after the "
        "callback's last measurement, warm-started from the callback's meter. Ratio at "
        f"every=n: 1 + seconds / (n x training step); smallest `every`: seconds / "
        f"({TARGET_RATIO - 1:.2f} x training step). Each HVP measure pays its own construction; "
        "measured together they share one.",
        "",
    ] + markdown_table(columns, rows)


# --- Long run at the default schedule: the two arms at once, in two child processes ----------

ARMS = ("without", "with")
LONG_TITLE = "Long run at the default schedule (budget 5%)"


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
        # No schedule argument: the meter's DEFAULT_SCHEDULE, with its time budget.
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
        "schedule": repr(meter.schedule) if meter else None,
        "meter_measuring_seconds": meter.measuring_seconds if meter else None,
        "meter_training_seconds": meter.training_seconds if meter else None,
    }
    (workdir / f"{arm}.json").write_text(json.dumps(result))
    print(f"[{arm}] done: {seconds:.1f} s", flush=True)
    keep_busy(trainer, workdir)


def keep_busy(trainer, workdir: Path) -> None:
    """Untimed training steps until both arms are done, so the arm still timed never runs alone
    on the machine (the arm that finishes first would otherwise speed up the other's tail)."""
    while not all((workdir / f"{arm}.json").exists() for arm in ARMS):
        continue_training(trainer, 1)


def run_arms(args: argparse.Namespace) -> tuple[dict, dict, bool]:
    """Both arms at once; returns their results and whether the final parameters are equal."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, str(Path(__file__).resolve()), "--size", args.size]
        command += ["--long", str(args.long), "--batch-size", str(args.batch_size)]
        command += ["--lr", repr(args.lr), "--seed", str(args.seed), "--threads", str(args.threads)]
        command += ["--worker-dir", workdir, "--worker-arm"]
        children = {arm: subprocess.Popen([*command, arm]) for arm in ARMS}
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


def long_section(
    args: argparse.Namespace, without: dict, with_: dict, identical: bool
) -> list[str]:
    steps, rows = args.long, with_["rows"]
    fraction = DEFAULT_SCHEDULE.max_fraction
    ratio = with_["seconds"] / without["seconds"]
    measuring = sum(r["wall_seconds"] for r in rows)
    equal = 1 + measuring / without["seconds"]
    training = with_["seconds"] - measuring
    step_seconds = without["seconds"] / steps
    first = rows[0]["wall_seconds"] if rows else 0.0
    bound = fraction * training + first
    at_steps = ", ".join(str(r["step"]) for r in rows) or "none"
    # The next due step passes the budget once measuring + last cost <= fraction x training.
    last = rows[-1]["wall_seconds"] if rows else 0.0
    next_training = (measuring + last) / fraction
    table = [
        ["steps (both arms)", str(steps)],
        [
            "without the callback: s of `trainer.train()` (s / step)",
            f"{fmt(without['seconds'], 5)} ({fmt(step_seconds)})",
        ],
        [
            "with the callback: s of `trainer.train()` (s / step, measuring left out)",
            f"{fmt(with_['seconds'], 5)} ({fmt(training / steps)})",
        ],
        [
            f"training time with / without: target <= {TARGET_RATIO}",
            f"**{ratio:.3f}x** ({'met' if ratio <= TARGET_RATIO else 'NOT met'})",
        ],
        [
            "same at equal training step times: 1 + seconds measuring / without-arm seconds",
            f"{equal:.3f}x ({'met' if equal <= TARGET_RATIO else 'NOT met'})",
        ],
        ["measurements taken, at steps", f"{len(rows)}, at {at_steps}"],
        [
            "seconds measuring (sum of JSONL `wall_seconds`), fraction of training time "
            "(with-arm seconds less measuring)",
            f"{fmt(measuring, 4)} s = {measuring / training:.1%}",
        ],
        [
            "first measurement (cold), the only one that can overshoot the budget",
            f"{fmt(first, 4)} s = {first / step_seconds:.3g} training steps",
        ],
        [
            f"bound the budget guarantees: measuring <= {fraction:g} x training + first "
            "measurement",
            f"{fraction:g} x {fmt(training, 4)} + {fmt(first, 4)} = {fmt(bound, 4)} s "
            f"({'held' if measuring <= bound else 'NOT held'}); as a ratio "
            f"<= {1 + fraction + first / training:.3f}x",
        ],
        [
            "meter's own clock at the end: measuring / training seconds",
            f"{fmt(with_['meter_measuring_seconds'], 4)} / "
            f"{fmt(with_['meter_training_seconds'], 5)} = "
            f"{with_['meter_measuring_seconds'] / with_['meter_training_seconds']:.1%}",
        ],
        [
            "next measurement allowed once training time reaches (measuring + last cost) / "
            f"{fraction:g}",
            f"{fmt(next_training, 4)} s = step ~{next_training / (training / steps):.0f}",
        ],
        [
            "final parameters with vs without: bit-identical",
            "yes" if identical else "**NO**",
        ],
        [
            "final training loss (mean over the run): without / with",
            f"{fmt(without['loss'], 6)} / {fmt(with_['loss'], 6)}",
        ],
    ]
    if "minor_faults" in without:
        table.append(
            [
                "minor page faults per step in `trainer.train()`: without / with (measurements "
                "included)",
                f"{without['minor_faults'] / steps:.0f} / {with_['minor_faults'] / steps:.0f}",
            ]
        )
    measured = []
    for position, row in enumerate(rows):
        measured.append(
            [str(row["step"]), *timing_cells(row, position, step_seconds), *value_cells(row)]
        )
    columns = ["step", "start", "seconds", "x training step", "critical forwards", "HVPs"]
    columns += ["critical_sharpness", "lambda_max", "hessian_trace", "status"]
    return (
        [f"## {LONG_TITLE}", ""]
        + markdown_table(["quantity", "result"], table)
        + ["### Measurements (JSONL rows of the with-arm)", ""]
        + markdown_table(columns, measured)
        + [
            f"`{with_['schedule']}`: a step on the grid is measured only while measuring so far "
            f"plus the last measurement's cost stays within {fraction:g} x the training time so "
            "far, so only the first measurement can overshoot. x training step: over the "
            "without-arm's mean step.",
            "",
            "With / without can come out below 1 + measuring / without: the with-arm's training "
            "steps can be faster than the without-arm's, because a measurement's large "
            "allocations (create_graph, several GiB on the 10M model) leave glibc's heap grown, "
            "and the training steps after it reuse pages already mapped instead of taking fresh "
            "ones from the kernel (minor page faults) every step. That is the allocator, not "
            "the callback; the equal-step-times ratio is the cost of measuring alone.",
            "",
        ]
    )


def main_long(args: argparse.Namespace, out: Path | None) -> None:
    started = time.perf_counter()
    print(f"long run: {args.long} steps, both arms at once", flush=True)
    without, with_, identical = run_arms(args)
    size = SIZES[args.size]
    extra = [
        f"model: GPT-2 {args.size}, {with_['n_params']:,} parameters (n_embd {size.n_embd}, "
        f"n_layer {size.n_layer}, n_head {size.n_head}, vocab {size.vocab_size}), float32, "
        "dropout 0, random init",
        f"data: KJV bytes (`sharpmeter.data.lm_dataset`), batch {args.batch_size} x "
        f"{size.n_positions}; AdamW lr {args.lr:g} constant, max_grad_norm 1, seed {args.seed}; "
        "`Trainer(use_cpu=True, report_to=[], save_strategy='no', disable_tqdm=True)`",
        "callback: `SharpnessCallback.attach(trainer)`, no schedule argument: the meter's "
        f"`DEFAULT_SCHEDULE` = `{with_['schedule']}`; measures {', '.join(DEFAULT_MEASURES)}, "
        "probe of 8 training examples, trace 8 HVPs, Lanczos <= 20 steps",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="10M")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--pairs", type=int, default=2, help="(without, with) pairs of runs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW, constant schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed first run")
    parser.add_argument(
        "--measures",
        default="critical,trace,spectral,directional",
        help=f"measures timed alone, of {','.join(SINGLE_MEASURES)} ('' for none); "
        "preconditioned is a cold Lanczos (about as long as a cold spectral)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--small", action="store_true", help="quick check: --size 1M --pairs 1")
    parser.add_argument(
        "--long",
        type=int,
        default=None,
        metavar="STEPS",
        help="long run at the default schedule: both arms at once in two child processes",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default results/overhead.md (--long: results/overhead_long.md; --small: none)",
    )
    parser.add_argument("--worker-arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_arm:
        long_worker(args)
        return
    if args.long is not None:
        if args.long <= 0:
            parser.error("--long needs a positive number of steps")
        main_long(args, args.out or RESULTS / "overhead_long.md")
        return
    if args.small:
        args.size, args.pairs = "1M", 1
    measures = [m for m in args.measures.split(",") if m]
    unknown = set(measures) - set(SINGLE_MEASURES)
    if unknown:
        parser.error(f"unknown measures {sorted(unknown)}")
    out = args.out or (None if args.small else RESULTS / "overhead.md")
    every = GRID.every
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    dataset = lm_dataset(block_size=SIZES[args.size].n_positions)
    if args.warmup_steps:
        run_once(args, dataset, with_callback=False, steps=args.warmup_steps)
    pairs = []
    for index in range(args.pairs):
        without = run_once(args, dataset, with_callback=False, steps=args.steps)
        print(f"pair {index + 1}: without {without['seconds']:.1f} s", flush=True)
        with_ = run_once(args, dataset, with_callback=True, steps=args.steps)
        shown = ", ".join(f"{r['wall_seconds']:.1f}" for r in with_["rows"])
        print(f"pair {index + 1}: with {with_['seconds']:.1f} s (measurements {shown})", flush=True)
        pairs.append((without, with_))
    print(f"each measure alone, {every} steps later:", flush=True)
    singles = time_single_measures(pairs[-1][1], measures, every)

    reference = pairs[0][0]
    identical = all(
        all_params_equal(reference["params"], run["params"]) for pair in pairs for run in pair
    )
    step_seconds = median([without["seconds"] / args.steps for without, _ in pairs])
    warm_rows = [row for _, with_ in pairs for row in with_["rows"][1:]]
    cold_rows = [with_["rows"][0] for _, with_ in pairs if with_["rows"]]
    warm_forwards = [row["critical_num_forward"] for row in warm_rows]
    warm_seconds = statistics.mean(r["wall_seconds"] for r in warm_rows) if warm_rows else math.nan
    summary = {
        "steps": args.steps,
        "pairs": args.pairs,
        "ratio": median([w["seconds"] / wo["seconds"] for wo, w in pairs]),
        "implied": 1 + warm_seconds / (every * step_seconds),
        "warm_forwards_mean": statistics.mean(warm_forwards) if warm_forwards else math.nan,
        "warm_forwards_max": max(warm_forwards, default="–"),
        "warm_count": len(warm_forwards),
    }
    model = pairs[0][0]["trainer"].model
    size = SIZES[args.size]
    extra = [
        f"model: GPT-2 {args.size}, {num_params(model):,} parameters (n_embd {size.n_embd}, "
        f"n_layer {size.n_layer}, n_head {size.n_head}, vocab {size.vocab_size}), float32, "
        "dropout 0, random init",
        f"data: KJV bytes (`sharpmeter.data.lm_dataset`), batch {args.batch_size} x "
        f"{size.n_positions}; AdamW lr {args.lr:g} constant, max_grad_norm 1, seed {args.seed}; "
        "`Trainer(use_cpu=True, report_to=[], save_strategy='no', disable_tqdm=True)`",
        f"callback: `SharpnessCallback.attach(trainer, schedule=Schedule(every={every}))` (the "
        f"plain grid, no time budget), otherwise its defaults: measures "
        f"{', '.join(DEFAULT_MEASURES)}, probe of 8 training examples "
        f"({args.batch_size} x {size.n_positions} tokens), trace 8 HVPs, Lanczos <= 20 steps",
        f"{args.pairs} pair(s) of {args.steps}-step runs, alternating without / with, after an "
        f"untimed {args.warmup_steps}-step run; seconds: wall time of `trainer.train()`; "
        f"{args.threads} torch thread(s); whole benchmark "
        f"{(time.perf_counter() - started) / 60:.1f} min",
        f"training unchanged by the callback (final parameters bit-identical across all runs): "
        f"{'yes' if identical else 'NO'}",
    ]
    lines = header("Training overhead of SharpnessCallback", command_line(), extra)
    lines += targets_table(summary)
    lines += runs_table(pairs, args.steps)
    lines += measurements_table(pairs, step_seconds)
    lines += singles_table(singles, warm_rows, step_seconds, every)
    cold = statistics.mean(r["wall_seconds"] for r in cold_rows) if cold_rows else math.nan
    lines += [
        f"Median training step without the callback: {step_seconds:.3g} s. A measurement takes "
        f"{warm_seconds:.3g} s warm ({warm_seconds / step_seconds:.3g} steps), {cold:.3g} s cold.",
        "",
        "The default schedule's 5% budget over a long run: `results/overhead_long.md` "
        "(`overhead.py --long STEPS`).",
        "",
    ]
    print("\n".join(lines))
    if out is not None:
        save_markdown(out, lines)


if __name__ == "__main__":
    main()
