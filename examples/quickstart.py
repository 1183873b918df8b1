"""Train a small byte-level GPT-2 on the KJV Bible with the Hugging Face Trainer and watch its
sharpness: critical sharpness along the AdamW update, Hessian trace and top eigenvalue.

    python examples/quickstart.py            # ~2 minutes on 2 CPU cores

Writes runs/quickstart/sharpness.jsonl (one row per measurement) and an offline W&B run under
runs/quickstart/wandb (upload it later with `wandb sync`), and prints the curve.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from transformers import Trainer, TrainingArguments, set_seed

import sharpmeter as sm
from sharpmeter.harness.data import BYTE_VOCAB, lm_dataset
from sharpmeter.harness.gpt import build_gpt
from sharpmeter.integrations.hf import SharpnessCallback
from sharpmeter.measure.sinks import wandb_report_to


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10, help="measure every n steps")
    parser.add_argument("--output", default="runs/quickstart")
    args = parser.parse_args()

    output = Path(args.output)
    os.environ.setdefault("WANDB_DIR", str(output))
    os.environ.setdefault("WANDB_PROJECT", "sharpmeter-quickstart")
    # The Trainer seeds when it is built, after the model: seed the initial weights here.
    set_seed(0)
    # n_embd 64, 2 layers, 4 heads; dropout as GPT-2's default, to show the measurement copes
    model = build_gpt("medium", vocab_size=BYTE_VOCAB, block_size=128, dropout=0.1)
    training = TrainingArguments(
        output_dir=str(output),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        warmup_steps=20,
        logging_steps=10,
        save_strategy="no",
        report_to=wandb_report_to(),
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=lm_dataset(block_size=128))
    SharpnessCallback.attach(trainer, schedule=sm.Schedule(every=args.every), probe_size=16)
    trainer.train()

    rows = [json.loads(line) for line in (output / "sharpness.jsonl").read_text().splitlines()]
    print(f"\n{sum(p.numel() for p in model.parameters()):,} parameters; rows in {output}")
    print(
        f"{'step':>5} {'loss':>7} {'lambda_c':>9} {'lr*lc/2':>8} {'lambda_max':>11} "
        f"{'trace +- stderr':>20}"
    )
    for r in rows:
        print(
            f"{r['step']:>5} {fmt(r['loss'])} {fmt(r['critical_sharpness'], 9)} "
            f"{fmt(r['stability_ratio'], 8)} {fmt(r['lambda_max'], 11)} "
            f"{fmt(r['hessian_trace'], 10)} +- {fmt(r['hessian_trace_stderr'], 6)}"
        )


def fmt(value: float | None, width: int = 7) -> str:
    if value is None or not math.isfinite(value):
        return f"{'-':>{width}}"
    return f"{value:>{width}.4g}"


if __name__ == "__main__":
    main()
