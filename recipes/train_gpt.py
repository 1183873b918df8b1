"""Train one GPT-2 with the sharpness callback; every option comes from a YAML config and can
be overridden as ``--key value`` (see sharpmeter/harness/config.py for the keys).

    python recipes/train_gpt.py configs/tiny.yaml
    python recipes/train_gpt.py configs/tiny.yaml --max_steps 200 --learning_rate 1e-3
    accelerate launch --multi_gpu --num_processes 2 recipes/train_gpt.py configs/tiny.yaml
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml \
        recipes/train_gpt.py configs/gpt_gpu.yaml

The second line runs two CPU ranks over gloo (the config's ``use_cpu: true`` picks the CPU;
``accelerate launch --cpu`` would start one process). The curve goes to
``<output_dir>/sharpness.jsonl`` and, with ``report_to: wandb``, into a W&B run in the same
folder (offline without a key: ``wandb sync <output_dir>/wandb/offline-run-*``). A run owns
its output_dir while it trains: a second one started there stops with one line naming the lock
(``<output_dir>/sharpmeter.lock``); under ``accelerate launch`` every rank stops. A folder
holding a finished run with other settings is refused too (remove its
``sharpmeter_run.json`` to replace it); a rerun there moves the earlier JSONL aside
(``sharpness.1.jsonl``).
``--resume_from_checkpoint`` takes a checkpoint folder, or ``true`` for the last one in
output_dir.
"""

import sys

from sharpmeter.harness.config import parse_config
from sharpmeter.harness.data import CorpusError
from sharpmeter.harness.runlock import RunLockedError
from sharpmeter.harness.train import DoneMarkerError, FinishedRunError, train_gpt


def main(argv: list[str]) -> None:
    try:
        model_args, data_args, sharpness_args, training_args = parse_config(argv)
    except ValueError as error:  # a bad config: say what is wrong, before any training
        sys.exit(f"train_gpt.py: error: {error}")
    try:
        jsonl = train_gpt(model_args, data_args, sharpness_args, training_args)
    # The output folder is taken (and its finished run kept) and the corpus read before any
    # training: one line too; so is a training that finished but could not be marked (the
    # message says how to recover).
    except (CorpusError, RunLockedError, FinishedRunError, DoneMarkerError) as error:
        sys.exit(f"train_gpt.py: error: {error}")
    if training_args.process_index == 0:
        print(f"sharpness curve: {jsonl}")


if __name__ == "__main__":
    main(sys.argv[1:])
