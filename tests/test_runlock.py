"""One run per folder: a second owner is refused in one line, a dead owner's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from ranks import run_on_ranks

from sharpmeter.runlock import LOCK_NAME, RunLock, RunLockedError, rank_zero_lock

HOST = socket.gethostname()


@pytest.fixture
def live_pid():
    """The pid of a live process that is not this one."""
    sleeper = subprocess.Popen(["sleep", "60"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


def dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


def write_lock(folder: Path, pid: int, host: str = HOST, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host, "started": time.time(), **extra}))
    return path


def owner_pid(path: Path) -> int:
    return json.loads(path.read_text())["pid"]


def test_a_live_owner_refuses_a_second_one_in_one_line(tmp_path, live_pid):
    path = write_lock(tmp_path, live_pid)
    with pytest.raises(RunLockedError) as refused:
        RunLock.acquire(tmp_path)
    message = str(refused.value)
    assert "\n" not in message
    for part in (str(path), f"pid {live_pid}", HOST, "remove it if that process is gone"):
        assert part in message, part
    assert owner_pid(path) == live_pid  # left as it was


def test_the_same_process_cannot_take_a_folder_twice(tmp_path):
    with RunLock.acquire(tmp_path):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock.acquire(tmp_path)
        assert owner_pid(tmp_path / LOCK_NAME) == os.getpid()


def test_an_owner_on_another_host_is_never_judged_stale(tmp_path):
    write_lock(tmp_path, dead_pid(), host="elsewhere.example")
    with pytest.raises(RunLockedError, match="on elsewhere.example"):
        RunLock.acquire(tmp_path)


def test_a_dead_owners_lock_is_taken_over_with_a_warning(tmp_path):
    path = write_lock(tmp_path, dead_pid())
    with pytest.warns(RuntimeWarning, match="stale lock"):
        lock = RunLock.acquire(tmp_path)
    with lock:
        assert owner_pid(path) == os.getpid()
    assert not path.exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_reused_pid_does_not_keep_a_dead_owners_lock(tmp_path, live_pid):
    # The owner died and its pid went to another process: the start times tell them apart.
    path = write_lock(tmp_path, live_pid, process_start="1")
    with pytest.warns(RuntimeWarning, match="stale lock"):
        with RunLock.acquire(tmp_path):
            assert owner_pid(path) == os.getpid()


def test_an_unreadable_lock_is_taken_over_only_once_old(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text("")  # a lock being written right now looks the same
    with pytest.raises(RunLockedError, match="not readable yet"):
        RunLock.acquire(tmp_path)
    old = time.time() - 60
    os.utime(path, (old, old))
    with pytest.warns(RuntimeWarning, match="stale lock"):
        with RunLock.acquire(tmp_path):
            assert owner_pid(path) == os.getpid()


def test_the_lock_is_released_after_a_normal_exit_and_after_an_exception(tmp_path):
    path = tmp_path / "run" / LOCK_NAME
    with RunLock.acquire(tmp_path / "run"):
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == HOST and owner["started"] > 0
    assert not path.exists()
    with pytest.raises(KeyError):
        with RunLock.acquire(tmp_path / "run"):
            raise KeyError("a failing run")
    assert not path.exists()
    RunLock.acquire(tmp_path / "run").release()  # free again


def test_a_folder_the_lock_made_goes_with_it_when_nothing_was_written(tmp_path):
    with RunLock.acquire(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()
    with RunLock.acquire(tmp_path / "kept"):
        (tmp_path / "kept" / "rows.jsonl").write_text("{}\n")
    assert list((tmp_path / "kept").iterdir()) == [tmp_path / "kept" / "rows.jsonl"]


def test_a_lock_taken_over_by_another_owner_is_left_to_it(tmp_path, live_pid):
    path = tmp_path / LOCK_NAME
    lock = RunLock.acquire(tmp_path)
    write_lock(tmp_path, live_pid)  # someone judged us gone and took it
    with pytest.warns(RuntimeWarning, match="taken over"):
        lock.release()
    assert owner_pid(path) == live_pid


HOLDER = """
import sys, time
from sharpmeter.runlock import RunLock
lock = RunLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def test_a_run_killed_with_sigkill_does_not_block_the_next_one(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock.acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert owner_pid(tmp_path / LOCK_NAME) == holder.pid  # left behind by the kill
    with pytest.warns(RuntimeWarning, match=f"pid {holder.pid}.* is gone"):
        with RunLock.acquire(tmp_path):
            assert owner_pid(tmp_path / LOCK_NAME) == os.getpid()


def lock_on_ranks(folder: str) -> tuple[str | None, bool]:
    """On each rank: the refusal it got (None: none), and whether it holds the lock object."""
    try:
        with rank_zero_lock(folder, dist.get_rank()) as lock:
            return None, lock is not None
    except RunLockedError as error:
        return str(error), False


def test_every_rank_is_refused_when_rank_zero_is(tmp_path, live_pid):
    write_lock(tmp_path, live_pid)
    refusals = run_on_ranks(lock_on_ranks, str(tmp_path))
    assert [message for message, _ in refusals] == [refusals[0][0]] * 2
    assert f"pid {live_pid}" in refusals[0][0]


def test_only_rank_zero_holds_the_lock(tmp_path):
    assert run_on_ranks(lock_on_ranks, str(tmp_path)) == [(None, True), (None, False)]
    assert not (tmp_path / LOCK_NAME).exists()
