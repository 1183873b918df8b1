"""Files written whole or not at all.

A crash, a kill or a full disk midway through a write must leave the old file (or none), never
an empty or torn one that every later read trips over: the bytes go to a temporary file in the
same folder (a rename stays on one file system), are synced to disk, then renamed over the
target, and the folder is synced so that the rename survives a power cut too.

Example::

    atomic_write_text("runs/tiny/sharpmeter_run.json", json.dumps(config))
    atomic_write(path, lambda handle: np.save(handle, ids))
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Replaces ``path`` by what ``write`` writes into the binary handle it is given (its
    folder is made when missing).

    Raises what a failed step raises, after removing the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named per process and call: DDP ranks may build the same cache file at once.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # open(..., "x") rather than tempfile.mkstemp: the file gets the umask's mode, not 0600
        with open(temporary, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    _fsync_folder(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of ``text`` in UTF-8."""
    atomic_write(path, lambda handle: write_all(handle, text.encode("utf-8")))


def write_all(handle: Any, data: bytes) -> None:
    """An unbuffered file may take part of ``data`` per call; the rest must follow in order."""
    view = memoryview(data)
    while view:
        view = view[handle.write(view) :]


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` survive a power cut (the folder's entry is data too).
    Best effort: some systems cannot open or sync a folder, and the file is whole anyway."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
