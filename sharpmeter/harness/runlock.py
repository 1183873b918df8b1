"""One run per folder: a run (or a study) owns its output folder while it writes into it.

Two runs started on the same ``output_dir`` would interleave their JSONL rows and both end
well. The first to start opens ``<folder>/sharpmeter.lock``, takes the kernel's exclusive
``flock`` on it and writes its pid, host and start time into it; a second one is refused in one
line naming the lock, its owner and what to do. The kernel holds the lock for the owner's open
file, so it goes when the owner ends however it ends (``kill -9`` included), and it holds across
containers on one kernel whatever their pid namespaces, and across hosts on NFSv4 (where Linux
maps ``flock`` to POSIX locks). A lock file left by a killed owner is simply locked again. On a
filesystem that cannot lock, a run warns and goes on unlocked.

Example::

    with RunLock.acquire("runs/study"):      # RunLockedError if another live run holds it
        ...                                  # write into runs/study

Under data parallelism only rank 0 holds the lock, and every rank learns its outcome
(:func:`rank_zero_lock`), so a refused run ends on every rank instead of leaving the others
waiting in their first collective.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sharpmeter.measure.files import CANNOT_LOCK, close_locked, names, open_locked

LOCK_NAME = "sharpmeter.lock"


class RunLockedError(RuntimeError):
    """Another live run owns the folder; the message is one line saying who and what to do."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock, as its file says, to name it to a refused run.

    >>> owner = LockOwner(123, "host-a")
    >>> LockOwner.from_text(owner.to_text()) == owner
    True
    >>> owner.describe()
    'pid 123 on host-a'
    """

    pid: int
    host: str
    started: float = 0.0  # time.time() when taken

    @classmethod
    def this_process(cls) -> LockOwner:
        return cls(os.getpid(), socket.gethostname(), time.time())

    @classmethod
    def from_text(cls, text: str) -> LockOwner | None:
        """The owner a lock file names (None: it names none, e.g. its owner is writing it)."""
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        pid, host, started = data.get("pid"), data.get("host"), data.get("started")
        if not isinstance(pid, int) or not isinstance(host, str):
            return None
        return cls(pid, host, float(started) if isinstance(started, (int, float)) else 0.0)

    def to_text(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    def describe(self) -> str:
        """``pid 123 on host-a since 2025-01-02 10:00:00``."""
        since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {_one_line(self.host)}{since if self.started else ''}"


@dataclass
class RunLock:
    """The lock this process holds on ``folder``; :meth:`release` (or leaving a ``with``
    block) removes it.

    Example::

        lock = RunLock.acquire("runs/tiny")
        try:
            ...
        finally:
            lock.release()
    """

    path: Path
    # Open on the lock file, holding its flock; None where the filesystem cannot lock.
    descriptor: int | None
    # The folder the lock had to create: removed again on release if nothing was written in it.
    created_folder: Path | None = None
    released: bool = False

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> RunLock:
        """Locks ``<folder>/sharpmeter.lock`` (the folder is created when missing).

        Raises:
            RunLockedError: a live run holds it (one line: the lock, its owner, what to do).
            OSError: the lock cannot be written (the folder cannot be made, a full disk).
        """
        folder = Path(folder)
        created = None if folder.is_dir() else folder
        folder.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = _lock(folder / LOCK_NAME)
        except BaseException:
            _remove_if_empty(created)  # a refused run leaves nothing behind
            raise
        return cls(folder / LOCK_NAME, descriptor, created)

    def release(self) -> None:
        """Removes the lock (a second call does nothing)."""
        if self.released:
            return
        self.released = True
        if self.descriptor is not None:
            try:
                # Removed before it is unlocked: once unlocked, the path may name the next run's
                # lock. The check spares one that replaced ours by hand.
                if names(self.path, self.descriptor):
                    self.path.unlink()
            finally:
                close_locked(self.descriptor)
        _remove_if_empty(self.created_folder)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


@contextlib.contextmanager
def rank_zero_lock(folder: str | os.PathLike, process_index: int) -> Iterator[RunLock | None]:
    """Holds ``folder``'s lock on rank 0 (``process_index`` 0) for the ``with`` block; yields
    the lock there and None on the other ranks.

    Every rank learns from rank 0 whether it got the lock (a broadcast, outside a process
    group nothing), and a refusal is raised on all of them: a refused rank 0 that ended alone
    would leave the others waiting in their next collective until the launcher's timeout.
    Call it on every rank at the same point, before any other collective.

    Example::

        with rank_zero_lock(training_args.output_dir, training_args.process_index):
            trainer.train()
    """
    lock, refusal, error = None, None, None
    if process_index == 0:
        try:
            lock = RunLock.acquire(folder)
        except RunLockedError as failure:
            error, refusal = failure, str(failure)
        except OSError as failure:  # rank 0 raises it as it is, the others say why they stop
            error, refusal = failure, f"rank 0 cannot lock {folder}: {failure}"
    refusal = _from_rank_zero(refusal)
    if error is not None:
        raise error
    if refusal is not None:
        raise RunLockedError(refusal)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _from_rank_zero(value: str | None) -> str | None:
    """Rank 0's ``value`` on every rank (``value`` itself outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _lock(path: Path) -> int | None:
    """A descriptor open on ``path`` holding its flock, this process written in it (None,
    warned: the filesystem cannot lock).

    Raises:
        RunLockedError: another open file (another run) holds its lock.
    """
    try:
        descriptor = open_locked(path)
    except BlockingIOError:
        raise RunLockedError(_refusal(path, _owner_named_in(path))) from None
    except OSError as error:
        if error.errno not in CANNOT_LOCK:
            raise
        with contextlib.suppress(OSError):  # no file that claims a folder nobody holds
            path.unlink()
        warnings.warn(
            f"sharpmeter: {path.parent} cannot be locked ({error.strerror}); running "
            "without a lock: two runs started there would mix their outputs",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    try:
        _write_owner(descriptor)
    except BaseException:
        path.unlink()  # held, so ours: a full disk leaves no file in a folder the run made
        close_locked(descriptor)
        raise
    return descriptor


def _owner_named_in(path: Path) -> LockOwner | None:
    """The owner a held lock file names (None: unreadable, or its owner is writing it)."""
    try:
        return LockOwner.from_text(path.read_text(errors="replace"))
    except OSError:
        return None


def _write_owner(descriptor: int) -> None:
    """Writes this process over what the lock file held (what a killed owner left), synced."""
    data = LockOwner.this_process().to_text().encode()
    os.ftruncate(descriptor, 0)
    written = 0
    while written < len(data):
        written += os.pwrite(descriptor, data[written:], written)
    os.fsync(descriptor)


def _refusal(path: Path, owner: LockOwner | None) -> str:
    holder = owner.describe() if owner is not None else "a run that is just starting"
    return (
        f"{path.parent} is in use by another run: {path} is locked by {holder}; wait for that "
        "run to end, or give this one another output folder"
    )


def _remove_if_empty(folder: Path | None) -> None:
    if folder is not None:
        with contextlib.suppress(OSError):  # not empty: a run wrote into it
            folder.rmdir()


def _one_line(text: str) -> str:
    return " ".join(text.split())
