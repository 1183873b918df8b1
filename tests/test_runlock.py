"""One run per folder: while a live process holds the flock a second run is refused in one line;
a killed owner's file is simply locked again."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import FLOCK_HOLDER, RUN_HOLDER
from ranks import run_on_ranks

from sharpmeter.harness.runlock import LOCK_NAME, RunLock, RunLockedError, rank_zero_lock
from sharpmeter.measure import files

HOST = socket.gethostname()


def dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


def owner_text(pid: int, host: str = HOST) -> str:
    return json.dumps({"pid": pid, "host": host, "started": time.time()})


def owner_pid(path: Path) -> int:
    return json.loads(path.read_text())["pid"]


def test_a_run_killed_with_sigkill_refuses_others_until_then_and_blocks_nothing_after(
    tmp_path, hold
):
    holder = hold(RUN_HOLDER, str(tmp_path))
    path = tmp_path / LOCK_NAME
    with pytest.raises(RunLockedError) as refused:
        RunLock.acquire(tmp_path)
    message = str(refused.value)
    assert "\n" not in message
    for part in (str(path), f"pid {holder.pid} on {HOST} since", "wait for that run to end"):
        assert part in message, part
    assert owner_pid(path) == holder.pid  # left as it was

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert owner_pid(path) == holder.pid  # left behind by the kill
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # simply locked again
        with RunLock.acquire(tmp_path):
            assert owner_pid(path) == os.getpid()
    assert not path.exists()


def test_a_live_holder_naming_a_pid_unknown_here_is_still_refused(tmp_path, hold):
    # Another container on this kernel: same host name, a pid of another namespace.
    gone = dead_pid()
    hold(FLOCK_HOLDER, str(tmp_path / LOCK_NAME), owner_text(gone))
    with pytest.raises(RunLockedError, match=f"pid {gone} on {re.escape(HOST)}"):
        RunLock.acquire(tmp_path)
    assert owner_pid(tmp_path / LOCK_NAME) == gone


def test_a_holder_still_writing_its_name_is_refused_as_a_run_starting(tmp_path, hold):
    hold(FLOCK_HOLDER, str(tmp_path / LOCK_NAME), "")
    with pytest.raises(RunLockedError, match="locked by a run that is just starting"):
        RunLock.acquire(tmp_path)


def test_the_same_process_cannot_take_a_folder_twice(tmp_path):
    with RunLock.acquire(tmp_path):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock.acquire(tmp_path)
        assert owner_pid(tmp_path / LOCK_NAME) == os.getpid()  # the refused one wrote nothing


def test_the_lock_is_released_after_a_normal_exit_and_after_an_exception(tmp_path):
    path = tmp_path / "run" / LOCK_NAME
    (tmp_path / "run").mkdir()
    with RunLock.acquire(tmp_path / "run"):
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == HOST and owner["started"] > 0
    assert not path.exists()
    with pytest.raises(KeyError):
        with RunLock.acquire(tmp_path / "run"):
            raise KeyError("a failing run")
    assert not path.exists()
    lock = RunLock.acquire(tmp_path / "run")
    lock.release()
    lock.release()  # does nothing
    assert list((tmp_path / "run").iterdir()) == []


def test_a_folder_the_lock_made_goes_with_it_when_nothing_was_written(tmp_path):
    with RunLock.acquire(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()
    with RunLock.acquire(tmp_path / "kept"):
        (tmp_path / "kept" / "rows.jsonl").write_text("{}\n")
    assert list((tmp_path / "kept").iterdir()) == [tmp_path / "kept" / "rows.jsonl"]


def test_a_lock_file_replaced_by_hand_is_left_by_the_release(tmp_path):
    path = tmp_path / LOCK_NAME
    lock = RunLock.acquire(tmp_path)
    path.unlink()
    path.write_text(owner_text(dead_pid()))
    lock.release()
    assert path.exists()


def test_a_lock_released_between_open_and_flock_is_taken_at_its_new_file(tmp_path, monkeypatch):
    first = RunLock.acquire(tmp_path)
    locked = []

    def release_first_then_flock(descriptor: int, operation: int) -> None:
        first.release()  # the second run opened first's file, which first now removes
        locked.append(descriptor)
        real_flock(descriptor, operation)

    real_flock = files.flock
    monkeypatch.setattr(files, "flock", release_first_then_flock)
    with RunLock.acquire(tmp_path) as second:
        assert len(locked) == 2  # the removed file, then the one the path names now
        assert os.path.samestat(os.stat(second.path), os.fstat(second.descriptor))
        monkeypatch.undo()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock.acquire(tmp_path)


def test_a_filesystem_that_cannot_lock_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    def no_locks(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(files, "flock", no_locks)
    folder = tmp_path / "run"
    warning = f"{re.escape(str(folder))} cannot be locked .*two runs started there would mix"
    with pytest.warns(RuntimeWarning, match=warning):
        lock = RunLock.acquire(folder)
    with lock:
        assert lock.descriptor is None and list(folder.iterdir()) == []
    assert not folder.exists()


def test_a_lock_that_cannot_be_written_leaves_nothing_behind(tmp_path, monkeypatch):
    def full_disk(*args) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        RunLock.acquire(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def lock_on_ranks(folder: str) -> tuple[str | None, bool]:
    """On each rank: the refusal it got (None: none), and whether it holds the lock object."""
    try:
        with rank_zero_lock(folder, dist.get_rank()) as lock:
            return None, lock is not None
    except RunLockedError as error:
        return str(error), False


def test_every_rank_is_refused_when_rank_zero_is(tmp_path, hold):
    holder = hold(FLOCK_HOLDER, str(tmp_path / LOCK_NAME), owner_text(os.getpid()))
    refusals = run_on_ranks(lock_on_ranks, str(tmp_path))
    assert [message for message, _ in refusals] == [refusals[0][0]] * 2
    assert f"pid {os.getpid()}" in refusals[0][0] and holder.poll() is None


def test_only_rank_zero_holds_the_lock(tmp_path):
    assert run_on_ranks(lock_on_ranks, str(tmp_path)) == [(None, True), (None, False)]
    assert not (tmp_path / LOCK_NAME).exists()
