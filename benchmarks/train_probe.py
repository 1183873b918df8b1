"""Critical sharpness on the step's own training batch (``probe="train"``) against a fixed probe,
on the byte-level GPT-2 of ``benchmarks.overhead`` (issue 15's target: warm, <= 6 forwards, no
backward, <= 2.5 training steps on the 10.8M GPT-2).

A plain AdamW loop (batch 8 x block, gradient clipped to 1). Every ``--every`` steps, between the
backward and ``optimizer.step()``, both meters measure the same parameters side by side: the
training-batch meter on the step's batch with the step's gradient, the fixed-probe meter on 8
training examples drawn once (its own forward and backward for the probe gradient). Backward
passes are counted by a hook on the first parameter, which fires once per differentiation.

    python -m benchmarks.train_probe                  # 10M, writes results/train_probe.md
    python -m benchmarks.train_probe --size 1M --steps 12 --every 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import sharpmeter as sm
from benchmarks._common import (
    RESULTS,
    command_line,
    describe_gpt2,
    fmt,
    gpt2,
    header,
    markdown_table,
    median,
    num_params,
    save_markdown,
)
from benchmarks.overhead.training import SIZES
from sharpmeter.harness.data import lm_dataset
from sharpmeter.measure.loss import causal_lm_loss

MODES = ("train", "fixed")
# Issue 15's target for the training-batch mode, warm.
TARGET_FORWARDS, TARGET_STEPS = 6, 2.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="10M", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "train_probe.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    size = SIZES[args.size]
    model = gpt2(size).train()
    data = lm_dataset(block_size=size.n_positions)
    batches = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    probe = next(iter(batches))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    options = {"measures": ("critical",), "loss_fn": causal_lm_loss}
    meters = {
        "train": sm.SharpnessMeter(model, probe="train", **options),
        "fixed": sm.SharpnessMeter(model, probe, **options),
    }
    step_seconds, rows = [], {mode: [] for mode in MODES}
    for step, batch in zip(range(args.steps), _forever(batches), strict=False):
        start = time.perf_counter()
        optimizer.zero_grad()
        causal_lm_loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        step_seconds.append(time.perf_counter() - start)
        if step % args.every == 0:
            for mode, meter in meters.items():
                given = {"batch": batch} if mode == "train" else {}
                row, backwards = _measure(model, meter, step, optimizer, given)
                rows[mode].append({**row, "backwards": backwards})
        start = time.perf_counter()
        optimizer.step()
        step_seconds[-1] += time.perf_counter() - start
        print(f"step {step}: {step_seconds[-1]:.2f} s", flush=True)
    lines = _report(args, size, model, step_seconds, rows, time.perf_counter() - started)
    save_markdown(Path(args.out), lines)


def _forever(loader):
    while True:
        yield from loader


def _measure(model, meter, step, optimizer, given) -> tuple[dict, int]:
    calls = []
    handle = next(model.parameters()).register_hook(lambda grad: calls.append(1))
    try:
        row = meter.measure(step, optimizer, **given)
    finally:
        handle.remove()
    return row, len(calls)


def _report(args, size, model, step_seconds, rows, total) -> list[str]:
    # The first steps warm the allocator; the median of the rest is the training step.
    training = median(step_seconds[2:])
    table = []
    for mode in MODES:
        warm = rows[mode][1:]  # the first measurement starts cold, from the learning rate
        seconds = median([r["wall_seconds"] for r in warm])
        forwards = [r["critical_num_forward"] for r in warm]
        backwards = max(r["backwards"] for r in warm)
        statuses = ", ".join(sorted({r["critical_status"] for r in rows[mode]}))
        table.append(
            [
                mode,
                str(len(warm)),
                fmt(seconds),
                fmt(seconds / training),
                f"{median(forwards):g} ({max(forwards)})",
                str(backwards),
                statuses,
            ]
        )
    train = table[0]
    met_forwards = float(train[4].split()[0]) <= TARGET_FORWARDS and train[5] == "0"
    met_steps = float(train[3]) <= TARGET_STEPS
    extra = [
        describe_gpt2(size, num_params(model)),
        f"data: KJV bytes, batch {args.batch_size} x {size.n_positions}; AdamW lr 1e-3, gradient "
        f"clipped to 1; {args.steps} steps, both meters every {args.every} steps on the same "
        f"parameters; {args.threads} torch thread(s); whole benchmark {total / 60:.1f} min",
        f"median training step (forward, backward, clipping, AdamW): {fmt(training)} s",
    ]
    columns = ["probe", "warm rows", "s (median)", "x training step", "forwards: median (max)"]
    columns += ["backwards (max)", "statuses"]
    verdicts = [
        f"- training-batch mode, warm: <= {TARGET_FORWARDS} forwards and 0 backward: "
        f"{train[4]} forwards (median, max), {train[5]} backward "
        f"({'met' if met_forwards else 'NOT met'})",
        f"- training-batch mode, warm: <= {TARGET_STEPS} training steps: {train[3]} "
        f"({'met' if met_steps else 'NOT met'})",
        "",
    ]
    return (
        header("Critical sharpness on the training batch vs a fixed probe", command_line(), extra)
        + ["## Targets", ""]
        + verdicts
        + ["## Warm measurements", ""]
        + markdown_table(columns, table)
    )


if __name__ == "__main__":
    main()
