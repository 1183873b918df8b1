"""One run per folder: a run (or a study) owns its output folder while it writes into it.

Two runs started on the same ``output_dir`` would interleave their JSONL rows and both end
well. The first to start creates ``<folder>/sharpmeter.lock`` (atomically: ``O_CREAT |
O_EXCL``) holding its pid, host and start time; a second one is refused in one line naming the
lock, its owner and what to do. The lock goes when its owner ends, normally or by an exception;
a lock left by an owner killed outright (``kill -9``, a crash of the machine) is stale and taken
over, with a warning, by the next run:

* its host is this one and its pid is not alive, or is alive but started after the lock was
  taken (the pid went to another process);
* or it cannot be read (empty or torn: its owner died while writing it) and is older than
  :data:`UNREADABLE_GRACE_S` seconds (a younger one may be being written right now).

A lock of another host is never judged stale: its pid cannot be checked from here.

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
import secrets
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LOCK_NAME = "sharpmeter.lock"
# How long an unreadable lock may be one that its owner is still writing: the owner writes a
# few hundred bytes right after creating it, so seconds are far more than that takes.
UNREADABLE_GRACE_S = 5.0
# Takeovers tried before giving up: each is lost only to another process starting meanwhile.
_ATTEMPTS = 3


class RunLockedError(RuntimeError):
    """Another live run owns the folder; the message is one line saying who and what to do."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: enough to tell, on the same host, whether it is still alive."""

    pid: int
    host: str
    started: float = 0.0  # time.time() when taken
    # The process's start time in clock ticks after boot (Linux): tells the owner from another
    # process that got its pid after it died. None where unknown.
    process_start: str | None = None
    # Unique per acquisition: a release removes only the lock it took.
    token: str = ""

    @classmethod
    def this_process(cls) -> LockOwner:
        pid = os.getpid()
        host = socket.gethostname()
        return cls(pid, host, time.time(), _process_start(pid), secrets.token_hex(8))

    @classmethod
    def from_text(cls, text: str) -> LockOwner | None:
        """The owner a lock file names (None: it names none, e.g. empty or torn)."""
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        pid, host = data.get("pid"), data.get("host")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return None
        if not isinstance(host, str):
            return None
        started = data.get("started")
        process_start = data.get("process_start")
        return cls(
            pid,
            host,
            float(started) if isinstance(started, (int, float)) else 0.0,
            str(process_start) if process_start is not None else None,
            str(data.get("token", "")),
        )

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
    owner: LockOwner
    # The folder the lock had to create: removed again on release if nothing was written in it.
    created_folder: Path | None = None
    released: bool = False

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> RunLock:
        """Takes ``<folder>/sharpmeter.lock`` (the folder is created when missing).

        Raises:
            RunLockedError: a live run holds it (one line: the lock, its owner, what to do).
            OSError: the lock cannot be written (the folder cannot be made, a full disk).
        """
        folder = Path(folder)
        created = None if folder.is_dir() else folder
        folder.mkdir(parents=True, exist_ok=True)
        owner = LockOwner.this_process()
        try:
            _take(folder / LOCK_NAME, owner)
        except BaseException:
            if created is not None:  # a refused run leaves nothing behind
                with contextlib.suppress(OSError):
                    created.rmdir()
            raise
        return cls(folder / LOCK_NAME, owner, created)

    def release(self) -> None:
        """Removes the lock if it is still this one's (a second call does nothing)."""
        if self.released:
            return
        self.released = True
        seen = _read_lock(self.path)
        if seen is not None and (seen.owner is None or seen.owner.token != self.owner.token):
            # Someone judged this owner gone and took the folder: the lock is theirs now.
            warnings.warn(
                f"sharpmeter: {self.path} was taken over by another run meanwhile; left to it",
                RuntimeWarning,
                stacklevel=2,
            )
        elif seen is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self.created_folder is not None:
            with contextlib.suppress(OSError):  # not empty: the run wrote into it
                self.created_folder.rmdir()

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


def _take(path: Path, owner: LockOwner) -> None:
    """Creates the lock ``path`` for ``owner``, taking over a stale one (RunLockedError: a
    live owner holds it)."""
    for _ in range(_ATTEMPTS):
        try:
            _create_exclusively(path, owner.to_text())
            return
        except FileExistsError:
            pass
        seen = _read_lock(path)
        if seen is None:  # its owner released it meanwhile: try again
            continue
        stale = _stale_reason(seen)
        if stale is None:
            raise RunLockedError(_refusal(path, seen.owner))
        warnings.warn(
            f"sharpmeter: taking over the stale lock {path}: {stale}",
            RuntimeWarning,
            stacklevel=3,
        )
        _remove_if_unchanged(path, seen)
    raise RunLockedError(
        f"{path} keeps being taken by other runs starting in {path.parent}; start one at a time"
    )


@dataclass(frozen=True)
class _SeenLock:
    """A lock file as read: its owner (None: unreadable) and what identifies this very file."""

    owner: LockOwner | None
    identity: tuple[int, int, int]  # device, inode, modification time (ns)
    age_s: float


def _create_exclusively(path: Path, text: str) -> None:
    """Creates ``path`` holding ``text``, synced; FileExistsError if it exists. A failed write
    removes it again, so a full disk leaves no lock that would block the next run."""
    descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        data = memoryview(text.encode("utf-8"))
        while data:
            data = data[os.write(descriptor, data) :]
        os.fsync(descriptor)
    except BaseException:
        os.close(descriptor)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(descriptor)


def _read_lock(path: Path) -> _SeenLock | None:
    """The lock file now (None: there is none). Read through one descriptor, so that its
    content and identity belong to the same file."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        stat = os.fstat(descriptor)
        chunks = []
        while chunk := os.read(descriptor, 65536):
            chunks.append(chunk)
    finally:
        os.close(descriptor)
    try:
        owner = LockOwner.from_text(b"".join(chunks).decode("utf-8"))
    except UnicodeDecodeError:
        owner = None
    identity = (stat.st_dev, stat.st_ino, stat.st_mtime_ns)
    return _SeenLock(owner, identity, time.time() - stat.st_mtime)


def _stale_reason(seen: _SeenLock) -> str | None:
    """Why the lock seen is stale, or None while its owner may still be running."""
    owner = seen.owner
    if owner is None:
        if seen.age_s > UNREADABLE_GRACE_S:
            return f"it is unreadable (empty or torn) and {seen.age_s:.0f} s old"
        return None
    if owner.host != socket.gethostname() or os.name == "nt":
        # A pid of another machine cannot be checked from here; on Windows os.kill(pid, 0)
        # would end the process instead of probing it.
        return None
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return f"its owner, pid {owner.pid}, is gone"
    except PermissionError:
        pass  # alive, under another user
    current = _process_start(owner.pid)
    if owner.process_start is not None and current is not None and current != owner.process_start:
        return f"its owner, pid {owner.pid}, is gone (the pid now belongs to another process)"
    return None


def _refusal(path: Path, owner: LockOwner | None) -> str:
    folder = path.parent
    if owner is None:
        return (
            f"{folder} is being taken by another run: {path} is not readable yet; if no other "
            "run is starting there, remove it"
        )
    return (
        f"{folder} is in use by another run: {path} is held by {owner.describe()}; wait for "
        "that run to end, or remove it if that process is gone"
    )


def _remove_if_unchanged(path: Path, seen: _SeenLock) -> None:
    """Removes the stale lock ``seen``, and only it: another process may have replaced it
    meanwhile (taking it over too). Moving it aside first is atomic, so of two processes
    taking over the same stale lock one moves it and the other finds nothing to move; a lock
    moved aside that turns out not to be the one judged stale is put back."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        stat = os.stat(aside)
        if (stat.st_dev, stat.st_ino, stat.st_mtime_ns) != seen.identity:
            _put_back(aside, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()


def _put_back(aside: Path, path: Path) -> None:
    """Moves a live lock moved aside by mistake back, unless yet another run took the folder
    since (a hard link never replaces a file; a folder without hard links gets a rename)."""
    try:
        os.link(aside, path)
    except FileExistsError:
        return
    except OSError:
        if not path.exists():
            os.replace(aside, path)


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks after boot (None: no ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (second field) may hold spaces and parentheses: count after its end.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _one_line(text: str) -> str:
    return " ".join(text.split())
