"""``sharpmeter simulate`` on an ``--out`` that cannot be a folder: one line and exit code 2."""

from __future__ import annotations

import pytest

from sharpmeter.cli import main


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_an_out_that_cannot_be_a_folder_is_one_line_and_code_2(tmp_path, capsys, where):
    blocker = tmp_path / "curves.jsonl"
    blocker.write_text("")
    out = blocker if where == "file" else blocker / "sim"
    assert main(["simulate", "--out", str(out), "--checkpoints", "10", "--scales", "10M"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert error.startswith(f"sharpmeter simulate: error: --out {out} cannot be made a folder")
