"""Tests of sharpmeter.paper.records: the JSONL/CSV record files shared by simulator and
measurements."""

from __future__ import annotations

import math

import pytest

from sharpmeter.paper.records import read_records, write_records

ROWS = [
    {"source": "measured", "step": 0, "fraction": 0.0, "quantity": "critical", "value": 2.5},
    {"source": "measured", "step": 10, "quantity": "trace", "value": -1e-3, "converged": True},
    {
        "source": "measured",
        "step": 20,
        "quantity": "spectral",
        "value": None,
        "status": "nonfinite",
    },
]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".CSV"])
def test_round_trip_keeps_types(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    write_records(path, iter(ROWS))
    back = read_records(path)
    if suffix == ".jsonl":
        assert back == ROWS
    else:  # CSV rows all carry the union of the keys, missing ones as None
        keys = ["source", "step", "fraction", "quantity", "value", "converged", "status"]
        assert [list(row) for row in back] == [keys] * 3
        assert back == [{k: row.get(k) for k in keys} for row in ROWS]
        assert isinstance(back[1]["step"], int) and back[1]["converged"] is True


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_finite_values_survive(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    write_records(path, [{"value": float("nan")}, {"value": float("inf")}])
    nan, inf = (row["value"] for row in read_records(path))
    assert math.isnan(nan) and inf == math.inf


def test_empty_file_and_blank_lines(tmp_path):
    write_records(tmp_path / "empty.jsonl", [])
    assert read_records(tmp_path / "empty.jsonl") == []
    (tmp_path / "gaps.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_records(tmp_path / "gaps.jsonl") == [{"a": 1}, {"a": 2}]


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unsupported record file .*rows.txt.*jsonl, .csv"):
        write_records(tmp_path / "rows.txt", ROWS)
    with pytest.raises(ValueError, match="unsupported record file"):
        read_records(tmp_path / "rows.parquet")
    (tmp_path / "list.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match="list.jsonl:2: expected a JSON object"):
        read_records(tmp_path / "list.jsonl")
