"""JsonlSink under failing writes: training never stops, and the file ends up whole and in order.

WandbSink and wandb_mode: what an offline W&B run holds, read back from its file.

Tests may run as root, for whom a read-only folder is writable; failures are made by a regular
file where the folder should be (no one can create a file inside it) or by a fake full disk
(``open`` in ``sharpmeter.measure.sinks`` replaced by one whose files fail after writing part
of a line).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import wandb
import wandb_records
from conftest import FLOCK_HOLDER
from google.protobuf.message import DecodeError
from wandb.sdk.lib import wbauth

from sharpmeter.measure import files, sinks
from sharpmeter.measure.sinks import (
    JsonlLockedError,
    JsonlSink,
    Sink,
    SinkWarning,
    WandbSink,
    wandb_mode,
)

META = {"run": "r1", "n_params": 7, "seed": 0}
STARTED = {**META, "finished": False}  # the metadata a sink writes until the run ends normally


class DiskFull:
    """Files opened while ``full`` is set write half of what they are given, then fail."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, suffix: str, truncate_fails=False):
        self.full = False
        self.suffix = suffix
        self.truncate_fails = truncate_fails

        def fake_open(file, mode="r", *args, **kwargs):
            handle = open(file, mode, *args, **kwargs)
            if self.full and str(file).endswith(suffix):
                return FailingFile(handle, self)
            return handle

        for module in (sinks, files):  # appends, and atomic metadata writes
            monkeypatch.setattr(module, "open", fake_open, raising=False)


class FailingFile:
    def __init__(self, handle, disk: DiskFull) -> None:
        self.handle = handle
        self.disk = disk

    def write(self, data) -> int:
        self.handle.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def truncate(self, size: int) -> int:
        if self.disk.truncate_fails:
            raise OSError(errno.EIO, "Input/output error")
        return self.handle.truncate(size)

    def __getattr__(self, name: str):
        return getattr(self.handle, name)

    def __enter__(self) -> FailingFile:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_that_cannot_be_made_keeps_rows_until_it_can(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the run folder should be")
    path = blocker / "sharpness.jsonl"
    with pytest.warns(SinkWarning, match=r"out.*kept in memory"):
        sink = JsonlSink(path, META)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per outage, not one per row
        sink.write({"step": 0, "critical": 1.0})
        sink.write({"step": 1, "critical": float("nan")})
    assert len(sink.pending) == 2

    blocker.unlink()
    with pytest.warns(SinkWarning, match="3 pending rows written"):
        sink.write({"step": 2, "critical": 3.0})
    assert sink.pending == []
    assert rows_of(path) == [
        {"run": "r1", "n_params": 7, "step": 0, "critical": 1.0},
        {"run": "r1", "n_params": 7, "step": 1, "critical": None},
        {"run": "r1", "n_params": 7, "step": 2, "critical": 3.0},
    ]
    assert json.loads((blocker / "sharpness.meta.json").read_text()) == STARTED


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="read-only folders bind non-root only"
)
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    try:
        with pytest.warns(SinkWarning, match="ro"):
            sink = JsonlSink(folder / "run" / "sharpness.jsonl", META)
        sink.write({"step": 0})
        folder.chmod(0o700)
        with pytest.warns(SinkWarning, match="2 pending rows written"):
            sink.write({"step": 1})
    finally:
        folder.chmod(0o700)
    assert [row["step"] for row in rows_of(sink.path)] == [0, 1]


@pytest.mark.parametrize("truncate_fails", [False, True])
def test_full_disk_leaves_no_torn_line(tmp_path, monkeypatch, truncate_fails):
    disk = DiskFull(monkeypatch, ".jsonl", truncate_fails=truncate_fails)
    path = tmp_path / "sharpness.jsonl"
    sink = JsonlSink(path, META)
    sink.write({"step": 0, "critical": 1.0})

    disk.full = True
    with pytest.warns(SinkWarning, match="No space left") as caught:
        sink.write({"step": 1, "critical": 2.0})
        sink.write({"step": 2, "critical": 3.0})
    assert len(caught) == 1
    if not truncate_fails:
        assert [row["step"] for row in rows_of(path)] == [0]

    disk.full = False
    with pytest.warns(SinkWarning, match="3 pending rows written"):
        sink.write({"step": 3, "critical": 4.0})
    rows = rows_of(path)  # every line parses: nothing was glued onto a half line
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert all(row["run"] == "r1" for row in rows)


def test_failed_metadata_write_leaves_no_earlier_metadata_describing_the_run(tmp_path, monkeypatch):
    disk = DiskFull(monkeypatch, ".tmp")
    path = tmp_path / "sharpness.jsonl"
    meta_path = tmp_path / "sharpness.meta.json"
    JsonlSink(path, META).close()
    disk.full = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sink = JsonlSink(path, {**META, "run": "r2"})
    messages = [str(w.message) for w in caught]
    assert any("sharpness.meta.json -> sharpness.1.meta.json" in m for m in messages)
    assert any(re.search(r"sharpness\.meta\.json.*No space left", m) for m in messages)
    assert not meta_path.exists()  # the earlier run's, moved aside whole
    assert json.loads((tmp_path / "sharpness.1.meta.json").read_text()) == STARTED
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temporary file left
        "sharpness.1.meta.json",
        "sharpness.jsonl",
    ]

    disk.full = False
    with pytest.warns(SinkWarning, match="1 pending rows written"):
        sink.write({"step": 0})
    assert json.loads(meta_path.read_text())["run"] == "r2"


def test_failed_first_metadata_write_leaves_no_metadata_file(tmp_path, monkeypatch):
    disk = DiskFull(monkeypatch, ".tmp")
    disk.full = True
    with pytest.warns(SinkWarning, match="meta"):
        JsonlSink(tmp_path / "sharpness.jsonl", META)
    assert [p.name for p in tmp_path.iterdir()] == ["sharpness.jsonl"]  # held, empty


def test_close_reports_the_rows_it_could_not_write(tmp_path, monkeypatch):
    disk = DiskFull(monkeypatch, ".jsonl")
    sink = JsonlSink(tmp_path / "sharpness.jsonl", META)
    disk.full = True
    with pytest.warns(SinkWarning, match="No space left"):
        sink.write({"step": 0})
        sink.write({"step": 1})
    with pytest.warns(SinkWarning, match="2 rows could not be written"):
        sink.close()
    assert sink.pending == []


def test_resume_drops_later_rows_and_a_torn_line(tmp_path):
    path = tmp_path / "sharpness.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(4)) + '{"step": 4, "cr')
    sink = JsonlSink(path, resume_step=1)
    sink.write({"step": 2})
    assert [row["step"] for row in rows_of(path)] == [0, 1, 2]


def test_a_second_live_writer_is_refused_and_the_first_keeps_its_rows(tmp_path):
    path = tmp_path / "sharpness.jsonl"
    first = JsonlSink(path, META)
    first.write({"step": 10})
    with pytest.raises(JsonlLockedError, match=f"{re.escape(str(path))}.*different output_dir"):
        JsonlSink(path, {**META, "run": "r2"})
    first.write({"step": 20})
    first.close()
    assert [row["step"] for row in rows_of(path)] == [10, 20]
    assert json.loads((tmp_path / "sharpness.meta.json").read_text())["run"] == "r1"
    JsonlSink(path, META, resume_step=20).close()  # closed: the file is free again


def test_a_closed_sinks_lock_is_not_held_by_a_child_forked_while_it_was_open(tmp_path, fork_child):
    path = tmp_path / "sharpness.jsonl"
    sink = JsonlSink(path, META)
    sink.write({"step": 1})
    fork_child()  # a DataLoader worker: it lives on after the sink is closed
    sink.close()
    JsonlSink(path, META, resume_step=1).close()


def test_a_writer_in_another_process_is_refused_until_it_ends(tmp_path, hold):
    path = tmp_path / "sharpness.jsonl"
    holder = hold(FLOCK_HOLDER, str(path), json.dumps({"step": 5}) + "\n")
    with pytest.raises(JsonlLockedError, match="another live sharpmeter writer"):
        JsonlSink(path, META)
    assert rows_of(path) == [{"step": 5}]
    holder.kill()
    holder.wait()
    with pytest.warns(RuntimeWarning, match=r"sharpness\.jsonl -> sharpness\.1\.jsonl"):
        JsonlSink(path, META, resume_step=None).write({"step": 1})
    assert rows_of(tmp_path / "sharpness.1.jsonl") == [{"step": 5}]


def test_an_earlier_runs_files_are_moved_aside_not_truncated(tmp_path):
    path = tmp_path / "sharpness.jsonl"
    for run, steps in (("r1", [10, 20]), ("r2", [5])):
        sink = JsonlSink(path, {**META, "run": run})
        for step in steps:
            sink.write({"step": step})
        sink.mark_finished()
        sink.close()
    with pytest.warns(RuntimeWarning) as caught:
        sink = JsonlSink(path)  # no metadata: the earlier one must not describe this run
    (warning,) = [str(w.message) for w in caught]
    assert "sharpness.jsonl -> sharpness.2.jsonl" in warning
    assert "sharpness.meta.json -> sharpness.2.meta.json" in warning
    sink.write({"step": 1})
    sink.close()
    assert [row["step"] for row in rows_of(tmp_path / "sharpness.1.jsonl")] == [10, 20]
    assert [row["step"] for row in rows_of(tmp_path / "sharpness.2.jsonl")] == [5]
    assert json.loads((tmp_path / "sharpness.2.meta.json").read_text())["run"] == "r2"
    assert rows_of(path) == [{"step": 1}]
    assert not (tmp_path / "sharpness.meta.json").exists()


def test_resume_elsewhere_starts_with_the_rows_of_the_checkpoints_run(tmp_path):
    earlier = tmp_path / "a" / "sharpness.jsonl"
    earlier.parent.mkdir()
    earlier.write_text("".join(json.dumps({"step": s}) + "\n" for s in (4, 8, 12)))
    path = tmp_path / "b" / "sharpness.jsonl"
    sink = JsonlSink(path, META, resume_step=8, resume_rows_from=earlier)
    sink.write({"step": 12})
    assert sink.resumed_rows == 2
    assert [row["step"] for row in rows_of(path)] == [4, 8, 12]
    assert [row["step"] for row in rows_of(earlier)] == [4, 8, 12]  # read, never changed
    sink.close()
    with pytest.warns(RuntimeWarning, match=r"sharpness\.jsonl -> sharpness\.1\.jsonl"):
        again = JsonlSink(path, META, resume_step=8, resume_rows_from=earlier)  # resumed again
    assert again.resumed_rows == 2 and [row["step"] for row in rows_of(path)] == [4, 8]
    assert [row["step"] for row in rows_of(tmp_path / "b" / "sharpness.1.jsonl")] == [4, 8, 12]


def test_resume_elsewhere_moves_an_unrelated_runs_file_aside(tmp_path):
    earlier = tmp_path / "a" / "sharpness.jsonl"
    earlier.parent.mkdir()
    earlier.write_text("".join(json.dumps({"run": "a", "step": s}) + "\n" for s in (4, 8, 12)))
    path = tmp_path / "b" / "sharpness.jsonl"
    unrelated = JsonlSink(path, {**META, "run": "x"})
    for step in (2, 4, 6, 8, 10):
        unrelated.write({"step": step})
    unrelated.mark_finished()
    unrelated.close()
    with pytest.warns(RuntimeWarning) as caught:
        sink = JsonlSink(path, META, resume_step=8, resume_rows_from=earlier)
    (warning,) = [str(w.message) for w in caught]
    assert "sharpness.jsonl -> sharpness.1.jsonl" in warning
    assert "sharpness.meta.json -> sharpness.1.meta.json" in warning
    sink.write({"step": 12})
    assert sink.resumed_rows_from == earlier
    # The copied rows are this run's: analysis must read one training as one run.
    assert [(row["run"], row["step"]) for row in rows_of(path)] == [
        ("r1", 4),
        ("r1", 8),
        ("r1", 12),
    ]
    assert {row["n_params"] for row in rows_of(path)} == {7}
    assert [row["step"] for row in rows_of(tmp_path / "b" / "sharpness.1.jsonl")] == [
        2,
        4,
        6,
        8,
        10,
    ]
    assert json.loads((tmp_path / "b" / "sharpness.1.meta.json").read_text())["finished"]


def test_an_unreadable_resume_source_gives_no_head_and_the_run_its_rows(tmp_path, monkeypatch):
    earlier = tmp_path / "a" / "sharpness.jsonl"
    earlier.parent.mkdir()
    earlier.write_text(json.dumps({"step": 4}) + "\n")
    read_bytes = Path.read_bytes

    def another_users(path: Path) -> bytes:
        if path == earlier:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", another_users)
    path = tmp_path / "b" / "sharpness.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("error", SinkWarning)
        sink = JsonlSink(path, META, resume_step=8, resume_rows_from=earlier)
        sink.write({"step": 12})
    assert sink.resumed_rows == 0 and sink.resumed_rows_from is None
    assert isinstance(sink.resume_source_error, PermissionError)
    assert [row["step"] for row in rows_of(path)] == [12]


def test_numpy_scalars_and_non_finite_values_at_any_depth_are_strict_json(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "sharpness.jsonl"
    sink = JsonlSink(path)
    nan, inf = float("nan"), float("inf")
    sink.write({"step": np.int64(3), "a": np.float32(1.5), "b": [1.0, nan], "c": {"x": -inf}})
    line = path.read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"step": 3, "a": 1.5, "b": [1.0, None], "c": {"x": None}}


def test_atomic_write_syncs_the_text_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    target = tmp_path / "marker.json"
    target.write_text("old")
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        calls.append(("fsync", os.path.isdir(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, destination):
        calls.append(("replace", Path(destination) == target))
        real_replace(source, destination)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    files.atomic_write_text(target, "new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]
    if Path("/proc/self/fd").is_dir():
        assert calls == [("fsync", False), ("replace", True), ("fsync", True)]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    target = tmp_path / "marker.json"
    target.write_text("old")

    def disk_full(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        files.atomic_write_text(target, "new")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_the_metadata_says_finished_only_once_the_run_is_marked_so(tmp_path, monkeypatch):
    meta_path = tmp_path / "sharpness.meta.json"
    sink = JsonlSink(tmp_path / "sharpness.jsonl", META)
    assert json.loads(meta_path.read_text()) == STARTED
    disk = DiskFull(monkeypatch, ".tmp")
    disk.full = True
    with pytest.warns(SinkWarning, match=r"sharpness\.meta\.json.*No space left"):
        sink.mark_finished()  # never raises: the rewrite waits with the rows
    assert json.loads(meta_path.read_text()) == STARTED  # rewritten whole or not at all
    disk.full = False
    with pytest.warns(SinkWarning, match="writes .* again"):
        sink.close()
    assert json.loads(meta_path.read_text()) == {**META, "finished": True}
    # no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharpness.jsonl", meta_path.name]


def test_rows_pending_when_a_sink_is_dropped_unclosed_are_reported_lost(tmp_path, monkeypatch):
    disk = DiskFull(monkeypatch, ".jsonl")
    sink = JsonlSink(tmp_path / "sharpness.jsonl", META)
    disk.full = True
    with pytest.warns(SinkWarning, match="No space left"):
        sink.write({"step": 0})
        sink.write({"step": 1})
    del sink  # training raised: no one closes it
    with pytest.warns(SinkWarning, match="2 rows could not be written .* lost"):
        gc.collect()


def test_both_sinks_follow_the_sink_protocol():
    """write(row) and close(): the meter's users (the HF callback, the accelerate helper) hold
    either sink, or both, as one kind of thing."""
    assert issubclass(JsonlSink, Sink) and issubclass(WandbSink, Sink)
    assert not issubclass(SinkWarning, Sink)


def sharpness_row(step: int) -> dict:
    return {"step": step, "critical_sharpness": 10.0 + step, "critical_status": "ok"}


def offline_history(folder: Path, done) -> list[dict]:
    """The history of the one offline W&B run under ``folder``, once ``done(history)``: wandb's
    service writes the file asynchronously, even after ``finish()``, so its last record may
    still be half-written when read."""
    [run_file] = folder.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(DecodeError):
            if done(history := wandb_records.history(run_file)):
                return history
        assert time.monotonic() < deadline, f"{run_file} never got what was logged"
        time.sleep(0.5)


def sharpness_entries(history: list[dict]) -> list[dict]:
    return [entry for entry in history if "sharpness/critical_sharpness" in entry]


def test_a_sink_in_a_users_run_never_costs_it_a_step(tmp_path):
    """The user logs with explicit steps (accelerate's tracker, W&B's documented pattern): a row
    written between two of their logs at one step must not advance the run's step, which makes
    W&B drop the second log ("less than the current step"). Rows more frequent than the user's
    steps each arrive too, the last one when the user finishes the run, on the sink's own
    x-axis, which the user's train/global_step neither overwrites nor is overwritten by."""
    run = wandb.init(project="user", dir=tmp_path, mode="offline")
    sink = WandbSink()
    assert not sink.owns_run
    for step in range(1, 7):
        if step % 3 == 0:
            run.log({"loss": 1.0 / step, "train/global_step": 100 + step}, step=step)
        sink.write(sharpness_row(step))
        if step % 3 == 0:
            run.log({"eval/loss": 2.0 / step}, step=step)
    sink.close()
    assert wandb.run is run  # the user's run is the user's to finish
    run.finish()
    history = offline_history(tmp_path, lambda h: len(sharpness_entries(h)) >= 6)
    assert [e["_step"] for e in history if "eval/loss" in e] == [3, 6]
    assert [e["train/global_step"] for e in history if "loss" in e] == [103, 106]
    entries = sharpness_entries(history)
    assert [e["sharpness/step"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert [e["sharpness/critical_sharpness"] for e in entries] == [11.0, 12, 13, 14, 15, 16]


def test_a_sink_follows_the_users_run_when_it_ends_or_is_replaced(tmp_path):
    """A hand loop whose user finishes their W&B run and starts another midway: a row with no
    run active is skipped (the JSONL file has it), never an error that stops training; the new
    run gets the next rows, its metrics defined again on the sink's x-axis."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    wandb.init(project="user", dir=tmp_path / "one", mode="offline")
    sink = WandbSink()
    sink.write(sharpness_row(1))
    sink.write(sharpness_row(2))
    wandb.finish()
    sink.write(sharpness_row(3))
    wandb.init(project="user", dir=tmp_path / "two", mode="offline")
    sink.write(sharpness_row(4))
    sink.close()
    wandb.finish()
    first = offline_history(tmp_path / "one", lambda h: len(sharpness_entries(h)) >= 2)
    assert [e["sharpness/step"] for e in sharpness_entries(first)] == [1, 2]
    second = offline_history(tmp_path / "two", lambda h: len(sharpness_entries(h)) >= 1)
    assert [e["sharpness/step"] for e in sharpness_entries(second)] == [4]
    [run_file] = (tmp_path / "two").glob("wandb/offline-run-*/run-*.wandb")
    metrics = {
        r.metric.name: r.metric.step_metric
        for r in wandb_records.records(run_file)
        if r.WhichOneof("record_type") == "metric"
    }
    assert metrics["sharpness/critical_sharpness"] == "sharpness/step"


def test_init_kwargs_may_choose_the_mode(tmp_path):
    sink = WandbSink(mode="offline", dir=tmp_path)
    assert sink.owns_run and sink.run.settings.mode == "offline"
    sink.close()


def test_a_run_that_cannot_start_online_starts_offline(tmp_path, monkeypatch):
    """A key and no network: wandb.init retries until its init_timeout (90 s by default), then
    raises. The sink waits 30 s at most, warns and goes on offline (wandb's failure is
    simulated here); the rows are in the offline run."""
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    real_init = wandb.init
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("Timed out while retrying: no such host")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    with pytest.warns(SinkWarning, match="could not start online .*no such host.* offline"):
        sink = WandbSink(dir=tmp_path)
    assert calls[0]["settings"].init_timeout == sinks.INIT_TIMEOUT_S
    assert sink.owns_run and sink.run.settings.mode == "offline"
    sink.write(sharpness_row(1))
    sink.close()
    assert len(sharpness_entries(offline_history(tmp_path, sharpness_entries))) == 1


WANDB_LOGIN = "machine api.forge.coreweave.com\n  login user\n  password " + "k" * 40 + "\n"


@pytest.mark.parametrize(
    ("netrc", "mode"),
    [
        (WANDB_LOGIN, "online"),  # what wandb.login(key=...) writes, for its default server
        (WANDB_LOGIN.replace("api.forge.coreweave.com", "api.wandb.ai"), "online"),  # older
        (WANDB_LOGIN.replace("api.forge.coreweave.com", "git.wandb-mirror.example.org"), "offline"),
        (None, "offline"),
    ],
    ids=["wandb-login", "older-login", "other-host", "no-netrc"],
)
def test_wandb_mode_is_online_only_with_a_key_wandb_would_use(tmp_path, monkeypatch, netrc, mode):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    if netrc is not None:
        (tmp_path / ".netrc").write_text(netrc)
        (tmp_path / ".netrc").chmod(0o600)  # as a login leaves it (Python's netrc checks)
    assert wandb_mode() == mode
    (tmp_path / "elsewhere").mkdir()
    if netrc is not None:
        (tmp_path / ".netrc").rename(tmp_path / "elsewhere" / "netrc")
    monkeypatch.setenv("NETRC", str(tmp_path / "elsewhere" / "netrc"))  # wandb honours it
    assert wandb_mode() == mode
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_wandb_mode_is_offline_when_wandb_cannot_be_asked(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    (tmp_path / "netrc").write_text(WANDB_LOGIN)

    def moved(**kwargs):
        raise AttributeError("wandb moved its internals")

    monkeypatch.setattr(wbauth, "read_netrc_auth", moved)
    assert wandb_mode() == "offline"


def test_wandb_mode_looks_for_the_key_of_the_server_wandb_would_use(tmp_path):
    """A login for another server than the one wandb syncs to (``WANDB_BASE_URL``, or the
    settings file ``wandb login --host`` writes) counts for nothing. In a fresh process: wandb
    reads its settings once per process."""
    (tmp_path / "netrc").write_text(WANDB_LOGIN.replace("api.forge.coreweave.com", "wandb.corp"))
    settings = tmp_path / ".config" / "wandb" / "settings"
    code = f"""
import os
from pathlib import Path
from sharpmeter.measure.sinks import wandb_mode
print(wandb_mode())
os.environ["WANDB_BASE_URL"] = "https://wandb.corp"
print(wandb_mode())
del os.environ["WANDB_BASE_URL"]
Path({str(settings)!r}).parent.mkdir(parents=True)
Path({str(settings)!r}).write_text("[default]\\nbase_url = https://wandb.corp\\n")
print(wandb_mode())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"), OMP_NUM_THREADS="1")
    env["WANDB_SILENT"] = "true"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.split() == ["offline", "online", "online"], done.stderr
