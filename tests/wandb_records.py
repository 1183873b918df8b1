"""Read the history of an offline W&B run file (``run-*.wandb``) back, to check logged values.

The file is a LevelDB-style log: a 7-byte file header (``:W&B``, magic, version), then 32 KiB
blocks of chunks, each with a 7-byte header (CRC32, length, type: full / first / middle / last)
and a piece of a serialized ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    position, pending, payloads = 7, b"", []
    while position + HEADER.size <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER.size:  # the writer pads a block's tail with zeros
            position += left_in_block
            continue
        _, length, kind = HEADER.unpack_from(data, position)
        chunk = data[position + HEADER.size : position + HEADER.size + length]
        position += HEADER.size + length
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            payloads.append(pending + chunk)
        else:  # zeros past the last record
            break
    return [wandb_internal_pb2.Record.FromString(payload) for payload in payloads]


def history(path: Path) -> list[dict]:
    """One dict per ``wandb.log`` call: key -> decoded value."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows
