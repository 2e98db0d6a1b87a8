"""A run's data: read, checked and split before any model loads, then tokenized once the tokenizer is there.

    data = read_run_data(options)                       # DataError (file, line, field) for any bad row
    train_set, eval_set = encode_run_data(options, tokenizer, data)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError, DataError
from ..loading.rows import Encoder, Example, check_labels, check_rows, encode_rows, label_names_of, read_rows
from . import task as builtin

# the prompt format a row format is trained with, when --prompt-format is auto (or raw/alpaca: the same)
_FORMAT_OF_ROWS = {"chat": "chat", "alpaca": "alpaca", "prompt_completion": "raw", "text": "raw", "classify": "raw"}


@dataclass
class RunData:
    """The rows of a run, checked: training and held-out rows, their row format, the class names (classify)."""

    train_rows: list[dict]
    eval_rows: list[dict]
    row_format: str  # 'chat', 'alpaca', 'prompt_completion', 'text' or 'classify' (loading.checks)
    prompt_format: str  # what the prompts are rendered with: 'raw', 'chat' or 'alpaca'
    label_names: Optional[list[str]] = None


def prompt_format_for(row_format: str, asked: str) -> str:
    """The prompt format rows of `row_format` are rendered with under --prompt-format `asked`: chat rows always
    use the chat template, --prompt-format chat puts every prompt in it; else Alpaca rows use the Alpaca
    template and other rows their prompt as it is (what the Encoder does)."""
    if row_format == "chat" or asked == "chat":
        return "chat"
    return _FORMAT_OF_ROWS[row_format]


def read_run_data(opts) -> RunData:
    """Read --data / --eval-data (or make the built-in task's rows), check every row, split off the held-out
    rows; nothing is loaded or written. DataError names the file, the line and the field of a bad row."""
    if not opts.data:
        if opts.task != "causal":
            raise ConfigError("the built-in task is a causal LM task: pass --data for --task classify")
        rows, eval_rows = builtin.builtin_rows(opts.train_examples, opts.eval_examples or 40, opts.seed)
        return RunData(rows, eval_rows, "chat", "chat")
    rows = read_rows(opts.data)
    row_format = check_rows(rows, opts.task, opts.data)
    if opts.eval_data:
        eval_rows = read_rows(opts.eval_data)
        check_rows(eval_rows, opts.task, opts.eval_data)
    else:  # hold out a deterministic slice
        if len(rows) < 2:
            raise DataError(f"{opts.data} holds {len(rows)} row: too few to hold some out for evaluation "
                            "(give --eval-data, or more rows)")
        order = random.Random(opts.seed).sample(range(len(rows)), len(rows))
        n_eval = min(500, max(1, int(len(rows) * opts.eval_fraction)))
        eval_rows, rows = [rows[i] for i in order[:n_eval]], [rows[i] for i in order[n_eval:]]
    if opts.train_examples:
        rows = rows[: opts.train_examples]
    if opts.eval_examples:
        eval_rows = eval_rows[: opts.eval_examples]
    names = _label_names(opts, rows, eval_rows) if opts.task == "classify" else None
    return RunData(rows, eval_rows, row_format, prompt_format_for(row_format, opts.prompt_format), names)


def _label_names(opts, rows: list[dict], eval_rows: list[dict]) -> list[str]:
    """The training rows' class names; every held-out label must be one of them, and fit --num-labels."""
    names = label_names_of(rows)
    check_labels(eval_rows, names, opts.eval_data or opts.data)
    if opts.num_labels and len(names) > opts.num_labels:
        raise DataError(f"{opts.data}, field 'label': {len(names)} distinct labels {names[:10]} but "
                        f"--num-labels is {opts.num_labels}")
    return names


def encode_run_data(opts, tokenizer, data: RunData) -> tuple[list[Example], list[Example]]:
    """(training, held-out) Examples. DataError when no training example keeps an answer to learn."""
    encoder = Encoder(tokenizer, opts.task, data.prompt_format, opts.max_length, data.label_names)
    train_set, eval_set = encode_rows(encoder, data.train_rows), encode_rows(encoder, data.eval_rows)
    if not train_set:
        raise DataError(f"{opts.data or 'the built-in task'}: no training example is left: every answer was cut "
                        f"away by --max-length {opts.max_length} (or there are no training rows)")
    return train_set, eval_set
