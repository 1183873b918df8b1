"""The bundled corpus and its byte-level blocks."""

from __future__ import annotations

import pytest
import torch

from sharpmeter.data import BYTE_VOCAB, TokenBlocks, kjv_text, lm_dataset


def test_kjv_text_is_the_whole_bible_without_references():
    text = kjv_text()
    assert text.startswith("In the beginning God created")
    assert len(text) > 4_000_000 and text.count("\n") > 20_000
    assert not text.splitlines()[1][0].isdigit()


def test_blocks_round_trip_the_bytes(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("héllo wörld, " * 10, encoding="utf-8")
    blocks = lm_dataset(str(corpus), block_size=16)
    raw = corpus.read_bytes()
    assert len(blocks) == len(raw) // 16
    first = blocks[0]
    assert bytes(first["input_ids"].tolist()) == raw[:16]
    assert torch.equal(first["labels"], first["input_ids"])
    assert int(blocks.blocks.max()) < BYTE_VOCAB


def test_bad_corpus_input():
    with pytest.raises(ValueError, match="neither"):
        lm_dataset("/no/such/file.txt")
    with pytest.raises(ValueError, match="fewer"):
        TokenBlocks("short", block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        TokenBlocks("short", block_size=1)
