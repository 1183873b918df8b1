"""Record files read back as written; a bad row names its file and line, a torn last row (a
write cut short) is dropped with a warning."""

from __future__ import annotations

import math

import pytest

from sharpmeter.paper.records import (
    RecordWarning,
    read_numbered_records,
    read_records,
    write_records,
)

ROWS = [
    {"n_params": 10, "step": 1, "value": 1.5, "status": "ok", "converged": True},
    {"n_params": 10, "step": 2, "value": math.nan, "status": None, "converged": False},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_rows_round_trip_with_their_line_numbers(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    write_records(path, ROWS)
    numbered = read_numbered_records(path)
    assert [line for line, _ in numbered] == ([1, 2] if suffix == ".jsonl" else [2, 3])
    first, second = (row for _, row in numbered)
    assert first == ROWS[0] and second["step"] == 2 and math.isnan(second["value"])


def test_a_csv_row_with_extra_or_missing_cells_names_its_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("n_params,step,value\n10,1,1.0\n10,2,2.0,surplus\n10,3,3.0\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: 4 cells, the header has 3"):
        read_records(path)
    path.write_text("n_params,step,value\n10,1\n10,2,2.0\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2: 2 cells, the header has 3"):
        read_records(path)


def test_a_torn_last_csv_row_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "torn.csv"
    write_records(path, ROWS[:1] * 2)
    path.write_bytes(path.read_bytes() + b"10,3,4.")  # a third row cut mid-number
    with pytest.warns(RecordWarning, match=r"torn\.csv:4: dropped a torn last line"):
        rows = read_records(path)
    assert [row["step"] for row in rows] == [1, 1]


def test_a_csv_ending_without_newline_after_a_whole_row_drops_only_that_row(tmp_path):
    path = tmp_path / "cut.csv"
    path.write_text("step,value\n1,1.0\n2,2.0")
    with pytest.warns(RecordWarning, match=r"cut\.csv:3"):
        assert read_records(path) == [{"step": 1, "value": 1.0}]


def _runs_from_csv(path, size_text):
    from sharpmeter.paper.analysis.runs import load_runs

    path.write_text(
        "n_params,step,critical_sharpness\n" + "".join(f"{size_text},{s},1.0\n" for s in range(3))
    )
    return load_runs([path])


@pytest.mark.parametrize(
    ("text", "size"),
    [("10K", 1e4), ("1.2M", 1.2e6), ("3B", 3e9), ("2T", 2e12), ("10k", 1e4), ("1.5m", 1.5e6)],
)
def test_csv_sizes_written_like_10K_load_as_model_sizes(tmp_path, text, size):
    [run] = _runs_from_csv(tmp_path / "runs.csv", text)
    assert run.n_params == size


@pytest.mark.parametrize(
    ("text", "why"),
    [("10MB", "cannot read model size '10MB'"), ("1e9B", "'1e9B' is ambiguous"), ("-3M", "-3M")],
)
def test_a_bad_or_ambiguous_csv_size_names_its_value_and_file(tmp_path, text, why):
    with pytest.raises(ValueError, match=rf"sizes\.csv:2: .*{why}"):
        _runs_from_csv(tmp_path / "sizes.csv", text)


def test_a_rewrite_that_fails_midway_leaves_the_old_file_whole(tmp_path):
    """The file is replaced whole: a rewrite stopped by a row it cannot write (as by a full disk
    or a kill) used to leave the first rows of the new file, which read back as fewer runs."""
    path = tmp_path / "curves.jsonl"
    old = [{"run": "a", "step": s, "value": 1.0} for s in range(3)]
    write_records(path, old)
    with pytest.raises(TypeError):
        write_records(path, [{"run": "b", "step": 0}, {"run": "b", "step": 1, "value": object()}])
    assert read_records(path) == old
    assert [p.name for p in tmp_path.iterdir()] == ["curves.jsonl"]


def test_csv_run_names_are_read_as_written(tmp_path):
    """Run names that look like numbers or booleans stay text: runs 007 and 7 stay apart."""
    path = tmp_path / "runs.csv"
    path.write_text("run,step,value,count\n007,1,2.0,1_000\n7,1,3.0,5\nTrue,1,4.0,6\n")
    rows = read_records(path)
    assert [row["run"] for row in rows] == ["007", "7", "True"]
    assert [row["count"] for row in rows] == ["1_000", 5, 6]
