"""Short runs without and with the callback on the plain every-10 grid, alternating in this
process, then each measure alone; writes ``results/overhead.md``."""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import sharpmeter as sm
from benchmarks._common import (
    command_line,
    describe_gpt2,
    header,
    median,
    num_params,
    save_markdown,
)
from benchmarks.overhead.tables import (
    measurements_table,
    runs_table,
    singles_table,
    targets_table,
)
from benchmarks.overhead.training import SIZES, continue_training, make_trainer
from sharpmeter.harness.data import lm_dataset
from sharpmeter.integrations.hf import SharpnessCallback
from sharpmeter.measure.options import MeterOptions
from sharpmeter.paper.records import read_records

# The fixed grid this table measures: the meter's default adds a 5% wall-time budget on top,
# which caps the long-run ratio at 1.05 by skipping due steps; the grid shows the raw cost.
GRID = sm.Schedule(every=10)
# What the callback measures by default, then the two optional measures.
SINGLE_MEASURES = ("critical", "trace", "spectral", "directional", "preconditioned")


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
            trainer.model, meter.probe_batch, options=meter.options, measures=(measure,)
        )
        # The line search's warm start as the callback's next measurement would have it.
        single.warm.eta_c = meter.warm.eta_c
        row = single.measure(step, optimizer=trainer.optimizer)
        results[measure] = row
        print(f"  {measure:<15} {row['wall_seconds']:7.2f} s  status {row['status']}", flush=True)
    return results


def all_params_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def run_pairs(args: argparse.Namespace, dataset) -> list[tuple[dict, dict]]:
    """An untimed warm-up run, then ``args.pairs`` pairs of runs: without, then with."""
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
    return pairs


def mean_seconds(rows: list[dict]) -> float:
    """Mean ``wall_seconds`` of JSONL rows (NaN without any)."""
    return statistics.mean(r["wall_seconds"] for r in rows) if rows else math.nan


def summarise(
    args: argparse.Namespace,
    pairs: list[tuple[dict, dict]],
    warm_rows: list[dict],
    step_seconds: float,
) -> dict:
    """What the targets are judged on: the ratio per pair, implied long-run ratio, forwards."""
    warm_forwards = [row["critical_num_forward"] for row in warm_rows]
    return {
        "steps": args.steps,
        "pairs": args.pairs,
        "ratio": median([w["seconds"] / wo["seconds"] for wo, w in pairs]),
        "implied": 1 + mean_seconds(warm_rows) / (GRID.every * step_seconds),
        "warm_forwards_mean": statistics.mean(warm_forwards) if warm_forwards else math.nan,
        "warm_forwards_max": max(warm_forwards, default="–"),
        "warm_count": len(warm_forwards),
    }


def preamble(args: argparse.Namespace, pairs: list[tuple[dict, dict]], started: float) -> list[str]:
    """The setup lines of ``results/overhead.md``, and whether training stayed bit-identical."""
    reference = pairs[0][0]
    identical = all(
        all_params_equal(reference["params"], run["params"]) for pair in pairs for run in pair
    )
    model = reference["trainer"].model
    size = SIZES[args.size]
    return [
        f"{describe_gpt2(size, num_params(model))}, random init",
        f"data: KJV bytes (`sharpmeter.harness.data.lm_dataset`), batch {args.batch_size} x "
        f"{size.n_positions}; AdamW lr {args.lr:g} constant, max_grad_norm 1, seed {args.seed}; "
        "`Trainer(use_cpu=True, report_to=[], save_strategy='no', disable_tqdm=True)`",
        f"callback: `SharpnessCallback.attach(trainer, schedule=Schedule(every={GRID.every}))` "
        f"(the plain grid, no time budget), otherwise its defaults: measures "
        f"{', '.join(MeterOptions().measures)}, probe of 8 training examples "
        f"({args.batch_size} x {size.n_positions} tokens), trace 8 HVPs, Lanczos <= "
        f"{sm.MeterOptions().lanczos_max_iter} steps",
        f"{args.pairs} pair(s) of {args.steps}-step runs, alternating without / with, after an "
        f"untimed {args.warmup_steps}-step run; seconds: wall time of `trainer.train()`; "
        f"{args.threads} torch thread(s); whole benchmark "
        f"{(time.perf_counter() - started) / 60:.1f} min",
        f"training unchanged by the callback (final parameters bit-identical across all runs): "
        f"{'yes' if identical else 'NO'}",
    ]


def main_short(args: argparse.Namespace, measures: list[str], out: Path | None) -> None:
    """The short runs, then ``measures`` each alone; writes ``out`` (None: print only)."""
    every = GRID.every
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dataset = lm_dataset(block_size=SIZES[args.size].n_positions)
    pairs = run_pairs(args, dataset)
    print(f"each measure alone, {every} steps later:", flush=True)
    singles = time_single_measures(pairs[-1][1], measures, every)

    step_seconds = median([without["seconds"] / args.steps for without, _ in pairs])
    warm_rows = [row for _, with_ in pairs for row in with_["rows"][1:]]
    cold_rows = [with_["rows"][0] for _, with_ in pairs if with_["rows"]]
    warm_seconds, cold = mean_seconds(warm_rows), mean_seconds(cold_rows)
    extra = preamble(args, pairs, started)
    lines = header("Training overhead of SharpnessCallback", command_line(), extra)
    lines += targets_table(summarise(args, pairs, warm_rows, step_seconds))
    lines += runs_table(pairs, args.steps)
    lines += measurements_table(pairs, step_seconds)
    lines += singles_table(singles, warm_rows, step_seconds, every)
    lines += [
        f"Median training step without the callback: {step_seconds:.3g} s. A measurement takes "
        f"{warm_seconds:.3g} s warm ({warm_seconds / step_seconds:.3g} steps), {cold:.3g} s cold.",
        "",
        "The default schedule's 5% budget over a long run: `results/overhead_long.md` "
        "(`python -m benchmarks.overhead --long STEPS`).",
        "",
    ]
    print("\n".join(lines))
    if out is not None:
        save_markdown(out, lines)
