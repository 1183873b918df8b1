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
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from sharpmeter.harness.config import DataArguments, ModelArguments, SharpnessArguments
from sharpmeter.harness.data import TokenBlocks, lm_dataset
from sharpmeter.harness.gpt import build_gpt
from sharpmeter.harness.runlock import rank_zero_lock
from sharpmeter.integrations.hf import SharpnessCallback
from sharpmeter.measure.files import atomic_write_text
from sharpmeter.measure.schema import DONE_FILE, HELDOUT_FILE, RUN_FILE
from sharpmeter.measure.sinks import start_wandb_run

# ``resume_from_checkpoint: true``: resume from the run's own last checkpoint (if any).
RESUME_LAST = "true"
# Where the W&B runs of earlier attempts go when a run starts again from scratch: out of
# ``wandb/*run-*``, which ``wandb sync`` and the report read.
EARLIER_WANDB_RUNS = Path("wandb") / "earlier"

# TrainingArguments that cannot change a run's numbers (its weights, its measurements): a
# finished run is compared without them, so changing one does not train it again. Only what
# certainly changes nothing is here; anything that touches the data, the model, the optimizer,
# the devices or the order of random draws (even dataloader workers, compilation) is compared.
_NOT_SHAPING = {
    # Where the run writes and what it resumes from: a resumed run continues the same numbers.
    "output_dir",
    "logging_dir",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    # How often and where the Trainer reports its log: logging reads the loss and the learning
    # rate after the step, draws nothing at random; the sharpness rows do not depend on it.
    "logging_strategy",
    "logging_steps",
    "logging_first_step",
    "logging_nan_inf_filter",
    "log_on_each_node",
    "log_level",
    "log_level_replica",
    "disable_tqdm",
    "report_to",
    "run_name",
    "project",
    "trackio_space_id",
    "trackio_bucket_id",
    "trackio_static_space_id",
    # Checkpoints: a save copies the weights, optimizer and RNG states, and changes none.
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "save_on_each_node",
    "save_only_model",
    # Publishing to the Hub happens after the numbers are made.
    "push_to_hub",
    "hub_model_id",
    "hub_strategy",
    "hub_token",
    "hub_private_repo",
    "hub_always_push",
    "hub_revision",
}


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
    trains every size on the same one). The run owns ``output_dir`` while it trains
    (:mod:`sharpmeter.harness.runlock`; rank 0 holds the lock): a second run started on it
    meanwhile raises :class:`~sharpmeter.harness.runlock.RunLockedError` on every rank, before
    anything is read or written. A done marker an earlier run left there is removed first and
    written again only when this training ends normally, so that a run killed midway is never
    taken for finished. A finished run with other settings is not replaced unless its marker
    is removed (:data:`DONE_FILE`); an earlier run's JSONL is moved aside
    (``sharpness.1.jsonl``), and so are the W&B runs of an attempt started over from scratch
    (into ``wandb/earlier/``). ``resume_from_checkpoint`` is a checkpoint folder (anywhere), or
    ``true``: the last checkpoint in ``output_dir``, if any (else training starts from scratch).

    Raises:
        FinishedRunError: ``output_dir`` holds a finished run with other settings, or a done
            marker that cannot be read (one line; before anything is written).
        DoneMarkerError: training finished but its held-out loss or its marker could not be
            written (a full disk).
    """
    if model_args.size is None:
        raise ValueError("model_args.size is required: name a model size")
    # Before anything is read or written: a second run on this folder is refused here.
    with rank_zero_lock(training_args.output_dir, training_args.process_index):
        return _train_in_owned_folder(model_args, data_args, sharpness_args, training_args, dataset)


def _train_in_owned_folder(
    model_args: ModelArguments,
    data_args: DataArguments,
    sharpness_args: SharpnessArguments,
    training_args: TrainingArguments,
    dataset: TokenBlocks | None,
) -> Path:
    """:func:`train_gpt` once its output folder is this run's alone."""
    config = run_config(model_args, data_args, sharpness_args, training_args)
    _refuse_to_replace_another_finished_run(training_args.output_dir, config)
    checkpoint = resume_checkpoint(training_args)
    if training_args.process_index == 0:
        # Before the callback opens the JSONL: the old run's marker (and held-out loss) must
        # not outlive it, nor the W&B run of an attempt this one starts over.
        for name in (DONE_FILE, HELDOUT_FILE):
            (Path(training_args.output_dir) / name).unlink(missing_ok=True)
        if checkpoint is None:
            _move_earlier_wandb_runs_aside(training_args.output_dir)
    if dataset is None:
        dataset = load_data(data_args, model_args.block_size, training_args)
    heldout = None
    if data_args.heldout_blocks:
        dataset, heldout = dataset.split_tail(data_args.heldout_blocks)
    # The Trainer seeds only when it is built, after the model: seed here so that `seed` sets
    # the initial weights too, whatever ran before (a study's earlier sizes, a resume).
    set_seed(training_args.seed)
    model = build_gpt(
        model_args.size,
        vocab_size=dataset.vocab_size,
        block_size=model_args.block_size,
        dropout=model_args.dropout,
        attn_implementation=model_args.attn_implementation,
    )
    _start_wandb(training_args, config)

    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    SharpnessCallback.attach(trainer, options=sharpness_args.meter_options())
    exit_code = 1  # what W&B records for a run that raised
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
        exit_code = 0
    except KeyboardInterrupt:
        exit_code = 255  # wandb's own code for an interrupted run
        raise
    finally:
        _finish_wandb(exit_code)
    jsonl = Path(training_args.output_dir) / RUN_FILE
    if training_args.process_index == 0:
        _write_end_files(training_args.output_dir, config, jsonl, trainer.model, heldout)
    return jsonl


def resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """What the run resumes from: ``resume_from_checkpoint`` as given (a checkpoint folder,
    anywhere), or for ``true`` the last checkpoint in the run's own ``output_dir`` (None: it
    has none yet, and the run starts from scratch)."""
    given = training_args.resume_from_checkpoint
    if given is None or given.strip().lower() != RESUME_LAST:
        return given
    folder = training_args.output_dir
    return get_last_checkpoint(folder) if os.path.isdir(folder) else None


class FinishedRunError(ValueError):
    """The output folder holds a finished run that training there would replace: one with
    other settings, or a marker that cannot be read."""


def _refuse_to_replace_another_finished_run(output_dir: str, config: dict[str, Any]) -> None:
    """:func:`is_finished`'s refusal, with how to replace the run on purpose (every rank reads
    the marker, so every rank refuses)."""
    try:
        is_finished(output_dir, config)
    except FinishedRunError as error:
        marker = Path(output_dir) / DONE_FILE
        raise FinishedRunError(f"{error} (to replace it, remove {marker})") from None


def _move_earlier_wandb_runs_aside(output_dir: str) -> None:
    """A run started again from scratch (after a kill) must not leave the killed attempt's
    W&B run where ``wandb sync <output_dir>/wandb/*run-*`` would upload it beside this one's:
    it goes to :data:`EARLIER_WANDB_RUNS`, kept."""
    earlier = [path for path in Path(output_dir).glob("wandb/*run-*") if path.is_dir()]
    if not earlier:
        return
    aside = Path(output_dir) / EARLIER_WANDB_RUNS
    aside.mkdir(parents=True, exist_ok=True)
    for path in earlier:
        os.replace(path, aside / path.name)


# Blocks per forward when the held-out loss is taken: a few MB of activations at these sizes.
HELDOUT_BATCH = 16


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, blocks: TokenBlocks) -> float:
    """The mean next-token loss per token of ``blocks`` under ``model`` in eval mode (every
    block has the same number of loss tokens, so the mean of the batches' means, weighted by
    their block counts)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    try:
        for start in range(0, len(blocks), HELDOUT_BATCH):
            ids = blocks.blocks[start : start + HELDOUT_BATCH].to(device)
            total += float(model(input_ids=ids, labels=ids).loss) * len(ids)
    finally:
        model.train(was_training)
    return total / len(blocks)


def write_heldout_loss(output_dir: str | Path, model: torch.nn.Module, blocks: TokenBlocks) -> Path:
    """:data:`~sharpmeter.measure.schema.HELDOUT_FILE` in ``output_dir``: the loss of the
    held-out ``blocks`` at the end of training, what the paper side's flatter-is-better claim
    reads as generalization."""
    path = Path(output_dir) / HELDOUT_FILE
    tokens = len(blocks) * (blocks.blocks.shape[1] - 1)
    record = {"loss": heldout_loss(model, blocks), "blocks": len(blocks), "tokens": tokens}
    atomic_write_text(path, json.dumps(record, indent=1))
    return path


class DoneMarkerError(OSError):
    """Training finished, but a file of its end (the held-out loss, the marker saying it
    finished) could not be written (a full disk)."""


def _write_end_files(
    output_dir: str | Path,
    config: dict[str, Any],
    jsonl: Path,
    model: torch.nn.Module,
    heldout: TokenBlocks | None,
) -> None:
    """The held-out loss (when blocks were held out), then the done marker (a finished run
    always has its held-out loss), each failing in one line that says what is safe and what
    is not: without the marker the next run trains this one again."""
    writes = [(DONE_FILE, lambda: write_done_marker(output_dir, config))]
    if heldout is not None:
        writes.insert(0, (HELDOUT_FILE, lambda: write_heldout_loss(output_dir, model, heldout)))
    for name, write in writes:
        try:
            write()
        except OSError as error:
            raise DoneMarkerError(
                f"training finished and {jsonl} is intact, but {Path(output_dir) / name} "
                f"could not be written ({error}), so the run is not marked finished; free "
                "space and rerun: the run is then trained again, its JSONL moved aside "
                "(sharpness.1.jsonl)"
            ) from error


def write_done_marker(output_dir: str | Path, config: dict[str, Any]) -> Path:
    """Marks ``output_dir`` as holding a run finished with ``config``: written whole or not at
    all (a full disk must not leave an empty marker that every later study trips on).

    Example::

        write_done_marker("runs/tiny", run_config(*arguments))   # runs/tiny/sharpmeter_run.json
    """
    path = Path(output_dir) / DONE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(config, indent=1))
    return path


def run_config(
    model_args: ModelArguments,
    data_args: DataArguments,
    sharpness_args: SharpnessArguments,
    training_args: TrainingArguments,
) -> dict[str, Any]:
    """Everything that shapes a run, JSON-able: what a finished run is compared against."""
    training = {k: v for k, v in training_args.to_dict().items() if k not in _NOT_SHAPING}
    config = {**vars(model_args), **vars(data_args), **vars(sharpness_args), **training}
    return json.loads(json.dumps(config, default=str))


def is_finished(output_dir: str | Path, config: dict[str, Any]) -> bool:
    """Whether ``output_dir`` holds a run finished with ``config``.

    Raises:
        FinishedRunError: it holds a finished run with another config (reusing it would report
            numbers of a run that is not the one asked for), or a marker that cannot be read
            (one line naming it: removing it trains the run again).
    """
    path = Path(output_dir) / DONE_FILE
    if not path.is_file():
        return False
    done = _read_done_marker(path)
    # Markers written before a setting was known not to shape runs may still list it.
    done = {k: v for k, v in done.items() if k not in _NOT_SHAPING}
    changed = sorted(k for k in config.keys() | done.keys() if config.get(k) != done.get(k))
    if changed:
        raise FinishedRunError(
            f"{output_dir} holds a finished run with other settings ({', '.join(changed)}); "
            "use another output_dir or remove it"
        )
    return True


def _read_done_marker(path: Path) -> dict[str, Any]:
    """The config a done marker holds (ValueError in one line if it holds none)."""
    data = b""
    try:
        data = path.read_bytes()
        done = json.loads(data.decode("utf-8"))
    except (OSError, ValueError) as error:  # ValueError: not UTF-8 or not JSON
        empty = isinstance(error, ValueError) and not data.strip()
        problem = "it is empty" if empty else " ".join(str(error).split())
    else:
        if isinstance(done, dict):
            return done
        problem = f"it holds a JSON {type(done).__name__}, not an object"
    raise FinishedRunError(
        f"the run marker {path} cannot be read ({problem}): remove it to train this run again"
    )


def _start_wandb(training_args: TrainingArguments, config: dict) -> None:
    """Start the W&B run the Trainer's ``WandbCallback`` will log into: offline without
    credentials (never a prompt) or when it cannot start online, in the output folder beside
    the JSONL. ``WANDB_DIR`` would not do: W&B reads it once per process, and a study trains
    several runs in one."""
    if "wandb" not in (training_args.report_to or []) or training_args.process_index != 0:
        return
    Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
    start_wandb_run(
        project=os.environ.get("WANDB_PROJECT", "sharpmeter"),
        name=training_args.run_name,
        dir=training_args.output_dir,
        config=config,
    )


def _finish_wandb(exit_code: int) -> None:
    """End the run with how training ended (0, or non-zero for a run that raised: W&B then
    shows it failed). A study trains several sizes in one process: each needs a run of its
    own."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)
