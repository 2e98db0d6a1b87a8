"""`lorakit generate`: greedy outputs of the base model and each adapter, side by side, each prompt rendered in
the format its adapter was trained with (or --format).

    lorakit generate --adapter run-a run-b --prompt "Name a color."
    lorakit generate --adapter run-a --prompts-file prompts.txt --format alpaca
"""

from __future__ import annotations

import json
import sys
from typing import Optional

from ..core.api import delete_adapter
from ..core.files import load_adapter
from ..loading.rows import PROMPT_FORMATS, Encoder, read_prompts, render_prompt
from ..train import task as builtin
from ..train.evaluate import generate
from ..train.layout import adapter_dir
from .commands import _load_with_adapters
from .options import GenerateOptions


def run_generate(options: GenerateOptions) -> int:
    """`lorakit generate`: prompts read first (a bad file fails before the model loads), then every column."""
    prompts = _prompt_pairs(options)  # None: the built-in task's prompts
    model, tokenizer, device = _load_with_adapters(options, [], base_from=(options.adapter or [None])[0])
    default = "chat" if getattr(tokenizer, "chat_template", None) else "raw"
    formats = {a: _format(options.format, trained_format(a), default) for a in options.adapter}
    rendered: dict[str, list[list[int]]] = {}

    def prompt_ids(fmt: str) -> list[list[int]]:
        if fmt not in rendered:
            rendered[fmt] = _render(prompts, fmt, tokenizer, options.limit)
        return rendered[fmt]

    columns: list[tuple[str, str, list[str]]] = []  # (name, prompt format, outputs)
    if options.with_base or not options.adapter:
        fmt = _format(options.format, formats[options.adapter[0]] if options.adapter else None, default)
        columns.append(("base", fmt, generate(model, tokenizer, prompt_ids(fmt), options.max_new_tokens,
                                              device=device)))
    for a in options.adapter:  # one adapter in the model at a time: they may target different modules
        load_adapter(model, adapter_dir(a), name="shown")
        columns.append((a, formats[a], generate(model, tokenizer, prompt_ids(formats[a]), options.max_new_tokens,
                                                device=device)))
        delete_adapter(model, "shown")
    shown = _shown(prompts, tokenizer, rendered, columns)
    for j, prompt in enumerate(shown):
        print(f"=== prompt {j + 1} ===\n{prompt.strip()}")
        for name, fmt, outputs in columns:
            print(f"--- {name} [{fmt}]:\n{outputs[j]}")
        print()
    _hint_on_empty(columns, default)
    return 0


def trained_format(adapter: str) -> Optional[str]:
    """The prompt format an adapter was trained with, from its run's options.json (next to adapter/, or two
    levels up from a checkpoint's adapter/); None when no run records one."""
    directory = adapter_dir(adapter).resolve()
    for run in (directory.parent, directory.parent.parent.parent):
        path = run / "options.json"
        if not path.is_file():
            continue
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(recorded, dict):  # a list, a number: not a run's options, so the format is unknown
            return None
        fmt = recorded.get("prompt_format")
        if fmt in PROMPT_FORMATS:
            return fmt
        return "chat" if fmt == "auto" and not recorded.get("data") else None  # the built-in task is chat
    return None


def _format(asked: str, trained: Optional[str], default: str) -> str:
    return asked if asked != "auto" else trained or default


def _prompt_pairs(options: GenerateOptions) -> Optional[list[tuple[str, str]]]:
    """(prompt or instruction, input) pairs from --prompt or --prompts-file; None for the built-in task."""
    if options.prompt:
        return [(text, "") for text in options.prompt]
    if options.prompts_file:
        return read_prompts(options.prompts_file)[: options.limit]
    return None


def _render(prompts: Optional[list[tuple[str, str]]], fmt: str, tokenizer, limit: int) -> list[list[int]]:
    """Token ids of every prompt in format `fmt`; the built-in task's prompts are chat rows, always chat."""
    if prompts is None:
        rows = builtin.builtin_rows(0, limit, 0)[1]
        return [Encoder(tokenizer, "causal", "auto").encode(r).prompt_ids for r in rows]
    return [render_prompt(tokenizer, fmt, text, context) for text, context in prompts]


def _shown(prompts, tokenizer, rendered: dict[str, list[list[int]]], columns) -> list[str]:
    """The prompt text printed above each prompt's outputs (the built-in task's: its rendered prompt)."""
    if prompts is not None:
        return [text + (f"\n\n{context}" if context else "") for text, context in prompts]
    return [tokenizer.decode(ids) for ids in rendered[columns[0][1]]]


def _hint_on_empty(columns: list[tuple[str, str, list[str]]], default: str) -> None:
    """A note on stderr for every column with empty outputs: the usual cause is the prompt format."""
    for name, fmt, outputs in columns:
        empty = sum(not o.strip() for o in outputs)
        if not empty:
            continue
        others = [f for f in PROMPT_FORMATS if f != fmt]
        print(f"lorakit generate: note: {name} gave {empty} empty output(s) of {len(outputs)} with the {fmt} prompt "
              f"format (the model ended at once); try --format {others[0]} or --format {others[1]}"
              + (" (an instruct model usually needs its chat template)" if default == "chat" and fmt != "chat"
                 else ""), file=sys.stderr)

