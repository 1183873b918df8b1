"""Critical sharpness on the step's own training batch (``probe="train"``) against a fixed probe,
on the byte-level GPT-2 of ``benchmarks.overhead`` (issue 15's target: warm, <= 6 forwards, no
backward, <= 2.5 training steps on the 10.8M GPT-2).

A plain AdamW loop (batch 8 x block, gradient clipped to 1). Every ``--every`` steps, between the
backward and ``optimizer.step()``, four meters measure the same parameters side by side: on the
step's batch with the step's gradient (training-batch mode) or on 8 training examples drawn once
(its own forward and backward for the probe gradient), each with the line search's predicted
steps (the default) and without them (``critical_predictions=0``: doubling and bisection).
Backward passes are counted by a hook on the first parameter, which fires once per
differentiation.

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
from sharpmeter.measure.linesearch import PREDICTIONS
from sharpmeter.measure.loss import causal_lm_loss

MODES = ("train", "fixed")
SEARCHES = {"predicted": PREDICTIONS, "plain": 0}  # critical_predictions of each meter
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
        (mode, search): sm.SharpnessMeter(
            model, None if mode == "train" else probe, probe=mode, critical_predictions=n, **options
        )
        for mode in MODES
        for search, n in SEARCHES.items()
    }
    step_seconds, rows = [], {key: [] for key in meters}
    for step, batch in zip(range(args.steps), _forever(batches), strict=False):
        start = time.perf_counter()
        optimizer.zero_grad()
        causal_lm_loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        step_seconds.append(time.perf_counter() - start)
        if step % args.every == 0:
            for (mode, search), meter in meters.items():
                given = {"batch": batch} if mode == "train" else {}
                row, backwards = _measure(model, meter, step, optimizer, given)
                rows[mode, search].append({**row, "backwards": backwards})
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
    for (mode, search), measured in rows.items():
        warm = measured[1:]  # the first measurement starts cold, from the learning rate
        seconds = median([r["wall_seconds"] for r in warm])
        forwards = [r["critical_num_forward"] for r in warm]
        backwards = max(r["backwards"] for r in warm)
        statuses = ", ".join(sorted({r["critical_status"] for r in measured}))
        table.append(
            [
                mode,
                search,
                str(len(warm)),
                fmt(seconds),
                fmt(seconds / training),
                f"{median(forwards):g} ({max(forwards)})",
                str(backwards),
                statuses,
            ]
        )
    train = table[0]  # training-batch mode, predicted steps: the default the targets are for
    met_forwards = float(train[5].split()[0]) <= TARGET_FORWARDS and train[6] == "0"
    met_steps = float(train[4]) <= TARGET_STEPS
    extra = [
        describe_gpt2(size, num_params(model)),
        f"data: KJV bytes, batch {args.batch_size} x {size.n_positions}; AdamW lr 1e-3, gradient "
        f"clipped to 1; {args.steps} steps, the four meters every {args.every} steps on the same "
        f"parameters; {args.threads} torch thread(s); whole benchmark {total / 60:.1f} min",
        f"median training step (forward, backward, clipping, AdamW): {fmt(training)} s",
    ]
    columns = ["probe", "search", "warm rows", "s (median)", "x training step"]
    columns += ["forwards: median (max)", "backwards (max)", "statuses"]
    verdicts = [
        f"- training-batch mode, warm: <= {TARGET_FORWARDS} forwards and 0 backward: "
        f"{train[5]} forwards (median, max), {train[6]} backward "
        f"({'met' if met_forwards else 'NOT met'})",
        f"- training-batch mode, warm: <= {TARGET_STEPS} training steps: {train[4]} "
        f"({'met' if met_steps else 'NOT met'})",
        *(
            f"- {mode} probe, warm forwards in all, predicted / plain: {_ratio(rows, mode)}"
            for mode in MODES
        ),
        "",
    ]
    return (
        header("Critical sharpness on the training batch vs a fixed probe", command_line(), extra)
        + ["## Targets", ""]
        + verdicts
        + ["## Warm measurements", ""]
        + markdown_table(columns, table)
        + ["", "## Each measurement: forwards and critical sharpness", ""]
        + _rows_table(rows)
    )


def _ratio(rows, mode: str) -> str:
    predicted, plain = (sum(r["critical_num_forward"] for r in rows[mode, s][1:]) for s in SEARCHES)
    return f"{predicted} / {plain} = {predicted / plain:.2f}"


def _rows_table(rows) -> list[str]:
    keys = list(rows)
    columns = ["step"] + [f"{mode} {search}" for mode, search in keys]
    table = [
        [str(measured[0]["step"])]
        + [f"{r['critical_num_forward']}: {fmt(r['critical_sharpness'])}" for r in measured]
        for measured in zip(*(rows[key] for key in keys), strict=True)
    ]
    return markdown_table(columns, table)


if __name__ == "__main__":
    main()
