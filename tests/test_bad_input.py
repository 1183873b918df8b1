"""Bad input to the study harness is one line naming what is wrong, before any training."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sharpmeter.cli import main
from sharpmeter.harness import config as config_module
from sharpmeter.harness import study
from sharpmeter.harness.config import RUN_ARGUMENTS, parse_config
from sharpmeter.harness.data import CorpusError, check_corpus, lm_dataset
from sharpmeter.harness.gpt import MAX_POSITIONS, build_gpt, probe_memory_bytes
from sharpmeter.harness.train import DoneMarkerError
from sharpmeter.paper import report

RUN = "size: tiny\nblock_size: 16\ntokenizer: byte\nmax_steps: 5\nreport_to: none\n"
STUDY = (
    "sizes: [tiny, small, medium]\nblock_size: 16\ntokenizer: byte\nmeasures: [critical]\n"
    "every: 1\nprobe_size: 2\nmax_steps: 10\nper_device_train_batch_size: 2\n"
    "save_strategy: 'no'\nreport_to: none\nuse_cpu: true\n"
)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def parse(tmp_path: Path, text: str) -> list:
    return parse_config([write(tmp_path / "run.yaml", text)], RUN_ARGUMENTS, required=("size",))


def study_error(tmp_path: Path, corpus: str, capsys) -> str:
    """What ``sharpmeter study`` prints on a corpus it cannot train on (and nothing trained)."""
    text = STUDY + f"corpus: {corpus}\noutput_dir: {tmp_path / 'study'}\n"
    with pytest.raises(SystemExit) as exited:
        main(["study", write(tmp_path / "study.yaml", text)])
    message = str(exited.value.code)
    assert message.startswith("sharpmeter study: error: ") and "\n" not in message
    assert not list((tmp_path / "study").glob("*/sharpness.jsonl"))
    return message


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "holds no text"),
        (b"  \n\n\t\n", "holds no text"),
        (b"In the beginnin", r"holds \d+ tokens, fewer than block_size = 16"),
        (b"caf\xe9 au lait\nsecond line\n", r"is not UTF-8: byte 0xe9 at offset 3 \(line 1\)"),
        (b"good line\n\xff\xfe", r"not UTF-8: byte 0xff at offset 10 \(line 2\)"),
    ],
)
def test_a_corpus_that_gives_no_training_block_is_one_line(tmp_path, capsys, content, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        lm_dataset(str(corpus), block_size=16, tokenizer="byte", cache_dir=tmp_path / "cache")
    assert str(corpus) in study_error(tmp_path, str(corpus), capsys)


def test_a_folder_without_txt_files_is_refused_when_the_config_is_read(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "notes.md").write_text("not a corpus file")
    with pytest.raises(CorpusError, match="holds no .txt files"):
        check_corpus(str(folder))
    with pytest.raises(ValueError, match="holds no .txt files"):
        parse(tmp_path, RUN + f"corpus: {folder}\n")


@pytest.mark.parametrize(
    "text, message",
    [
        (RUN + "measures: [critical\n", r"run\.yaml, line \d+: not valid YAML"),
        (RUN + "learning_rate: -0.001\n", "learning_rate must be positive, got -0.001"),
        (RUN + "learning_rate: 0\n", "learning_rate must be positive"),
        (RUN.replace("max_steps: 5", "max_steps: 0"), "max_steps must be positive"),
        (RUN.replace("max_steps: 5", "max_steps: -3"), "max_steps must be positive"),
        (
            RUN.replace("block_size: 16", f"block_size: {MAX_POSITIONS + 1}"),
            f"longer than GPT-2's context length of {MAX_POSITIONS} tokens, the most this "
            "harness builds",
        ),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as raised:
        parse(tmp_path, text)
    assert "\n" not in str(raised.value)


def test_an_output_dir_that_cannot_be_written_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        parse(tmp_path, RUN + f"output_dir: {blocker / 'run'}\n")
    if os.geteuid() == 0:  # root writes anywhere: the permission case cannot be set up
        return
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="no write permission"):
        parse(tmp_path, RUN + f"output_dir: {locked / 'run'}\n")


def test_a_probe_too_large_for_memory_is_refused_before_training(tmp_path, monkeypatch):
    text = RUN + "measures: [critical, trace]\nprobe_size: 64\nuse_cpu: true\n"
    need = probe_memory_bytes("tiny", 16, 256, 64, double_backward=True)
    monkeypatch.setattr(config_module, "available_memory_bytes", lambda: need // 4)
    with pytest.raises(ValueError, match=r"probe_size 64 needs about .* GiB .* probe_size 16 fits"):
        parse(tmp_path, text)
    monkeypatch.setattr(config_module, "available_memory_bytes", lambda: need * 2)
    parse(tmp_path, text)  # fits
    # critical sharpness alone (no double backward) needs a quarter
    monkeypatch.setattr(config_module, "available_memory_bytes", lambda: need // 2)
    parse(tmp_path, text.replace("[critical, trace]", "[critical]"))


def test_the_probe_memory_estimate_bounds_a_measured_peak():
    """The estimate is an upper bound of a real HVP's peak on the tiny GPT-2 (a traced
    allocation count would be flaky; the autograd graph's saved tensors are what dominates)."""
    import torch

    from sharpmeter.measure.operators import HessianOperator

    model = build_gpt("tiny", vocab_size=256, block_size=32).float()
    batch = {"input_ids": torch.randint(0, 256, (4, 32))}
    batch["labels"] = batch["input_ids"]
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        op = HessianOperator(model, None, batch)
        op @ torch.randn(op.shape[0])
    estimate = probe_memory_bytes("tiny", 32, 256, 4, double_backward=True)
    assert sum(saved) < estimate < 4 * sum(saved)


def test_a_study_whose_runs_cannot_be_reported_keeps_them_and_says_so_in_one_line(
    tmp_path, monkeypatch
):
    """Every size diverged, say: the report finds no run to fit, the training stays."""
    monkeypatch.setattr(study, "train_gpt", lambda *arguments, dataset: None)
    monkeypatch.setattr(study, "load_data", lambda *arguments: None)

    def nothing_to_fit(*arguments, **options):
        raise ValueError("no run to fit critical_sharpness; diverged: tiny, small, medium")

    monkeypatch.setattr(report, "load_analysis", nothing_to_fit)
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as exited:
        main(["study", write(tmp_path / "study.yaml", STUDY + f"output_dir: {out}\n")])
    message = str(exited.value.code)
    assert message.startswith("sharpmeter study: error: ") and "\n" not in message
    assert f"the runs are trained and kept in {out}" in message
    assert "no run to fit critical_sharpness" in message
    assert f"`sharpmeter report {out}`" in message


def test_a_study_whose_done_marker_cannot_be_written_says_so_in_one_line(tmp_path, monkeypatch):
    def full_disk(*arguments, dataset):
        raise DoneMarkerError("training finished and x/sharpness.jsonl is intact, but ...")

    monkeypatch.setattr(study, "train_gpt", full_disk)
    monkeypatch.setattr(study, "load_data", lambda *arguments: None)
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as exited:
        main(["study", write(tmp_path / "study.yaml", STUDY + f"output_dir: {out}\n")])
    message = str(exited.value.code)
    assert message.startswith("sharpmeter study: error: training finished and ")
    assert "\n" not in message
