"""Data rows: read JSONL/JSON/CSV/TSV files, tell their format, render prompts and tokenize with loss masks.

Every command that reads labelled rows (`train`, `eval`, `generate`, `compose`) goes through this module, so
one row becomes the same tokens everywhere.

Row formats (detected from the keys of a row):
  prompt/completion                 causal LM, loss on the completion
  instruction/input/output (Alpaca) causal LM, loss on the output
  messages (chat: role/content)     causal LM, loss on every assistant turn
  text                              causal LM, loss on every token   (with task classify: text/label)
  text|sentence (+ text_pair) / label   sequence classification
Each segment is tokenized on its own, so a prompt tokenizes the same in training and in generation.
Reading files is loading/reading.py and checking rows loading/checks.py; both are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ConfigError, DataError
from .chat import encode_chat
from .checks import check_labels, check_messages, check_row, check_rows, detect_format, label_names_of
from .reading import Row, read_prompts, read_rows, where_of

__all__ = ["IGNORE", "ALPACA_PROMPT", "Example", "Encoder", "encode_rows", "render_prompt", "Row", "read_rows",
           "read_prompts", "where_of", "detect_format", "check_row", "check_rows", "check_messages",
           "check_labels", "label_names_of"]

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)

ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


@dataclass
class Example:
    """One tokenized row."""

    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss; unused for classify
    prompt_ids: list[int] = field(default_factory=list)  # what generation is given (all but the last answer)
    reference: str = ""  # the last answer's text (for exact match / BLEU)
    label: int = -1  # classify


# --- tokenizing -----------------------------------------------------------------------------------------
class Encoder:
    """Turns rows into Examples for one tokenizer, task and prompt format.

    Args:
        tokenizer: a Hugging Face tokenizer.
        task: 'causal' or 'classify'.
        prompt_format: 'auto' (chat template for chat rows, the Alpaca template for Alpaca rows, prompts
            verbatim), 'chat' (every prompt as a user turn of the chat template), 'raw' or 'alpaca' (as auto).
        max_length: longest example in tokens (see `_fit` for what is cut).
        label_names: classify: the class names; a label's index in it is its class id.
    """

    def __init__(self, tokenizer, task: str = "causal", prompt_format: str = "auto", max_length: int = 512,
                 label_names: Optional[list[str]] = None):
        self.tok = tokenizer
        self.task = task
        self.prompt_format = prompt_format
        self.max_length = max_length
        self.label_names = label_names  # classify: sorted label values; index = class id

    def encode(self, row: dict[str, Any]) -> Example:
        """One row as an Example (tokens, loss labels, the generation prompt and the reference answer)."""
        kind = check_row(row, self.task)  # DataError naming file, line and field for a bad row
        if kind == "classify":
            return self._classify(row)
        if kind == "text":
            ids = self._ids(str(row["text"]), special=True) + self._eos()
            return self._fit(ids, list(ids), [], "")  # loss on every token (the first has no context)
        turns = self._turns(kind, row)  # [(text, is_answer)]
        if self.prompt_format == "chat" or kind == "chat":
            return self._chat(turns, where_of(row))
        prompt, answer = turns[0][0], turns[1][0]
        prompt_ids = self._ids(prompt, special=True)
        answer_ids = self._ids(answer, special=False) + self._eos()
        return self._truncate(prompt_ids, answer_ids, answer_ids, answer)

    def _turns(self, kind: str, row: dict[str, Any]) -> list[tuple[Any, bool]]:
        """The row as alternating prompt / answer texts (chat rows keep their message dicts)."""
        if kind == "chat":
            return [(m, m.get("role") == "assistant") for m in row["messages"]]
        if kind == "alpaca":
            instruction, ctx = str(row["instruction"]), str(row.get("input") or "")
            if self.prompt_format == "chat":
                return [(instruction + ("\n\n" + ctx if ctx else ""), False), (str(row["output"]), True)]
            prompt = ALPACA_PROMPT.format(ctx=", paired with an input that provides further context" if ctx else "",
                                          instruction=instruction,
                                          input_block=f"### Input:\n{ctx}\n\n" if ctx else "")
            return [(prompt, False), (str(row["output"]), True)]
        return [(str(row["prompt"]), False), (str(row["completion"]), True)]

    def _chat(self, turns: list[tuple[Any, bool]], where: str) -> Example:
        """Render with the chat template; every assistant turn is a target (loading/chat.py). A template that
        refuses the row (a system role it lacks, turns that do not alternate) is a DataError naming the row."""
        from jinja2 import TemplateError  # transformers renders chat templates with jinja2

        messages = [t if isinstance(t, dict) else {"role": "assistant" if a else "user", "content": t}
                    for t, a in turns]
        try:
            return self._fit(*encode_chat(self.tok, messages))
        except (ConfigError, TemplateError) as e:
            field_name = "messages" if turns and isinstance(turns[0][0], dict) else "prompt"
            raise DataError(f"{where}, field '{field_name}': the tokenizer's chat template refuses this row: "
                            f"{e}") from None

    def _classify(self, row: dict[str, Any]) -> Example:
        text = str(row["text"] if "text" in row else row["sentence"]).strip()
        pair = row.get("text_pair")
        enc = self.tok(text, str(pair).strip() if pair else None, truncation=True, max_length=self.max_length)
        raw = row["label"]
        names = self.label_names or []
        key = str(raw).strip()
        if key not in names:
            raise DataError(f"{where_of(row)}, field 'label': {raw!r} is not among the training labels {names}")
        return Example(list(enc["input_ids"]), [], label=names.index(key))

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def _eos(self) -> list[int]:
        return [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []

    def _truncate(self, prompt_ids, answer_ids, answer_labels, reference) -> Example:
        ids = prompt_ids + answer_ids
        labels = [IGNORE] * len(prompt_ids) + answer_labels
        return self._fit(ids, labels, prompt_ids, reference)

    def _fit(self, ids, labels, prompt_ids, reference) -> Example:
        """Cut to max_length: prompt tokens from the left first (keep the answer), then the answer's tail."""
        extra = len(ids) - self.max_length
        if extra > 0:
            cut = min(extra, len(prompt_ids))
            ids, labels, prompt_ids = ids[cut:], labels[cut:], prompt_ids[cut:]
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return Example(ids, labels, prompt_ids, reference)


def encode_rows(encoder: Encoder, rows: list[dict[str, Any]]) -> list[Example]:
    """The rows as training Examples. Causal rows whose answer max_length cut away entirely are dropped:
    they would teach nothing (the first token's label has no context, so it does not count)."""
    examples = [encoder.encode(r) for r in rows]
    if encoder.task == "causal":
        examples = [e for e in examples if any(label != IGNORE for label in e.labels[1:])]
    return examples


PROMPT_FORMATS = ("raw", "chat", "alpaca")


def render_prompt(tokenizer, prompt_format: str, instruction: str, context: str = "") -> list[int]:
    """The token ids a model is given to answer `instruction` (and its `context`, Alpaca's input), rendered the
    way training renders a row's prompt in that format, so that generation sees what training saw.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt_format: 'raw' (the text as it is), 'chat' (a user turn of the chat template, with the
            generation prompt) or 'alpaca' (the Alpaca template).
        instruction: the prompt, or the Alpaca instruction.
        context: Alpaca's input ('' for none); other formats add it after a blank line.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"prompt format {prompt_format!r}: expected one of {', '.join(PROMPT_FORMATS)}")
    if prompt_format == "alpaca":
        row, fmt = {"instruction": instruction, "input": context, "output": "-"}, "auto"
    else:
        row, fmt = {"prompt": instruction + ("\n\n" + context if context else ""), "completion": "-"}, prompt_format
    return Encoder(tokenizer, "causal", fmt, max_length=1 << 30).encode(row).prompt_ids
