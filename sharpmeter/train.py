"""Train a GPT-2 with the sharpness callback: the recipe behind ``recipes/train_gpt.py`` and
each size of a study. Read top to bottom: data, model, trainer, callback, train.

Runs as it is under ``python`` (one process), ``accelerate launch --multi_gpu`` (DDP; on CPU
with ``use_cpu: true``, gloo) and on GPUs (``bf16: true``; training may use SDPA or flash
attention, measurements switch to the math kernel by themselves).

Example::

    model_args, data_args, sharpness_args, training_args = parse_config(["configs/tiny.yaml"])
    jsonl = train_gpt(model_args, data_args, sharpness_args, training_args)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import Trainer, TrainingArguments

from sharpmeter.config import DataArguments, ModelArguments, SharpnessArguments
from sharpmeter.data import TokenBlocks, lm_dataset
from sharpmeter.gpt import build_gpt
from sharpmeter.integrations.hf import SharpnessCallback
from sharpmeter.sinks import wandb_mode

DONE_FILE = "trainer_state.json"


def load_data(
    data_args: DataArguments, block_size: int, training_args: TrainingArguments
) -> TokenBlocks:
    """The corpus as token blocks; the main process tokenizes (and caches) first."""
    with training_args.main_process_first(desc="tokenizing the corpus"):
        return lm_dataset(
            data_args.corpus,
            block_size=block_size,
            tokenizer=data_args.tokenizer,
            vocab_size=data_args.vocab_size,
            cache_dir=data_args.cache_dir,
            text_column=data_args.text_column,
        )


def train_gpt(
    model_args: ModelArguments,
    data_args: DataArguments,
    sharpness_args: SharpnessArguments,
    training_args: TrainingArguments,
    dataset: TokenBlocks | None = None,
) -> Path:
    """Train one model; returns the path of its ``sharpness.jsonl``.

    ``dataset`` skips loading when the caller already holds the tokenized corpus (a study
    trains every size on the same one)."""
    if model_args.size is None:
        raise ValueError("model_args.size is required: name a model size")
    if dataset is None:
        dataset = load_data(data_args, model_args.block_size, training_args)
    model = build_gpt(
        model_args.size,
        vocab_size=dataset.vocab_size,
        block_size=model_args.block_size,
        dropout=model_args.dropout,
        attn_implementation=model_args.attn_implementation,
    )
    _start_wandb(training_args, {**vars(model_args), **vars(data_args), **vars(sharpness_args)})

    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    SharpnessCallback.attach(
        trainer,
        measures=tuple(sharpness_args.measures),
        schedule=sharpness_args.schedule(),
        probe_size=sharpness_args.probe_size,
        probe_seed=sharpness_args.probe_seed,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()  # trainer_state.json marks the run as finished (see is_finished)
    _finish_wandb()
    return Path(training_args.output_dir) / "sharpness.jsonl"


def is_finished(output_dir: str | Path, max_steps: int) -> bool:
    """Whether a run in ``output_dir`` trained all of ``max_steps``."""
    path = Path(output_dir) / DONE_FILE
    return path.is_file() and json.loads(path.read_text()).get("global_step") == max_steps


def _start_wandb(training_args: TrainingArguments, config: dict) -> None:
    """Start the W&B run the Trainer's ``WandbCallback`` will log into: offline without
    credentials (never a prompt), in the output folder beside the JSONL. ``WANDB_DIR`` would
    not do: W&B reads it once per process, and a study trains several runs in one."""
    if "wandb" not in (training_args.report_to or []) or training_args.process_index != 0:
        return
    import wandb

    Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
    wandb.init(
        project=os.environ.get("WANDB_PROJECT", "sharpmeter"),
        name=training_args.run_name,
        dir=training_args.output_dir,
        mode=wandb_mode(),
        config=config,
    )


def _finish_wandb() -> None:
    # A study trains several sizes in one process: each needs a run of its own.
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
