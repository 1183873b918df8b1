"""Read and write flat records (dicts of str/int/float/bool/None) as JSONL or CSV.

One format for both sides: the simulator writes its curves with it and the measurement side logs
the same long rows, so analysis reads either with :func:`read_records`. The file extension picks
the format (``.jsonl`` or ``.csv``).

Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "rows.csv"
    >>> write_records(path, [{"step": 0, "quantity": "loss", "value": 5.5}])
    >>> read_records(path)
    [{'step': 0, 'quantity': 'loss', 'value': 5.5}]
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from sharpmeter.measure.files import atomic_write_text

Value = str | int | float | bool | None
Record = dict[str, Value]

FORMATS = (".jsonl", ".csv")
# Names, read from a CSV as written: runs "007" and "7", or one named "True", stay apart.
TEXT_COLUMNS = frozenset({"run"})


class RecordWarning(UserWarning):
    """A record file was read with something left out or overridden (a torn last line, a step
    logged twice); the message names the file and its lines."""


def write_records(path: str | Path, rows: Iterable[Mapping[str, Value]]) -> None:
    """Write ``rows`` to ``path``, JSONL or CSV by its extension. The file is replaced whole
    (written beside it, then renamed): a full disk or a kill leaves the old file as it was,
    not a prefix of the new one that reads back as fewer runs.

    CSV gets the union of the rows' keys as its header, in first-seen order; a key a row lacks
    is left empty and reads back as ``None``.
    """
    path = Path(path)
    suffix = _suffix(path)
    rows = [dict(row) for row in rows]
    text = io.StringIO(newline="" if suffix == ".csv" else None)
    if suffix == ".jsonl":
        text.writelines(json.dumps(row) + "\n" for row in rows)
    else:
        header = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(text, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def read_records(path: str | Path) -> list[Record]:
    """Read the rows of a ``.jsonl`` or ``.csv`` file as a list of flat dicts.

    CSV cells come back typed: integers as ``int``, other numbers (``nan``, ``inf`` included) as
    ``float``, ``True``/``False`` as ``bool``, empty cells as ``None``, the rest as ``str``.
    See :func:`read_numbered_records` for what is refused and what is dropped.
    """
    return [row for _, row in read_numbered_records(path)]


def read_numbered_records(path: str | Path) -> list[tuple[int, Record]]:
    """The rows of a ``.jsonl`` or ``.csv`` file, each with its 1-based line number in the file
    (for CSV, the line a row ends on), so that every later complaint can point at the line.

    A JSONL line that is not a JSON object, or a CSV row with more or fewer cells than its
    header, raises ``ValueError`` naming ``file:line``, except a torn last line: what a crash or
    a full disk leaves in the middle of an append. A JSONL line is torn when it has no newline
    and is not valid JSON; a CSV row when the file does not end with a newline (every row this
    module writes ends with one, and a cut number such as ``4.`` would still parse). A torn line
    is dropped with a :class:`RecordWarning` naming it.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix == ".csv":
        return _numbered_csv_rows(path)
    rows = []
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except ValueError as error:  # JSONDecodeError and UnicodeDecodeError alike
                if line.endswith(b"\n"):
                    raise ValueError(
                        f"{path}:{number}: not a JSON line ({_reason(error)})"
                    ) from None
                _warn_torn(path, number, "no newline, not valid JSON")
                break
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per line")
            rows.append((number, row))
    return rows


def _numbered_csv_rows(path: Path) -> list[tuple[int, Record]]:
    with path.open(newline="", encoding="utf-8") as f:
        text = f.read()
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        return []
    # Every row written ends with a newline: without one, the last line was cut short.
    torn_line = None if text.endswith(("\n", "\r")) else _last_line(text)
    rows = []
    for cells in reader:
        if not cells:  # a blank line
            continue
        if reader.line_num == torn_line:
            _warn_torn(path, reader.line_num, "no newline at the end of the file")
            break
        if len(cells) != len(header):
            raise ValueError(
                f"{path}:{reader.line_num}: {len(cells)} cells, the header has {len(header)}"
            )
        rows.append((reader.line_num, {k: _cell(k, v) for k, v in zip(header, cells, strict=True)}))
    return rows


def _last_line(text: str) -> int:
    """The number of the last line of ``text`` (as ``csv.reader.line_num`` counts)."""
    return text.count("\n") + (not text.endswith("\n"))


def _warn_torn(path: Path, line: int, why: str) -> None:
    warnings.warn(
        f"{path}:{line}: dropped a torn last line ({why}: a write cut short)",
        RecordWarning,
        stacklevel=3,
    )


def _reason(error: ValueError) -> str:
    """What is wrong, without the character offset in the line that JSON errors carry."""
    return error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unsupported record file {str(path)!r}; use one of {', '.join(FORMATS)}")
    return suffix


def _cell(column: str, text: str) -> Value:
    if column in TEXT_COLUMNS:
        return text or None
    return _parse_cell(text)


def _parse_cell(text: str | None) -> Value:
    if text is None or text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    if "_" in text:  # Python's int and float read "1_000" as 1000; no CSV writer means that
        return text
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text
