"""A hand-written training loop under ``accelerate`` with sharpmeter measuring on schedule.

    python examples/accelerate_loop.py                                   # one process
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py   # two CPU ranks

On a machine without GPUs the loop asks for the CPU itself (``Accelerator(cpu=True)``); with
``--multi_gpu`` and two processes that gives two gloo ranks, each training on half of every
batch and measuring half of the probe. The rows (runs/accelerate/sharpness.jsonl) are the
same as one process's.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import sharpmeter as sm
from sharpmeter.harness.data import BYTE_VOCAB, lm_dataset
from sharpmeter.harness.gpt import build_gpt
from sharpmeter.integrations.accelerate import AcceleratedMeter


def main() -> None:
    parser = argparse.ArgumentParser(description="accelerate loop with sharpmeter")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch size")
    parser.add_argument("--output", default="runs/accelerate")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(0)
    # n_embd 32, 2 layers, 2 heads; dropout as GPT-2's default
    model = build_gpt("small", vocab_size=BYTE_VOCAB, block_size=64, dropout=0.1)
    data = lm_dataset(block_size=64)
    probe = torch.utils.data.default_collate([data[i] for i in range(8)])
    train = torch.utils.data.Subset(data, range(8, len(data)))
    loader = torch.utils.data.DataLoader(
        train, batch_size=args.batch_size // accelerator.num_processes, shuffle=False
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    meter = AcceleratedMeter(
        accelerator,
        model,
        probe,
        jsonl_path=f"{args.output}/sharpness.jsonl",
        schedule=sm.Schedule(every=args.every),
        max_steps=args.steps,  # the planned length: a run killed midway is seen as such
        optimizer=optimizer,
        # Lanczos (cold every row) on the untrained model needs more than the default 30 HVPs
        # to reach its 1e-3 residual.
        lanczos_max_iter=40,
    )
    meter.step(0, optimizer)  # at initialisation, before the first update
    model.train()
    for step, batch in enumerate(loader, start=1):
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        row = meter.step(step, optimizer)
        if row is not None:
            accelerator.print(
                f"step {step}: lambda_c {row['critical_sharpness']:.4g}, "
                f"lambda_max {row['lambda_max']:.4g}, trace {row['hessian_trace']:.4g}"
            )
        if step == args.steps:
            break
    meter.close()


if __name__ == "__main__":
    main()
