"""Checking data rows before anything loads: each row's format, the type of every field a format reads, one
format per file, chat `messages` shaped as role/content turns, labels inside the training label set.

Every failure is a DataError that names the file, the line (or row) and the field:

    train.jsonl line 50, field 'completion': is null (no value); every row needs its answer as text

Nothing is converted silently: a null, a number, a list or an empty answer is refused rather than trained
on as the text 'None', '42' or ''. (An optional field such as Alpaca's `input` may be absent, null or empty.)
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Optional

from ..errors import DataError
from .reading import _kind, where_of

# format → the fields that make it (the first format whose fields a row has wins, in this order)
FORMAT_FIELDS = {"chat": ("messages",), "alpaca": ("instruction", "output"),
                 "prompt_completion": ("prompt", "completion"), "text": ("text",)}
FORMAT_NAMES = {"chat": "chat (messages)", "alpaca": "Alpaca (instruction/input/output)",
                "prompt_completion": "prompt/completion", "text": "text", "classify": "text/label"}
CHAT_ROLES = ("system", "user", "assistant", "tool")
EXPECTED = "prompt/completion, instruction/input/output, messages, or text"


def _fail(where: str, field: str, problem: str) -> DataError:
    return DataError(f"{where}, field {field!r}: {problem}")


def detect_format(row: dict[str, Any], task: str, where: Optional[str] = None) -> str:
    """The format of a row: 'classify', 'chat', 'alpaca', 'prompt_completion' or 'text'.

    Args:
        row: one data row.
        task: 'causal' or 'classify' (a classify row needs text or sentence, and label).
        where: where the row is, for the error ('FILE line N'); default: the row's own `where`.
    """
    where = where or where_of(row)
    keys = set(row)
    if task == "classify":
        missing = [f for f, ok in (("text", keys & {"text", "sentence"}), ("label", "label" in keys)) if not ok]
        if missing:
            raise _fail(where, missing[0], f"is missing: --task classify needs the fields text (or sentence) and "
                        f"label; found {sorted(keys)}")
        return "classify"
    for kind, fields in FORMAT_FIELDS.items():
        if set(fields) <= keys:
            return kind
    partial = [(kind, fields) for kind, fields in FORMAT_FIELDS.items() if set(fields) & keys]
    if partial:  # e.g. prompt without completion: name the missing field (and a near spelling)
        kind, fields = partial[0]
        field = next(f for f in fields if f not in keys)
        near = difflib.get_close_matches(field, sorted(keys), n=1, cutoff=0.7)
        hint = f" (is {near[0]!r} a misspelling?)" if near else ""
        raise _fail(where, field, f"is missing{hint}: a {FORMAT_NAMES[kind]} row needs {' and '.join(fields)}; "
                    f"found {sorted(keys)}")
    raise DataError(f"{where}: cannot tell the data format from the fields {sorted(keys)}: expected {EXPECTED}")


def check_text(value: Any, where: str, field: str, allow_empty: bool = False) -> None:
    """DataError unless `value` is a string (non-empty unless allow_empty): null, numbers, booleans, lists
    and objects are refused, never turned into the text 'None', '42' or '[...]'."""
    if isinstance(value, str):
        if allow_empty or value.strip():
            return
        raise _fail(where, field, "is empty; a row needs text here (remove the row, or fill it in)")
    if value is None:
        raise _fail(where, field, "is null (no value); a row needs text here")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise _fail(where, field, f"is a number ({value}), not text: write it as a string (\"{value}\")")
    raise _fail(where, field, f"is {_kind(value)}, not text")


def check_messages(value: Any, where: str) -> None:
    """DataError unless `value` is a chat conversation: a non-empty list of {"role", "content"} objects with
    roles among system/user/assistant/tool, text contents, and at least one non-empty assistant turn.

    Args:
        value: a row's `messages` field.
        where: where the row is ('FILE line N'), for the error.
    """
    if not isinstance(value, list):
        raise _fail(where, "messages", f"expected a list of {{role, content}} objects, found {_kind(value)}")
    if not value:
        raise _fail(where, "messages", "is an empty list")
    for i, message in enumerate(value):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _fail(where, field, f"expected an object with 'role' and 'content', found {_kind(message)}")
        for key in ("role", "content"):
            if key not in message:
                sharegpt = " (ShareGPT's from/value turns need converting)" if "from" in message else ""
                raise _fail(where, f"{field}.{key}", f"is missing; found {sorted(message)}{sharegpt}")
        role = message["role"]
        if role not in CHAT_ROLES:
            raise _fail(where, f"{field}.role", f"is {role!r}, expected one of {', '.join(CHAT_ROLES)}")
        check_text(message["content"], where, f"{field}.content", allow_empty=role != "assistant")
    if not any(m["role"] == "assistant" for m in value):
        raise _fail(where, "messages", "has no assistant message: nothing to learn")


def check_label(value: Any, where: str) -> None:
    """DataError unless a class label is an integer or non-empty text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return
    if isinstance(value, str):
        check_text(value, where, "label")
        return
    kind = f"a fractional number ({value})" if isinstance(value, float) else _kind(value)
    raise _fail(where, "label", f"is {kind}; a label is an integer or a class name")


def check_row(row: dict[str, Any], task: str, where: Optional[str] = None) -> str:
    """Check one row's fields for its format; returns the format (see detect_format).

    Args:
        row: one data row.
        task: 'causal' or 'classify'.
        where: where the row is, for errors; default: the row's own `where` ('FILE line N').
    """
    where = where or where_of(row)
    kind = detect_format(row, task, where)
    if kind == "chat":
        check_messages(row["messages"], where)
    elif kind == "alpaca":
        check_text(row["instruction"], where, "instruction")
        if row.get("input") is not None:  # optional: absent, null or empty means no input
            check_text(row["input"], where, "input", allow_empty=True)
        check_text(row["output"], where, "output")
    elif kind == "prompt_completion":
        check_text(row["prompt"], where, "prompt", allow_empty=True)  # an empty prompt: unconditional text
        check_text(row["completion"], where, "completion")
    elif kind == "text":
        check_text(row["text"], where, "text")
    else:
        check_text(row["text"] if "text" in row else row["sentence"], where, "text" if "text" in row else "sentence")
        if row.get("text_pair") is not None:
            check_text(row["text_pair"], where, "text_pair")
        check_label(row["label"], where)
    return kind


def check_rows(rows: Iterable[dict[str, Any]], task: str, source: str = "the data") -> str:
    """Check every row (check_row) and that all rows share one format; returns that format.

    Args:
        rows: the rows of one file (Rows from read_rows name their file and line in errors).
        task: 'causal' or 'classify'.
        source: the file, for errors about rows built in memory.
    """
    first: Optional[tuple[str, str]] = None  # (format, where)
    for i, row in enumerate(rows, 1):
        where = where_of(row, f"{source} row {i}")
        kind = check_row(row, task, where)
        if first is None:
            first = (kind, where)
        elif kind != first[0]:
            raise DataError(f"{where}: a row in the {FORMAT_NAMES[kind]} format (fields {sorted(row)}), but {first[1]} "
                            f"is in the {FORMAT_NAMES[first[0]]} format: every row of a file needs the same format")
    if first is None:
        raise DataError(f"{source} holds no rows")
    return first[0]


def check_labels(rows: Iterable[dict[str, Any]], names: list[str], source: str = "the data") -> None:
    """DataError for a classify row whose label is not among the training labels `names`."""
    for i, row in enumerate(rows, 1):
        if str(row["label"]).strip() not in names:
            raise _fail(where_of(row, f"{source} row {i}"), "label",
                        f"{row['label']!r} is not among the training labels {names}")


def label_names_of(rows: list[dict[str, Any]]) -> list[str]:
    """Class names in a stable order: numeric labels by value, others alphabetically."""
    names = {str(r["label"]).strip() for r in rows}
    try:
        return sorted(names, key=lambda s: float(s))
    except ValueError:
        return sorted(names)
