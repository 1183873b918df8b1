"""Files written whole or not at all, and files one process at a time writes.

A crash, a kill or a full disk midway through a write must leave the old file (or none), never
an empty or torn one that every later read trips over: the bytes go to a temporary file in the
same folder (a rename stays on one file system), are synced to disk, then renamed over the
target, and the folder is synced so that the rename survives a power cut too.

Example::

    atomic_write_text("runs/tiny/sharpmeter_run.json", json.dumps(config))
    atomic_write(path, lambda handle: np.save(handle, ids))

A file that one writer at a time may own (a run folder's lock, a JSONL file of rows) is held by
:func:`open_locked`: the kernel's exclusive ``flock`` on an open file, which goes when the
holder ends however it ends (``kill -9`` included), so a file a dead writer left is simply
taken again::

    descriptor = open_locked(path)   # BlockingIOError: another open file holds it
    close_locked(descriptor)         # releases it

A forked child (a DataLoader worker) gets copies of the locked descriptors; the lock lives
while any copy is open, so each child closes them at once: a lock its parent released must
not stay held by a persistent worker.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

try:
    from fcntl import LOCK_EX, LOCK_NB, flock
except ImportError:  # Windows: no flock, so callers go on unlocked
    LOCK_EX = LOCK_NB = 0

    def flock(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, "this platform has no flock")


# What flock fails with where the filesystem cannot lock at all (some network or FUSE mounts).
CANNOT_LOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}

# The descriptors of this process that hold a lock from open_locked: a forked child closes its
# copies (a flock goes only when every copy of the descriptor is closed).
_held: set[int] = set()


def _close_held_in_child() -> None:
    """Run in a forked child: the locks are the parent's, never the child's."""
    for descriptor in _held:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _held.clear()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork (nor flock)
    os.register_at_fork(after_in_child=_close_held_in_child)


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


def open_locked(path: str | os.PathLike) -> int:
    """A read-write descriptor on ``path`` (created when missing) holding its exclusive
    ``flock``; :func:`close_locked` releases the lock.

    Raises:
        BlockingIOError: another open file (another process, or another holder in this one)
            holds the lock.
        OSError: the file cannot be opened, or cannot be locked (``errno`` in
            :data:`CANNOT_LOCK`: the filesystem has no locks; the caller decides whether to go
            on unlocked).
    """
    path = Path(path)
    while True:
        descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            flock(descriptor, LOCK_EX | LOCK_NB)
        except BaseException:
            os.close(descriptor)
            raise
        if names(path, descriptor):
            _held.add(descriptor)
            return descriptor
        # Its holder removed or renamed it between our open and our flock: lock the file
        # the path names now.
        os.close(descriptor)


def close_locked(descriptor: int) -> None:
    """Closes a descriptor :func:`open_locked` returned, releasing its lock; one a forked
    child closed already is left alone (its number may name another file there by now)."""
    if descriptor in _held:
        _held.discard(descriptor)  # first: once closed, its number may be reused
        os.close(descriptor)


def names(path: str | os.PathLike, descriptor: int) -> bool:
    """Whether ``path`` names the file open as ``descriptor``."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(descriptor))
    except FileNotFoundError:
        return False
