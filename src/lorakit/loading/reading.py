"""Reading data files into rows that remember where they came from (file and line), so that every later error
about a row can name its file, its line and the field at fault.

    rows = read_rows("train.jsonl")   # [Row({"prompt": ..., "completion": ...}), ...]
    rows[49].where                    # 'train.jsonl line 50'

Supported: .jsonl/.ndjson (one object a line; blank lines skipped), .json (a list of objects, or an object
whose "data" or "rows" is one), .csv and .tsv (a header row; TSV unquoted, as GLUE's). Text is UTF-8; a
byte-order mark is skipped. Anything else raises DataError naming the file and the line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")


class Row(dict):
    """One data row: a plain dict that also knows where it came from (`where`, e.g. 'train.jsonl line 50')."""

    def __init__(self, data: dict, where: str):
        super().__init__(data)
        self.where = where


def where_of(row: dict, fallback: str = "a row") -> str:
    """'FILE line N' for a row read from a file, else `fallback` (rows built in memory)."""
    return getattr(row, "where", None) or fallback


def read_text(path: str | Path) -> tuple[Path, str]:
    """(path, its text). DataError if the file is missing or is not UTF-8 (naming the line of the first bad byte)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist" + (" (it is a directory)" if p.is_dir() else ""))
    raw = p.read_bytes()
    try:
        return p, raw.decode("utf-8-sig")  # -sig: a leading byte-order mark (Excel's CSVs) is not text
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{p} line {line} column {column}: byte 0x{raw[e.start]:02x} is not UTF-8 text; "
                        "save the file as UTF-8") from None


def read_rows(path: str | Path) -> list[Row]:
    """The rows of a data file, each a Row (a dict with `.where`).

    Args:
        path: a .jsonl/.ndjson, .json, .csv or .tsv file (see the module doc).

    Returns:
        The rows, at least one. Raises DataError (naming the file, the line and, where known, the column or
        field) for a missing, non-UTF-8, malformed or empty file, a line that is not an object, or a CSV/TSV
        row whose number of fields differs from the header's.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(f"data file {path}: unknown extension {suffix!r} (use .jsonl, .json, .csv or .tsv)")
    p, text = read_text(path)
    if suffix in (".jsonl", ".ndjson"):
        rows = list(_jsonl_rows(p, text))
    elif suffix == ".json":
        rows = _json_rows(p, text)
    else:
        rows = list(_table_rows(p, text, delimiter="\t" if suffix == ".tsv" else ","))
    if not rows:
        raise DataError(f"data file {p} holds no rows" + (" (it is empty)" if not text.strip() else ""))
    return rows


def _jsonl_rows(p: Path, text: str) -> Iterator[Row]:
    # split on "\n" only: str.splitlines would also split inside strings at U+2028 and friends
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            hint = " (one JSON object per line; a JSON list belongs in a .json file)" if n == 1 and \
                line.lstrip().startswith("[") else ""
            raise DataError(f"{p} line {n} column {e.colno}: not valid JSON: {e.msg}{hint}") from None
        yield _as_row(value, f"{p} line {n}")


def _json_rows(p: Path, text: str) -> list[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (several objects one per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(f"{p} line {e.lineno} column {e.colno}: not valid JSON: {e.msg}{hint}") from None
    if isinstance(data, dict):
        key = next((k for k in ("data", "rows") if k in data), None)
        if key is None:
            raise DataError(f"{p}: expected a JSON list of row objects (or an object whose 'data' or 'rows' is "
                            f"one); found an object with the fields {sorted(data)[:8]}")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of row objects, found {_kind(data)}")
    return [_as_row(value, f"{p} row {i}") for i, value in enumerate(data, 1)]


def _as_row(value: Any, where: str) -> Row:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object with named fields, found {_kind(value)}")
    return Row(value, where)


def _table_rows(p: Path, text: str, delimiter: str) -> Iterator[Row]:
    """CSV/TSV rows; `where` is the file line where the row ends (the header is line 1)."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # GLUE-style TSV has no quoting
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader, None)
        if header is None:
            return
        _check_header(p, header)
        for cells in reader:
            where = f"{p} line {reader.line_num}"
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue  # a blank line
            if len(cells) < len(header):
                raise DataError(f"{where}, field {header[len(cells)]!r}: no value (the row has {len(cells)} of "
                                f"the header's {len(header)} fields: {', '.join(header)})")
            if len(cells) > len(header):
                raise DataError(f"{where}: the row has {len(cells)} fields, the header names only {len(header)} "
                                f"({', '.join(header)}); an unquoted separator inside a value?")
            yield Row(dict(zip(header, cells)), where)
    except csv.Error as e:
        raise DataError(f"{p} line {reader.line_num}: not valid {'TSV' if delimiter == chr(9) else 'CSV'}: {e}") \
            from None


def _check_header(p: Path, header: list[str]) -> None:
    names = [h.strip() for h in header]
    if any(not n for n in names):
        raise DataError(f"{p} line 1: the header has an empty column name: {header}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"{p} line 1: the header names {twice} more than once")
    header[:] = names


def _kind(value: Any) -> str:
    """A JSON value's type in words, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def read_prompts(path: str | Path) -> list[tuple[str, str]]:
    """Prompts for generation from a file, as (instruction or prompt, input) pairs.

    A .jsonl/.json/.csv/.tsv file gives one prompt per row, from its `prompt` field or its `instruction` (plus
    `input`, when present) field; answers in the rows (completion, output) are ignored, so a training file
    works too. Any other file is plain text: one prompt per non-blank line.
    """
    if Path(path).suffix.lower() not in DATA_SUFFIXES:
        p, text = read_text(path)
        prompts = [(line.strip(), "") for line in text.split("\n") if line.strip()]
        if not prompts:
            raise DataError(f"prompts file {p} holds no prompts (one a line)")
        return prompts
    pairs = []
    for row in read_rows(path):
        field = "prompt" if "prompt" in row else "instruction" if "instruction" in row else None
        if field is None:
            raise DataError(f"{row.where}: a prompts file row needs a 'prompt' or an 'instruction' field; found "
                            f"{sorted(row)}")
        text, context = row[field], row.get("input") if field == "instruction" else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{row.where}, field {field!r}: expected non-empty text, found "
                            f"{_kind(text) if not isinstance(text, str) else 'an empty string'}")
        if context is not None and not isinstance(context, str):
            raise DataError(f"{row.where}, field 'input': expected text, found {_kind(context)}")
        pairs.append((text, context or ""))
    return pairs
