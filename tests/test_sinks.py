"""JsonlSink under failing writes: training never stops, and the file ends up whole and in order.

Tests may run as root, for whom a read-only folder is writable; failures are made by a regular
file where the folder should be (no one can create a file inside it) or by a fake full disk
(``open`` in ``sharpmeter.measure.sinks`` replaced by one whose files fail after writing part
of a line).
"""

from __future__ import annotations

import errno
import gc
import json
import os
import sys
import warnings
from pathlib import Path

import pytest

from sharpmeter.measure import files, sinks
from sharpmeter.measure.sinks import JsonlSink, Sink, SinkWarning, WandbSink

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


def test_failed_metadata_write_keeps_the_old_file(tmp_path, monkeypatch):
    disk = DiskFull(monkeypatch, ".tmp")
    path = tmp_path / "sharpness.jsonl"
    meta_path = tmp_path / "sharpness.meta.json"
    JsonlSink(path, META)
    disk.full = True
    with pytest.warns(SinkWarning, match=r"sharpness\.meta\.json.*No space left"):
        sink = JsonlSink(path, {**META, "run": "r2"})
    assert json.loads(meta_path.read_text()) == STARTED
    assert [p.name for p in tmp_path.iterdir()] == [meta_path.name]  # no temporary file left

    disk.full = False
    with pytest.warns(SinkWarning, match="1 pending rows written"):
        sink.write({"step": 0})
    assert json.loads(meta_path.read_text())["run"] == "r2"


def test_failed_first_metadata_write_leaves_no_empty_file(tmp_path, monkeypatch):
    disk = DiskFull(monkeypatch, ".tmp")
    disk.full = True
    with pytest.warns(SinkWarning, match="meta"):
        JsonlSink(tmp_path / "sharpness.jsonl", META)
    assert list(tmp_path.iterdir()) == []


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
    assert [p.name for p in tmp_path.iterdir()] == [meta_path.name]  # no temporary file left


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
