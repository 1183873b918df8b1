"""YAML configs with command-line overrides, and the errors a bad config raises before training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sharpmeter.harness import config as config_module
from sharpmeter.harness.config import RUN_ARGUMENTS, STUDY_ARGUMENTS, parse_config
from sharpmeter.harness.gpt import build_gpt
from sharpmeter.measure.measures import HVP_MEASURES, MEASURES
from sharpmeter.measure.schedule import Schedule

CONFIGS = Path(__file__).parent.parent / "configs"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_values_reach_every_dataclass():
    model, data, sharpness, training = parse_config([str(CONFIGS / "tiny.yaml")])
    assert (model.size, model.block_size) == ("tiny", 64)
    assert (data.corpus, data.tokenizer) == ("kjv", "byte")
    assert sharpness.measures == ["critical", "trace", "spectral"]
    assert sharpness.schedule().every == 10
    assert training.max_steps == 60 and training.learning_rate == pytest.approx(3e-3)
    assert training.use_cpu is True and training.report_to == ["wandb"]


def test_command_line_overrides_the_file():
    model, _, sharpness, training = parse_config(
        [
            str(CONFIGS / "tiny.yaml"),
            "--size",
            "small",
            "--measures",
            "critical",
            "--max_steps",
            "7",
        ]
    )
    assert model.size == "small" and sharpness.measures == ["critical"]
    assert training.max_steps == 7


@pytest.mark.parametrize(
    "name, types",
    [
        ("tiny", RUN_ARGUMENTS),
        ("gpt_gpu", RUN_ARGUMENTS),
        ("study_cpu", STUDY_ARGUMENTS),
        ("study_gpu", STUDY_ARGUMENTS),
        ("claims_cpu", STUDY_ARGUMENTS),
    ],
)
def test_every_shipped_config_parses(name, types, monkeypatch):
    required = ("size",) if types is RUN_ARGUMENTS else ()
    # bf16 needs a GPU or the CPU's autocast, which use_cpu selects
    cpu = ["--use_cpu", "true"] if "gpu" in name else []
    if "gpu" in name:  # its probe is sized for a GPU's memory, not for this machine's
        monkeypatch.setattr(config_module, "available_memory_bytes", lambda: None)
    parsed = parse_config([str(CONFIGS / f"{name}.yaml"), *cpu], types, required=required)
    assert len(parsed) == len(types)


@pytest.mark.parametrize(
    "text, message",
    [
        ("corpus: kjv\nmax_steps: 5\n", "missing config key"),
        ("size: tiny\nlearning_rat: 0.1\n", "unknown config key"),
        ("size: gigantic\n", "unknown model size"),
        ("size: tiny\ncorpus: /no/such/corpus.txt\n", "no/such/corpus.txt"),
        ("size: tiny\nmeasures: [critical, curvature]\n", "measures"),
        ("size: tiny\nevery: 0\n", "every"),
        ("size: tiny\ntokenizer: wordpiece\n", "tokenizer"),
        ("size: tiny\nvocab_size: 1000\n", "vocab_size"),
        ("size: tiny\ntokenizer: bpe\nvocab_size: 100\n", "vocab_size"),
        ("- size\n- tiny\n", "key: value"),
        ("size: tiny\nreport_to: [wandb, tensorboard]\n", "report_to takes one value"),
        ("size: tiny\nmeasures: [critical, preconditioned]\noptim: sgd\n", "Adam's second"),
    ],
)
def test_bad_config_raises_a_clear_error(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        parse_config([write(tmp_path, text)])


def test_hvp_measures_under_fsdp_are_refused_before_training(tmp_path, monkeypatch):
    config = write(tmp_path, "size: tiny\nmeasures: [critical, spectral]\n")
    parse_config([config])  # fine without FSDP
    # what accelerate launch sets for an FSDP config (FSDP_VERSION=1 when it names no version)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP version 1"):
        parse_config([config, "--measures", "critical"])
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match=r"\['spectral'\] under FSDP"):
        parse_config([config])
    assert parse_config([config, "--measures", "critical"])[2].measures == ["critical"]


@pytest.mark.parametrize("name", ["multi_gpu", "fsdp"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / "accelerate" / f"{name}.yaml"))
    assert config.mixed_precision == "bf16" and not config.use_cpu
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2


def test_missing_config_file():
    with pytest.raises(ValueError, match="does not exist"):
        parse_config(["/no/such/config.yaml"])


def test_yaml_text_is_read_as_written(tmp_path):
    config = write(
        tmp_path,
        "size: tiny\nsave_strategy: no\nrun_name: yes\nlearning_rate: 3.0e-3\n"
        "lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr: 1.0e-5}\n"
        "use_cpu: true\nvocab_size: null\n",
    )
    model, data, _, training = parse_config([config])
    assert training.save_strategy == "no" and training.run_name == "yes"  # not False / True
    assert training.learning_rate == pytest.approx(3e-3) and training.use_cpu is True
    assert training.lr_scheduler_kwargs == {"min_lr": 1e-5}
    assert data.vocab_size is None


def test_null_where_the_default_is_not_none_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_grad_norm cannot be null"):
        parse_config([write(tmp_path, "size: tiny\nmax_grad_norm: null\n")])


def test_required_key_given_with_dashes():
    *_, training = parse_config(["--size", "tiny", "--max-steps", "5"], required=("max_steps",))
    assert training.max_steps == 5


def test_the_sharpness_defaults_are_the_meters(tmp_path):
    from sharpmeter.measure.options import MeterOptions

    _, _, sharpness, _ = parse_config([write(tmp_path, "size: tiny\n")])
    options, defaults = sharpness.meter_options(), MeterOptions()
    assert options.replace(schedule=None, schedules={}) == defaults
    for measure in MEASURES:  # the config names the schedules the meter defaults to
        assert options.schedule_of(measure) == defaults.schedule_of(measure)


def test_the_hvp_measures_take_their_schedule_from_the_hvp_keys(tmp_path):
    text = "size: tiny\nevery: 5\nhvp_per_decade: 4\nhvp_max_fraction: null\n"
    options = parse_config([write(tmp_path, text)])[2].meter_options()
    assert options.schedule_of("critical") == Schedule(every=5, max_fraction=0.02)
    hvp = Schedule(every=50, per_decade=4, max_fraction=None)
    assert all(options.schedule_of(name) == hvp for name in HVP_MEASURES)


def test_null_turns_the_time_budget_off_unless_the_command_line_sets_it(tmp_path):
    config = write(tmp_path, "size: tiny\nmax_fraction: null\n")
    assert parse_config([config])[2].schedule().max_fraction is None
    assert parse_config([config, "--max_fraction", "0.1"])[2].schedule().max_fraction == 0.1


@pytest.mark.parametrize("name", ["tiny", "study_cpu", "study_gpu", "claims_cpu"])
def test_shipped_configs_measure_every_step_of_their_grid(name, monkeypatch):
    """A study curve (and the tiny demo) is measured at every step of its grid: no budget."""
    monkeypatch.setattr(config_module, "available_memory_bytes", lambda: None)
    types = RUN_ARGUMENTS if name == "tiny" else STUDY_ARGUMENTS
    cpu = ["--use_cpu", "true"] if "gpu" in name else []
    parsed = parse_config([str(CONFIGS / f"{name}.yaml"), *cpu], types, required=())
    sharpness = next(p for p in parsed if type(p).__name__ == "SharpnessArguments")
    for measure in sharpness.measures:
        assert sharpness.schedule_of(measure).max_fraction is None, measure


def test_the_claims_config_has_the_sizes_seeds_and_measures_its_claims_need():
    study, _, _, sharpness, training = parse_config(
        [str(CONFIGS / "claims_cpu.yaml")], STUDY_ARGUMENTS, required=()
    )
    counts = [n_params(size) for size in study.sizes]
    assert math.log10(max(counts) / min(counts)) >= 2.5
    assert study.seeds == [0, 1, 2] and training.data_seed is not None
    assert set(sharpness.measures) == {"critical", "trace", "spectral"}
    assert study.schedule_variants == ["cosine", "linear", "cosine_with_restarts"]
    assert study.schedule_size in study.sizes
    # critical sharpness on a dense grid, the HVP measures on a sparse one, on shared steps
    final = range(int(0.8 * training.max_steps) + 1, training.max_steps + 1)
    dense, sparse = sharpness.schedule_of("critical"), sharpness.schedule_of("trace")
    assert sharpness.schedule_of("spectral") == sparse
    assert sum(map(dense.is_due, final)) >= 50 and sum(map(sparse.is_due, final)) >= 10
    assert sparse.every > dense.every and sparse.every % dense.every == 0


def n_params(size: str) -> int:
    return sum(p.numel() for p in build_gpt(size, vocab_size=256, block_size=64).parameters())


@pytest.mark.parametrize(
    "text, message",
    [
        ("seeds: [0, 1, 0]\n", r"seeds must be distinct, got \[0, 1, 0\]"),
        ("seeds: [-1]\n", "seeds must be non-negative"),
        ("schedule_variants: [cosine, linear]\n", "need a schedule_size among sizes"),
        ("schedule_variants: [cosine]\nschedule_size: large\n", "got 'large'"),
        ("schedule_variants: [cosine, step]\nschedule_size: tiny\n", r"\['step'\] unknown"),
        (
            "schedule_variants: [cosine_with_restarts]\nschedule_size: tiny\nrestart_cycles: 1\n",
            "restart_cycles must be 2 or more",
        ),
    ],
)
def test_bad_study_keys_raise_a_clear_error(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        parse_config([write(tmp_path, "sizes: [tiny, small]\n" + text)], STUDY_ARGUMENTS, ())


@pytest.mark.parametrize(
    "text, types, message",
    [
        ("size: tiny\nmax_steps: 1e3\n", RUN_ARGUMENTS, "max_steps: invalid int value: '1e3'"),
        ("size: tiny\nevery: true\n", RUN_ARGUMENTS, "every: invalid int value: 'true'"),
        ("seeds: [0, 0.5]\n", STUDY_ARGUMENTS, "seeds: invalid int value: '0.5'"),
        ("sizes: [[tiny]]\n", STUDY_ARGUMENTS, r"sizes takes a list of plain values"),
    ],
)
def test_a_value_of_the_wrong_type_is_one_line_naming_the_file_and_key(
    tmp_path, text, types, message
):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=f"^{path}: {message}") as bad:
        parse_config([path], types, ())
    assert "\n" not in str(bad.value)


def test_a_bad_value_given_on_the_command_line_is_named_so(tmp_path):
    path = write(tmp_path, "size: tiny\nmax_steps: 10\n")
    with pytest.raises(ValueError, match="^the command line: max_steps: invalid int value"):
        parse_config([path, "--max-steps", "1e3"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("per_device_train_batch_size: 0\n", "per_device_train_batch_size must be an integer >= 1"),
        ("gradient_accumulation_steps: 0\n", "gradient_accumulation_steps must be an integer >= 1"),
        ("output_dir: ''\n", "output_dir must name a folder, got ''"),
    ],
)
def test_values_that_make_no_run_are_refused_before_training(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        parse_config([write(tmp_path, "size: tiny\n" + text)])
