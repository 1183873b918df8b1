"""Run and study configs: one flat YAML file, overridable on the command line.

Every option of a run lives in one of four dataclasses (model, data, sharpness, and
transformers' own ``TrainingArguments``); a study adds :class:`StudyArguments`. A YAML file
gives their values by field name, and ``--name value`` after it overrides any of them, as
transformers' ``HfArgumentParser`` reads them::

    # configs/tiny.yaml
    size: tiny
    corpus: kjv
    max_steps: 60
    output_dir: runs/tiny

    python recipes/train_gpt.py configs/tiny.yaml --learning_rate 1e-3 --max_steps 100

A config file that is not YAML, a key the dataclasses do not know, a missing required key
(``size``), an unknown model size, a block longer than the model's positions, a corpus path
that does not exist (or a folder without ``.txt`` files), a learning rate or ``max_steps``
that is not positive, a batch size below 1, a value of the wrong type (``max_steps: 1e3``,
``every: true``, named with its key and the file or command line it came from), a list of
lists, an ``output_dir`` that is empty or cannot be written, a probe too large for memory, a
Hessian-vector-product measure on a model FSDP will shard: each is a one-line ValueError
before any training starts. (The corpus itself is read later, still before training: see
:class:`sharpmeter.harness.data.CorpusError`.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments

from sharpmeter.harness.data import TOKENIZERS, check_block_size, check_corpus, checked_vocab_size
from sharpmeter.harness.gpt import check_positions, check_size, probe_memory_bytes
from sharpmeter.measure.checks import check_positive_int
from sharpmeter.measure.distributed import NO_FSDP_HVP
from sharpmeter.measure.measures import HVP_MEASURES, MEASURES
from sharpmeter.measure.options import FORWARD_SCHEDULE, HVP_SCHEDULE, MeterOptions
from sharpmeter.measure.schedule import Schedule

# The meter's defaults: a config that wants others says so in its YAML file.
DEFAULTS = MeterOptions()


@dataclass
class ModelArguments:
    """The GPT-2 to build (see :mod:`sharpmeter.harness.gpt` for the named sizes)."""

    # Required in a run config (parse_config checks it); a study config names its sizes instead.
    size: str | None = field(
        default=None, metadata={"help": "a named model size, e.g. tiny or d768-l12"}
    )
    block_size: int = field(default=64, metadata={"help": "context length in tokens"})
    dropout: float = field(default=0.0, metadata={"help": "dropout of the model while training"})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "attention for training: sdpa, eager, flash_attention_2"}
    )

    def __post_init__(self) -> None:
        if self.size is not None:
            check_size(self.size)
        check_block_size(self.block_size)
        check_positions(self.block_size)


@dataclass
class DataArguments:
    """The corpus and its tokenizer (see :mod:`sharpmeter.harness.data`)."""

    corpus: str = field(
        default="kjv", metadata={"help": "kjv, a local text file or folder, or a datasets name"}
    )
    tokenizer: str = field(default="byte", metadata={"help": f"one of {TOKENIZERS}"})
    vocab_size: int | None = field(default=None, metadata={"help": "BPE vocabulary size"})
    text_column: str = field(default="text", metadata={"help": "text column of a dataset"})
    cache_dir: str | None = field(default=None, metadata={"help": "tokenizer and token cache"})
    heldout_blocks: int = field(
        default=0,
        metadata={
            "help": "blocks at the corpus' end kept out of training; their loss at the end is "
            "the run's held-out loss (0: none)"
        },
    )

    def __post_init__(self) -> None:
        check_positive_int("heldout_blocks", self.heldout_blocks, minimum=0)
        check_corpus(self.corpus)
        checked_vocab_size(self.tokenizer, self.vocab_size)


@dataclass
class SharpnessArguments:
    """What the :class:`~sharpmeter.integrations.hf.SharpnessCallback` measures, and when: the
    :class:`~sharpmeter.measure.options.MeterOptions` a config sets, with the meter's defaults."""

    measures: list[str] = field(
        default_factory=lambda: list(DEFAULTS.measures), metadata={"help": f"any of {MEASURES}"}
    )
    every: int = field(
        default=FORWARD_SCHEDULE.every,
        metadata={"help": "measure critical sharpness every n steps (HVP measures: hvp_every)"},
    )
    per_decade: int | None = field(
        default=FORWARD_SCHEDULE.per_decade, metadata={"help": "log-spaced steps instead"}
    )
    max_fraction: float | None = field(
        default=FORWARD_SCHEDULE.max_fraction,
        metadata={"help": "most share of wall time critical sharpness may take (null: no budget)"},
    )
    hvp_every: int = field(
        default=HVP_SCHEDULE.every,
        metadata={"help": f"measure the HVP measures {HVP_MEASURES} every n steps"},
    )
    hvp_per_decade: int | None = field(
        default=HVP_SCHEDULE.per_decade,
        metadata={"help": "log-spaced steps for the HVP measures instead"},
    )
    hvp_max_fraction: float | None = field(
        default=HVP_SCHEDULE.max_fraction,
        metadata={"help": "most share of wall time the HVP measures may take (null: no budget)"},
    )
    hvp_products_per_call: int = field(
        default=DEFAULTS.hvp_products_per_call,
        metadata={"help": "HVPs per batched backward (the trace's probes); >1 is slower on a CPU"},
    )
    probe: str = field(
        default=DEFAULTS.probe,
        metadata={"help": "fixed: one probe batch drawn for the run; train: each step's batch"},
    )
    probe_size: int = field(
        default=DEFAULTS.probe_size, metadata={"help": "examples in the probe batch"}
    )
    probe_seed: int = field(
        default=DEFAULTS.probe_seed, metadata={"help": "seed that draws the probe batch"}
    )

    def __post_init__(self) -> None:
        self.meter_options()  # every check of the options, the schedule's included

    def schedule(self) -> Schedule:
        """The schedule of critical sharpness (and any measure without HVPs)."""
        return Schedule(self.every, self.per_decade, self.max_fraction)

    def hvp_schedule(self) -> Schedule:
        """The schedule the HVP measures share."""
        return Schedule(self.hvp_every, self.hvp_per_decade, self.hvp_max_fraction)

    def schedule_of(self, measure: str) -> Schedule:
        return self.meter_options().schedule_of(measure)

    def meter_options(self) -> MeterOptions:
        return MeterOptions(
            measures=tuple(self.measures),
            schedule=self.schedule(),
            schedules=dict.fromkeys(HVP_MEASURES, self.hvp_schedule()),
            hvp_products_per_call=self.hvp_products_per_call,
            probe=self.probe,
            probe_size=self.probe_size,
            probe_seed=self.probe_seed,
        )


# Learning-rate schedules a study can compare on one size: transformers' schedules that need
# no option of their own, and cosine with restarts, which takes its cycles from the study.
RESTARTS = "cosine_with_restarts"
SCHEDULE_VARIANTS = ("linear", "cosine", RESTARTS, "polynomial", "constant_with_warmup")


@dataclass
class StudyArguments:
    """A ladder of sizes trained alike, and how its report summarises them.

    ``seeds`` makes replicates: each size trains once per seed, each seed a different
    initialisation over the same data order. ``schedule_variants`` trains one more run of
    ``schedule_size`` per learning-rate schedule, outside the ladder's fits::

        StudyArguments(sizes=["tiny", "small"], seeds=[0, 1, 2])
        StudyArguments(schedule_variants=["cosine", "linear", "cosine_with_restarts"],
                       schedule_size="small")
    """

    sizes: list[str] = field(
        default_factory=lambda: ["tiny", "small", "medium", "large", "xlarge"],
        metadata={"help": "named sizes to train, each into <output_dir>/<size>[/seed<k>]"},
    )
    seeds: list[int] = field(
        default_factory=list,
        metadata={
            "help": "initialisation seeds, one run per size and seed in <output_dir>/<size>/"
            "seed<k>, all on data_seed's data order (none: one run per size with `seed`)"
        },
    )
    schedule_variants: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"learning-rate schedules (of {SCHEDULE_VARIANTS}) to train schedule_size "
            "with, each into <output_dir>/schedules/<schedule>"
        },
    )
    schedule_size: str | None = field(
        default=None, metadata={"help": "the size of the ladder the schedule variants train"}
    )
    restart_cycles: int = field(
        default=4, metadata={"help": f"cosine cycles of the {RESTARTS} variant (2+)"}
    )
    quantity: str = field(default="critical_sharpness", metadata={"help": "logged column"})
    final_fraction: float = field(
        default=0.2, metadata={"help": "last share of training time averaged as 'final'"}
    )

    def __post_init__(self) -> None:
        for size in self.sizes:
            check_size(size)
        _check_distinct("sizes", self.sizes)
        _check_distinct("seeds", self.seeds)
        if any(seed < 0 for seed in self.seeds):
            raise ValueError(f"seeds must be non-negative, got {self.seeds}")
        self._check_schedule_variants()
        if not 0 < self.final_fraction <= 1:
            raise ValueError(f"final_fraction must be in (0, 1], got {self.final_fraction}")

    def _check_schedule_variants(self) -> None:
        if not self.schedule_variants:
            return
        _check_distinct("schedule_variants", self.schedule_variants)
        unknown = [name for name in self.schedule_variants if name not in SCHEDULE_VARIANTS]
        if unknown:
            raise ValueError(
                f"schedule_variants {unknown} unknown; choose from {SCHEDULE_VARIANTS}"
            )
        # One of the ladder's sizes: its ladder run is the reference the variants differ from
        # (and the probe-memory check, which looks at the ladder, covers it).
        if self.schedule_size not in self.sizes:
            raise ValueError(
                f"schedule_variants need a schedule_size among sizes {self.sizes}, "
                f"got {self.schedule_size!r}"
            )
        # One cycle is plain cosine: no restart to see.
        if RESTARTS in self.schedule_variants and self.restart_cycles < 2:
            raise ValueError(f"restart_cycles must be 2 or more, got {self.restart_cycles}")


def _check_distinct(name: str, values: Sequence[Any]) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct, got {values}")


RUN_ARGUMENTS = (ModelArguments, DataArguments, SharpnessArguments, TrainingArguments)
STUDY_ARGUMENTS = (StudyArguments, *RUN_ARGUMENTS)


def parse_config(
    argv: Sequence[str],
    dataclass_types: tuple[type, ...] = RUN_ARGUMENTS,
    required: Sequence[str] = ("size",),
) -> tuple[Any, ...]:
    """``[CONFIG.yaml] [--name value ...]`` -> one instance per dataclass type.

    The YAML values become command-line arguments placed before the user's, so a later
    ``--name`` wins, and every value goes through the same parsing and checks. Each key in
    ``required`` must be given, in the file or on the command line. A YAML ``null`` sets a
    field of ours that takes None (``max_fraction: null``: no time budget), unless the command
    line gives it a value."""
    argv = list(argv)
    config_args: list[str] = []
    nulls: set[str] = set()
    source = "the command line"
    # A value argparse cannot read raises instead of printing the whole usage and exiting.
    parser = HfArgumentParser(dataclass_types, exit_on_error=False)
    if argv and argv[0].endswith((".yaml", ".yml")):
        source = argv[0]
        config_args, nulls = yaml_as_arguments(Path(argv.pop(0)), dataclass_types, parser)
    missing = [key for key in required if key not in _flag_names(config_args + argv)]
    if missing:
        raise ValueError(f"missing config key(s) {missing} in {source} (or give --{missing[0]})")
    # A ValueError from a dataclass check is re-raised as is: it names the bad value.
    try:
        parsed = parser.parse_args_into_dataclasses(
            args=config_args + argv, look_for_args_file=False
        )
    except argparse.ArgumentError as error:
        raise ValueError(_argument_error_message(error, source, argv)) from None
    parsed = tuple(_set_none(arguments, nulls - _flag_names(argv)) for arguments in parsed)
    _check_fsdp_measures(parsed)
    _check_preconditioned_optimizer(parsed)
    _check_training(parsed)
    _check_probe_memory(parsed)
    return parsed


def _argument_error_message(error: argparse.ArgumentError, source: str, argv: list[str]) -> str:
    """argparse's complaint about one value in one line, naming where the value came from (the
    command line when it gives the key, else the config file) and its key."""
    key = (error.argument_name or "").split("/")[0].removeprefix("--").replace("-", "_")
    where = "the command line" if key in _flag_names(argv) else source
    return f"{where}: {key}: {error.message}" if key else f"{where}: {error.message}"


def _flag_names(args: Iterable[str]) -> set[str]:
    """The field names that ``--name value`` arguments give (``--max-steps`` too)."""
    return {arg[2:].split("=")[0].replace("-", "_") for arg in args if arg.startswith("--")}


def _set_none(arguments: Any, names: set[str]) -> Any:
    """``arguments`` with the fields among ``names`` set to None, checked again."""
    own = {f.name for f in dataclasses.fields(arguments)} & names
    return dataclasses.replace(arguments, **dict.fromkeys(own)) if own else arguments


def _nullable_fields(dataclass_types: Iterable[type]) -> set[str]:
    """The fields of our own argument dataclasses that take None. transformers' are left out:
    setting one afterwards would run the setup of ``TrainingArguments`` a second time."""
    return {
        name
        for kind in dataclass_types
        if not issubclass(kind, TrainingArguments)
        for name, hint in typing.get_type_hints(kind).items()
        if type(None) in typing.get_args(hint)
    }


def _find(parsed: Sequence[Any], kind: type) -> Any:
    """The instance of ``kind`` among parsed dataclasses (None: not parsed)."""
    return next((arguments for arguments in parsed if isinstance(arguments, kind)), None)


def fsdp_version(training_args: TrainingArguments) -> int | None:
    """The FSDP version the Trainer will shard with (None: no FSDP), from ``fsdp`` and
    ``fsdp_config`` in the config or from an ``accelerate launch`` FSDP config (which sets
    ``ACCELERATE_USE_FSDP`` and ``FSDP_VERSION``, 1 unless the file says ``fsdp_version``)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return int(os.environ.get("FSDP_VERSION", "1"))
    if training_args.fsdp:
        return int((training_args.fsdp_config or {}).get("version", 1))
    return None


def _check_fsdp_measures(parsed: Sequence[Any]) -> None:
    """Refuse, before training, what the meter would refuse on a sharded model."""
    sharpness, training = _find(parsed, SharpnessArguments), _find(parsed, TrainingArguments)
    version = None if training is None else fsdp_version(training)
    if sharpness is None or version is None:
        return
    if version != 2:
        raise ValueError(
            f"FSDP version {version}: the meter measures FSDP2 models only "
            "(fsdp_version: 2, as in configs/accelerate/fsdp.yaml)"
        )
    hvp = [m for m in sharpness.measures if m in HVP_MEASURES]
    if hvp:
        raise ValueError(f"measures {hvp} under FSDP: {NO_FSDP_HVP} (--measures critical)")


# Trainer ``optim`` values that build torch.optim.AdamW, whose second moments P is made of.
ADAM_OPTIMS = ("adamw_torch", "adamw_torch_fused")


def _check_preconditioned_optimizer(parsed: Sequence[Any]) -> None:
    """Refuse, before training, the preconditioned measure with an optimizer that has no
    Adam second moments (the meter would refuse it when training begins)."""
    sharpness, training = _find(parsed, SharpnessArguments), _find(parsed, TrainingArguments)
    if sharpness is None or training is None or "preconditioned" not in sharpness.measures:
        return
    optim = getattr(training.optim, "value", training.optim)
    if optim not in ADAM_OPTIMS:
        raise ValueError(
            f"the preconditioned measure needs Adam's second moments: optim {optim!r} has none "
            f"(use one of {ADAM_OPTIMS}, or drop 'preconditioned' from measures)"
        )


def _check_training(parsed: Sequence[Any]) -> None:
    """Refuse, before training, what transformers accepts but makes no run: a learning rate
    that is not positive, ``max_steps`` 0 or below -1 (transformers then trains
    ``num_train_epochs`` instead, without a word), an ``output_dir`` nothing can be written
    into (the Trainer would find out at its first save, in a traceback)."""
    training = _find(parsed, TrainingArguments)
    if training is None:
        return
    rate = training.learning_rate
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"learning_rate must be positive, got {rate}")
    if training.max_steps == 0 or training.max_steps < -1:
        raise ValueError(
            f"max_steps must be positive (-1, the default, trains num_train_epochs instead), "
            f"got {training.max_steps}"
        )
    # 0 would fail in the dataloader or the Trainer's first step, long after the checks.
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        check_positive_int(name, getattr(training, name))
    if training.output_dir is not None:
        if not training.output_dir.strip():
            raise ValueError("output_dir must name a folder, got ''")
        _check_writable_folder(training.output_dir)


def _check_writable_folder(folder: str) -> None:
    """A ValueError unless ``folder`` is, or can be made as, a folder this user writes into:
    its nearest existing ancestor must be a folder (not a file) with write permission."""
    path = Path(folder).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if os.path.exists(p))
    if not existing.is_dir():
        raise ValueError(
            f"output_dir {folder!r} cannot be written: {str(existing)!r} is a file, not a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"output_dir {folder!r} cannot be written: no write permission on {str(existing)!r}"
        )


def _check_probe_memory(parsed: Sequence[Any]) -> None:
    """Refuse, before training, a probe whose measurement would not fit in memory
    (:func:`sharpmeter.harness.gpt.probe_memory_bytes`, for the largest size to train): on the CPU
    the OOM killer would end the run at its first measurement without a word. Runs on a GPU
    are not checked: host memory is not where their probe lives, and CUDA reports its own
    out-of-memory error. Nothing is checked where the available memory is unknown."""
    model, data = _find(parsed, ModelArguments), _find(parsed, DataArguments)
    sharpness, training = _find(parsed, SharpnessArguments), _find(parsed, TrainingArguments)
    if None in (model, data, sharpness, training):
        return
    if not (training.use_cpu or not torch.cuda.is_available()):
        return
    study = _find(parsed, StudyArguments)
    sizes = study.sizes if study is not None else [model.size] if model.size else []
    available = available_memory_bytes()
    if not sizes or available is None:
        return
    vocab_size = checked_vocab_size(data.tokenizer, data.vocab_size)  # BPE: at most this
    double_backward = any(measure in HVP_MEASURES for measure in sharpness.measures)
    need = {
        size: probe_memory_bytes(
            size, model.block_size, vocab_size, sharpness.probe_size, double_backward
        )
        for size in sizes
    }
    largest = max(need, key=need.__getitem__)
    if need[largest] > available:
        fits = sharpness.probe_size * available // need[largest]
        hint = f"probe_size {fits} fits" if fits else "lower block_size"
        raise ValueError(
            f"probe_size {sharpness.probe_size} needs about {_gib(need[largest])} to measure "
            f"{largest!r} (estimated), more than the {_gib(available)} of memory available: "
            f"{hint}"
        )


def available_memory_bytes() -> int | None:
    """Memory a new allocation can still get: ``MemAvailable`` of ``/proc/meminfo`` (Linux),
    else psutil's estimate where psutil is installed, else None (unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _gib(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB"


def yaml_as_arguments(
    path: Path, dataclass_types: tuple[type, ...], parser: HfArgumentParser
) -> tuple[list[str], set[str]]:
    """The ``key: value`` pairs of a flat YAML file as ``--key value`` arguments, and the keys
    that are ``null`` where the default is not None.

    Scalars keep the text written in the file (YAML 1.1 would turn ``save_strategy: no`` into
    False); a mapping becomes JSON, which transformers reads for its dict options. ``null`` is
    accepted where the default is None, and for a field of ours that takes None (the command
    line has no way to say None, so the caller sets those); elsewhere it is refused, since
    it would silently mean the default.
    """
    import yaml

    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ValueError(_yaml_error_message(path, error)) from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected 'key: value' pairs, got {type(values).__name__}")
    written = yaml.load(text, Loader=yaml.BaseLoader)  # every scalar as its text
    defaults = {f.name: f.default for kind in dataclass_types for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"{path}: unknown config key(s) {unknown}")
    # Fields typed as a plain list take several values; a union such as report_to's
    # (str | list[str]) takes one on transformers' command line, so it does here too.
    multi_valued = {action.dest for action in parser._actions if action.nargs in ("+", "*")}
    nullable = _nullable_fields(dataclass_types)
    arguments: list[str] = []
    nulls: set[str] = set()
    for key, value in values.items():
        if value is None:
            if defaults[key] is None:
                continue
            if key not in nullable:
                raise ValueError(f"{path}: {key} cannot be null (its default is {defaults[key]!r})")
            nulls.add(key)
            continue
        if isinstance(value, dict):
            items = [json.dumps(value)]
        elif isinstance(value, list):
            items = written[key]
            if any(isinstance(item, (list, dict)) for item in value):
                raise ValueError(f"{path}: {key} takes a list of plain values, got {value}")
            if len(items) > 1 and key not in multi_valued:
                raise ValueError(f"{path}: {key} takes one value, got {len(items)}: {value}")
        else:
            items = [written[key]]
        arguments += [f"--{key}", *items]
    return arguments, nulls


def _yaml_error_message(path: Path, error: Exception) -> str:
    """PyYAML's error in one line naming the file and line (its own message spans several
    lines and calls the file "<unicode string>")."""
    mark = getattr(error, "problem_mark", None)
    where = str(path) if mark is None else f"{path}, line {mark.line + 1}"
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1})"
    return f"{where}: not valid YAML: {problem}"
