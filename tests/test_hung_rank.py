"""A stopped or hung rank ends a data-parallel run after the process group timeout, with an error
that says so, instead of holding the other ranks in a collective for ever (issue #13)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch.distributed as dist
from conftest import causal_lm_loss, float64_gpt2, token_batch
from ranks import run_on_ranks

import sharpmeter as sm
from sharpmeter.integrations.hf import ddp_timeout
from sharpmeter.measure.distributed import (
    CollectiveError,
    group_timeout,
    honour_timeout,
    local_shard,
)
from sharpmeter.paper.records import read_records

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "train_gpt.py"
CONFIG = ROOT / "configs" / "tiny.yaml"
DDP_TIMEOUT = 20  # seconds, the run's --ddp_timeout
GRACE = 30  # seconds past the timeout a rank may take to see it and exit
STARTUP = 300  # seconds two ranks may take to log their first rows on a busy machine
# sharpmeter's words for a measurement collective, or gloo's for the Trainer's own: either names
# --ddp_timeout, not torch's default of 30 minutes
TIMEOUT_ERROR = re.compile(
    rf"process group timeout \({DDP_TIMEOUT} s\)|Timed out waiting {DDP_TIMEOUT * 1000}ms"
)


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_within_ddp_timeout(tmp_path):
    """Two CPU ranks measure every step; rank 1 is stopped (SIGSTOP, so its sockets stay open
    and nothing tells rank 0 it is gone): rank 0 must give up after ``--ddp_timeout`` and exit
    with an error naming the timeout, not wait for gloo's default half hour."""
    out, log = tmp_path / "run", tmp_path / "launcher.log"
    launcher = launch(out, log)
    ranks: dict[int, psutil.Process] = {}
    try:
        ranks = wait_for_ranks(launcher, log)
        wait_for_rows(out / "sharpness.jsonl", 2, launcher, log)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        gone = wait_until_gone(ranks[0], DDP_TIMEOUT + GRACE)
        waited = time.monotonic() - stopped
    finally:
        end_all(launcher, ranks)
    output = log.read_text(errors="replace")
    assert gone, f"rank 0 still running {waited:.0f} s after rank 1 stopped:\n{output[-3000:]}"
    assert launcher.returncode != 0
    assert TIMEOUT_ERROR.search(output), output[-3000:]


def measure_while_the_other_rank_sleeps(seconds: float) -> dict:
    """Rank 1 stops taking part (alive, its sockets open, as a stopped rank) once both ranks
    hold a meter; rank 0 measures, then asks whether the next measurement is due."""
    meter = sm.SharpnessMeter(
        float64_gpt2(),
        local_shard(token_batch(batch_size=4)),
        causal_lm_loss,
        measures=("critical",),
        schedule=sm.Schedule(every=1, max_fraction=0.5),
    )
    honour_timeout(timedelta(seconds=seconds))
    outcome = {"timeout": group_timeout()}
    if dist.get_rank() == 1:
        time.sleep(4 * seconds)
        return outcome
    for name, call in (("measure", lambda: meter.measure(1)), ("is_due", lambda: meter.is_due(2))):
        started = time.monotonic()
        try:
            call()
        except CollectiveError as error:
            outcome[name] = (str(error), time.monotonic() - started)
    return outcome


def test_a_measurement_on_a_hung_group_raises_after_the_timeout_it_was_given():
    """honour_timeout shortens the group's timeout (60 s here) on every rank; a measurement
    whose collective times out ends in a CollectiveError, not in an ``error`` row that would
    let training go on into the next collective; the broken group fails the next one at once."""
    first, second = run_on_ranks(measure_while_the_other_rank_sleeps, 2.0)
    assert first["timeout"] == second["timeout"] == timedelta(seconds=2)
    message, waited = first["measure"]
    assert 2 <= waited < 10
    assert message.startswith(
        "sharpmeter: a measurement all-reduce on rank 0 failed (process group timeout 2 s): "
        "another rank is stopped, hung or dead"
    )
    assert "Timed out" in message
    message, waited = first["is_due"]
    assert "broadcast of whether a measurement is due on rank 0 failed" in message
    assert waited < 2


def test_honour_timeout_outside_a_process_group_and_without_torchs_private_api(monkeypatch):
    """One process: nothing to set. A torch whose private setter fails: a warning, no error."""
    honour_timeout(timedelta(seconds=5))
    assert group_timeout() is None

    def refuse(timeout, group=None):
        raise AttributeError("no such backend")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist.distributed_c10d, "_set_pg_timeout", refuse)
    with pytest.warns(RuntimeWarning, match="cannot set the process group timeout to 5 s"):
        honour_timeout(timedelta(seconds=5))


def test_the_callback_reads_ddp_timeout_with_or_without_its_timedelta():
    assert ddp_timeout(SimpleNamespace(ddp_timeout=30)) == timedelta(seconds=30)
    assert ddp_timeout(SimpleNamespace(ddp_timeout=1800)) is None  # the default: left alone
    args = SimpleNamespace(ddp_timeout=30, ddp_timeout_delta=timedelta(seconds=7))
    assert ddp_timeout(args) == timedelta(seconds=7)


def launch(out: Path, log: Path) -> subprocess.Popen:
    """Two gloo ranks of the tiny recipe, measuring every step for longer than the test waits;
    their output goes to ``log`` (a file: a pipe nobody reads could block them)."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", str(RECIPE)]
    options = ["--max_steps", "400", "--every", "1", "--ddp_timeout", str(DDP_TIMEOUT)]
    options += ["--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(out.parent)}
    with log.open("w") as sink:
        return subprocess.Popen(
            [*command, str(CONFIG), *options], stdout=sink, stderr=subprocess.STDOUT, env=env
        )


def wait_for_ranks(launcher: subprocess.Popen, log: Path) -> dict[int, psutil.Process]:
    """The launcher's worker processes by their ``LOCAL_RANK``."""
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        check_running(launcher, log)
        ranks = {}
        for child in psutil.Process(launcher.pid).children(recursive=True):
            rank = local_rank(child)
            if rank is not None and local_rank(child.parent()) is None:
                ranks[int(rank)] = child
        if len(ranks) == 2:
            return ranks
        time.sleep(0.5)
    raise AssertionError("the launcher started no two ranks")


def local_rank(process: psutil.Process | None) -> str | None:
    try:
        return process.environ().get("LOCAL_RANK") if process is not None else None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def wait_for_rows(path: Path, count: int, launcher: subprocess.Popen, log: Path) -> None:
    """Until ``path`` holds ``count`` measurements: both ranks are in their training loop."""
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        check_running(launcher, log)
        try:
            if path.exists() and len(read_records(path)) >= count:
                return
        except ValueError:  # a line half written: read again
            pass
        time.sleep(0.5)
    raise AssertionError(f"no {count} rows in {path} after {STARTUP} s")


def check_running(launcher: subprocess.Popen, log: Path) -> None:
    if launcher.poll() is not None:
        raise AssertionError(f"the run ended early:\n{log.read_text(errors='replace')[-3000:]}")


def wait_until_gone(process: psutil.Process, seconds: float) -> bool:
    """Whether ``process`` exited (a zombie its parent has not reaped counts) within
    ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def end_all(launcher: subprocess.Popen, ranks: dict[int, psutil.Process]) -> None:
    """Kill every process the launcher started, then the launcher: none outlives the test. A
    stopped process is continued first so that it can run its death."""
    try:
        processes = {*ranks.values(), *psutil.Process(launcher.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        processes = set(ranks.values())
    for process in processes:
        try:
            process.send_signal(signal.SIGCONT)
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(processes), timeout=30)
    if launcher.poll() is None:
        launcher.kill()
    launcher.wait(timeout=60)
