"""The byte-level GPT-2s, the Hugging Face Trainer that trains them, and training past it."""

from __future__ import annotations

import argparse

import torch

from benchmarks._common import GPT2Size, gpt2
from sharpmeter.harness.data import BYTE_VOCAB

# Byte-level GPT-2s (vocabulary 256: the KJV bytes); n_positions is the block size trained on.
SIZES = {
    "10M": GPT2Size("10M", vocab_size=BYTE_VOCAB, n_embd=384, n_layer=6, n_head=6, n_positions=256),
    "1M": GPT2Size("1M", vocab_size=BYTE_VOCAB, n_embd=128, n_layer=4, n_head=4, n_positions=128),
}


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
