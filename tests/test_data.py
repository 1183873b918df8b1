"""Corpora (KJV, local files, hub names), the byte and BPE tokenizers, the BPE cache, and the
token blocks. Everything runs offline on small files under tmp_path."""

from __future__ import annotations

import socket

import pytest
import torch

import sharpmeter.harness.data as data
from sharpmeter.harness.data import (
    BYTE_VOCAB,
    TokenBlocks,
    check_corpus,
    encode_corpus,
    kjv_text,
    lm_dataset,
    load_text,
    train_bpe,
)
from sharpmeter.measure.files import atomic_write

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("datasets")

PROSE = (
    "In the beginning God created the heaven and the earth.\n"
    "And the earth was without form, and void; and darkness was upon the face of the deep.\n"
    "And God said, Let there be light: and there was light.\n"
) * 20


@pytest.fixture(autouse=True)
def no_home_caches(tmp_path, monkeypatch):
    """Default caches point into tmp_path, so even a test that forgets cache_dir (or a bug
    that drops it) never writes to ~/.cache."""
    import datasets

    monkeypatch.setenv("SHARPMETER_CACHE", str(tmp_path / "default-sharpmeter-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "default-hf-cache")


@pytest.fixture
def prose_file(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_text(PROSE, encoding="utf-8")
    return path


def test_kjv_text_is_the_whole_bible_without_references():
    text = kjv_text()
    assert text.startswith("In the beginning God created")
    assert len(text) > 4_000_000 and text.count("\n") > 20_000
    assert not text.splitlines()[1][0].isdigit()


def test_blocks_round_trip_the_bytes(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("héllo wörld, " * 10, encoding="utf-8")
    blocks = lm_dataset(str(corpus), block_size=16, cache_dir=tmp_path)
    raw = corpus.read_bytes()
    assert len(blocks) == len(raw) // 16
    assert blocks.vocab_size == BYTE_VOCAB and blocks.tokenizer_path is None
    first = blocks[0]
    assert bytes(first["input_ids"].tolist()) == raw[:16]
    assert torch.equal(first["labels"], first["input_ids"])
    assert first["input_ids"].dtype == torch.int64
    assert bytes(blocks.blocks.flatten().tolist()) == raw[: len(blocks) * 16]


def test_bpe_blocks_decode_to_the_start_of_the_text(prose_file, tmp_path):
    blocks = lm_dataset(
        str(prose_file), block_size=8, tokenizer="bpe", vocab_size=300, cache_dir=tmp_path
    )
    assert BYTE_VOCAB < blocks.vocab_size <= 300
    assert int(blocks.blocks.max()) < blocks.vocab_size
    # merges were learned and used: fewer tokens than bytes
    assert blocks.blocks.numel() < len(PROSE.encode()) // 2
    bpe = tokenizers.Tokenizer.from_file(str(blocks.tokenizer_path))
    decoded = bpe.decode(blocks.blocks[:3].flatten().tolist())
    assert len(decoded) > 3 * 8 and PROSE.startswith(decoded)
    assert torch.equal(blocks[0]["labels"], blocks[0]["input_ids"])


def test_bpe_round_trips_any_text_and_is_deterministic(tmp_path):
    text = "héllo wörld ✓ naïve café\n  indented\ttab\r\n日本語\n" * 30
    corpus = encode_corpus(text, tokenizer="bpe", vocab_size=400, cache_dir=tmp_path)
    assert corpus.ids.dtype == torch.int64 and corpus.ids.dim() == 1
    assert int(corpus.ids.max()) < corpus.vocab_size <= 400
    bpe = tokenizers.Tokenizer.from_file(str(corpus.tokenizer_path))
    assert bpe.decode(corpus.ids.tolist()) == text
    assert train_bpe(text, 400).to_str() == train_bpe(text, 400).to_str()


def count_bpe_training(monkeypatch) -> list[int]:
    """The vocabulary sizes ``train_bpe`` is called with from now on."""
    trained = []
    real_train_bpe = data.train_bpe

    def counting_train_bpe(text, vocab_size):
        trained.append(vocab_size)
        return real_train_bpe(text, vocab_size)

    monkeypatch.setattr(data, "train_bpe", counting_train_bpe)
    return trained


def test_second_bpe_call_reads_the_cache(prose_file, tmp_path, monkeypatch):
    trained = count_bpe_training(monkeypatch)
    first = lm_dataset(str(prose_file), 8, tokenizer="bpe", vocab_size=300, cache_dir=tmp_path)
    assert trained == [300]

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(data, "train_bpe", fail)
    monkeypatch.setattr(data, "_encode_bpe", fail)
    second = lm_dataset(str(prose_file), 8, tokenizer="bpe", vocab_size=300, cache_dir=tmp_path)
    assert torch.equal(first.blocks, second.blocks)
    assert second.vocab_size == first.vocab_size and second.tokenizer_path == first.tokenizer_path
    # one folder with the two files, no temporary files left behind
    folder = first.tokenizer_path.parent
    assert sorted(path.name for path in folder.iterdir()) == ["ids.npy", "tokenizer.json"]


def test_cache_key_covers_text_and_vocab_size(tmp_path, monkeypatch):
    trained = count_bpe_training(monkeypatch)
    encode_corpus(PROSE, "bpe", 300, tmp_path)
    encode_corpus(PROSE, "bpe", 300, tmp_path)
    encode_corpus(PROSE, "bpe", 280, tmp_path)
    encode_corpus(PROSE + "Amen.\n", "bpe", 300, tmp_path)
    assert trained == [300, 280, 300]


def test_default_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARPMETER_CACHE", str(tmp_path / "env-cache"))
    corpus = encode_corpus(PROSE, "bpe", 300)
    assert corpus.tokenizer_path.is_relative_to(tmp_path / "env-cache")


def test_failed_cache_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "cache" / "ids.npy"

    def half_then_crash(handle):
        handle.write(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert list(target.parent.iterdir()) == []
    atomic_write(target, lambda handle: handle.write(b"whole"))
    assert target.read_bytes() == b"whole" and len(list(target.parent.iterdir())) == 1


def test_directory_loads_its_txt_files_in_sorted_order(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "b.txt").write_text("second file\n", encoding="utf-8")
    (folder / "a.txt").write_text("first file\n", encoding="utf-8")
    (folder / "notes.md").write_text("not a .txt file\n", encoding="utf-8")
    cache = tmp_path / "cache"
    assert load_text(str(folder), cache_dir=cache) == "first file\n\nsecond file\n"
    blocks = lm_dataset(str(folder), block_size=4, cache_dir=cache)
    assert bytes(blocks.blocks.flatten().tolist()) == b"first file\n\nsecond file\n"[:24]


def test_missing_paths_fail_at_once_without_datasets(tmp_path, monkeypatch):
    def no_datasets():
        raise AssertionError("a missing path must not reach datasets or the hub")

    monkeypatch.setattr(data, "_import_datasets", no_datasets)
    missing = [
        "/no/such/file.txt",
        str(tmp_path / "missing"),
        "./missing",
        "missing.txt",
        "missing.JSONL",
        "data/a/b",
        "~/no-such-sharpmeter-corpus",
    ]
    for source in missing:
        with pytest.raises(ValueError, match="does not exist") as caught:
            lm_dataset(source)
        assert repr(source) in str(caught.value)
        with pytest.raises(ValueError, match="does not exist"):
            check_corpus(source)
    # what may load passes the early check: kjv, existing paths, datasets names
    (tmp_path / "corpus.txt").write_text("text", encoding="utf-8")
    for source in ("kjv", str(tmp_path), "wikitext", "Salesforce/wikitext"):
        check_corpus(source)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        load_text(str(empty))


def test_unknown_dataset_names_fail_offline(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read these variables once, on import, which has already happened here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    lookups = []

    def no_network(*args, **kwargs):
        lookups.append(args[0])
        raise OSError("no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    # a bare name and an org/name id both go to datasets, not to the missing-path check
    for name in ("sharpmeter-no-such-corpus", "sharpmeter-tests/no-such-corpus"):
        with pytest.raises(ValueError, match="nor a loadable datasets dataset") as caught:
            lm_dataset(name, cache_dir=tmp_path)
        assert repr(name) in str(caught.value)
    assert lookups == []


def test_bad_tokenizer_arguments(prose_file, tmp_path):
    source = str(prose_file)
    with pytest.raises(ValueError, match=r"one of \('byte', 'bpe'\)"):
        lm_dataset(source, tokenizer="wordpiece", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="byte tokenizer has vocab_size 256"):
        lm_dataset(source, tokenizer="byte", vocab_size=512, cache_dir=tmp_path)
    assert lm_dataset(source, vocab_size=256, cache_dir=tmp_path).vocab_size == 256
    for too_small in (256, 100, 0):
        with pytest.raises(ValueError, match="vocab_size > 256"):
            lm_dataset(source, tokenizer="bpe", vocab_size=too_small, cache_dir=tmp_path)
        with pytest.raises(ValueError, match="vocab_size > 256"):
            train_bpe(PROSE, too_small)


def test_bad_block_input():
    with pytest.raises(ValueError, match="fewer than block_size"):
        TokenBlocks(torch.arange(10), block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        TokenBlocks(torch.arange(10), block_size=1)
    with pytest.raises(ValueError, match="1-D tensor of integers"):
        TokenBlocks(torch.zeros(4, 4, dtype=torch.long), block_size=2)
    with pytest.raises(ValueError, match="1-D tensor of integers"):
        TokenBlocks(torch.rand(32), block_size=2)
    with pytest.raises(TypeError, match="token ids, not text"):
        TokenBlocks("some text that used to be accepted", block_size=4)
    with pytest.raises(ValueError, match="fewer than block_size"):
        TokenBlocks(encode_corpus("").ids, block_size=2)  # an empty corpus


def test_token_blocks_from_ids():
    blocks = TokenBlocks(torch.arange(10, dtype=torch.int32), block_size=4, vocab_size=10)
    assert len(blocks) == 2 and blocks.vocab_size == 10
    assert blocks.blocks.dtype == torch.int64
    assert blocks[1]["input_ids"].tolist() == [4, 5, 6, 7]


def test_a_held_out_tail_is_the_last_blocks_and_training_keeps_the_rest():
    blocks = TokenBlocks(torch.arange(40), block_size=4)
    train, heldout = blocks.split_tail(3)
    assert (len(train), len(heldout)) == (7, 3)
    assert torch.equal(heldout[0]["input_ids"], torch.arange(28, 32))
    assert torch.equal(torch.cat([train.blocks, heldout.blocks]), blocks.blocks)
    assert len(blocks) == 10  # the corpus itself is left whole
    for count in (0, 10, -1):
        with pytest.raises(ValueError, match="hold out"):
            blocks.split_tail(count)
