"""`lorakit compose`: load a base and several adapters, search (or take) their weights, combine them into one
LoRA adapter and save it with compose.json.

The base model, the data rows and their tokens come from lorakit.loading, and the batch from train's
collate: a row becomes the same tokens and loss labels here as in `lorakit train`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..core import atomic
from ..core.api import set_active
from ..core.files import load_adapter, read_config, save_adapter
from ..errors import AdapterNameError, ConfigError
from ..loading.models import load_pretrained, log_to_stderr
from ..loading.checks import check_label, check_text
from ..loading.rows import Encoder, Row, check_rows, encode_rows, read_rows, where_of
from ..multi.combine import combine, weighted
from ..multi.lorahub import batches_loss, lorahub_search
from ..train.batches import collate


@dataclass
class ComposeOptions:
    """Options of `lorakit compose`; each attribute's docstring is its --help text."""

    adapters: list[str] = field(default_factory=list)
    """Adapter directories to compose (two or more); NAME=DIR names one (default: the directory's name)."""
    model: str = ""
    """Base model, as `lorakit train --model` takes it (a Hugging Face model directory, a .gguf file,
    'smollm2-135m-instruct' or a hub name). Empty: the first adapter's base_model_name_or_path."""
    weights: list[float] = field(default_factory=list)
    """Fixed weights, one per adapter: no search, the adapters are combined with these."""
    data: Optional[str] = None
    """Few labelled examples for the search, in the formats `lorakit train --data` reads (JSONL/JSON/CSV/TSV with
    prompt/completion, Alpaca instruction/input/output, chat `messages`, or `text`), or input/output, E2E mr/ref
    or sentence/label pairs. Needed unless --weights is given."""
    examples: int = 5
    """Search on the first N examples of --data (LoraHub uses 5)."""
    max_evals: int = 40
    """Loss evaluations of the Nelder–Mead search."""
    l1: float = 0.05
    """L1 penalty on the weights (LoraHub's regulariser)."""
    bound: float = 1.5
    """Weights are searched in [-bound, bound]."""
    rank: int = 0
    """Rank of the composed adapter; 0: exact (the numerical rank of the weighted sum)."""
    output: str = "composed-adapter"
    """Directory for the composed adapter (PEFT layout) and compose.json (weights, losses, error)."""
    max_length: int = 256
    """Longest example in tokens (longer ones lose the start of the prompt, as in `lorakit train`)."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""


def compose(options: ComposeOptions) -> dict:
    """`lorakit compose`: load the base and the adapters, search (or take) the weights, combine them
    into one LoRA adapter, save it with compose.json. Returns the summary that compose.json holds."""
    named = _named_dirs(options.adapters)
    fixed = _fixed_weights(options.weights, len(named))
    if not fixed and not options.data:
        raise ConfigError("give --data (a few labelled examples to search the weights on) or --weights")
    rows = [as_train_row(r) for r in read_rows(options.data)[: options.examples]] if options.data else []
    if rows:  # a bad file fails here (file, line, field), before any model loads
        check_rows(rows, "causal", options.data)
    model, tokenizer, device = load_pretrained(options.model or _base_of(named), "causal", device=options.device,
                                               log=log_to_stderr)
    model.eval()
    for name, directory in named.items():
        load_adapter(model, directory, name)
    batch = search_batch(tokenizer, rows, options.max_length, options.data) if rows else None
    loss_fn = batches_loss([{k: v.to(device) for k, v in batch.items()}]) if batch else None
    summary: dict = {"adapters": {n: str(d) for n, d in named.items()},
                     "examples": len(batch["input_ids"]) if batch else 0}
    if fixed:
        weights = dict(zip(named, fixed))
    else:
        result = lorahub_search(model, list(named), loss_fn, max_evals=options.max_evals, l1=options.l1,
                                bound=options.bound)
        weights = result.weights
        with torch.no_grad(), weighted(model, {n: 0.0 for n in named}):
            summary["base_loss"] = float(loss_fn(model))
        summary.update(search_loss=result.loss, evaluations=result.evaluations)
    report = combine(model, weights, "composed", rank=options.rank or None)
    summary.update(weights=weights, rank=report.rank, relative_error=report.relative_error)
    if loss_fn is not None:
        set_active(model, "composed")
        with torch.no_grad():
            summary["composed_loss"] = float(loss_fn(model))
    out = save_adapter(model, options.output, "composed")
    atomic.write_text(out / "compose.json", json.dumps(summary, indent=2) + "\n")
    _print_summary(report, summary, out)
    return summary


def _fixed_weights(given: Sequence, count: int) -> list[float]:
    """--weights as numbers, one per adapter; [] when none are given (the weights are searched)."""
    if given and len(given) != count:
        raise ConfigError(f"--weights needs one weight per adapter ({count}), got {len(given)}")
    try:
        return [float(w) for w in given]
    except ValueError:
        raise ConfigError(f"--weights must be numbers, got {given}") from None


def _print_summary(report, summary: dict, out: Path) -> None:
    print(report)
    for key in ("base_loss", "search_loss", "composed_loss"):
        if key in summary:
            print(f"{key.replace('_', ' ')}: {summary[key]:.4f}")
    print(f"saved {out}")


def _named_dirs(specs: Sequence[str]) -> dict[str, str]:
    """{name: directory} from DIR or NAME=DIR specs (names made safe for module attribute names)."""
    if len(specs) < 1:
        raise ConfigError("compose needs at least one adapter directory")
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        name, directory = (name, directory) if sep else (Path(spec).resolve().name, spec)
        name = re.sub(r"[^A-Za-z0-9_\-]", "_", name)
        if name in named:
            raise AdapterNameError(f"two adapters are named {name!r}; name them with NAME=DIR")
        named[name] = directory
    return named


def _base_of(named: dict[str, str]) -> str:
    """The base model the first adapter records (for an empty --model)."""
    base = read_config(next(iter(named.values()))).base_model_name_or_path
    if not base:
        raise ConfigError("the adapter does not name its base model: give --model")
    return base


# Field pairs compose reads besides train's formats (E2E NLG's mr/ref, plain input/output, sentence/label),
# turned into prompt/completion rows: the prompt stripped and ended with a newline, the answer stripped.
EXTRA_PAIRS = (("input", "output"), ("mr", "ref"), ("sentence", "label"))


def as_train_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row of one of EXTRA_PAIRS as a prompt/completion row; any other row as it is (train's formats, or
    an error from the shared reader that names the formats)."""
    if {"instruction", "prompt", "messages", "text"} & set(row):
        return row
    pair = next((p for p in EXTRA_PAIRS if p[0] in row and p[1] in row), None)
    if pair is None:
        return row
    for name in pair:  # checked as they are: a null or a list is not turned into text
        if name == "label":
            check_label(row[name], where_of(row))
        else:
            check_text(row[name], where_of(row), name, allow_empty=name == pair[0])
    converted = {"prompt": str(row[pair[0]]).strip() + "\n", "completion": str(row[pair[1]]).strip()}
    return Row(converted, row.where) if isinstance(row, Row) else converted


def search_batch(tokenizer, rows: list[dict[str, Any]], max_length: int, source: Optional[str] = None
                 ) -> dict[str, torch.Tensor]:
    """The rows as one right-padded causal-LM batch, tokenized exactly as `lorakit train` tokenizes them
    (same Encoder, prompt format 'auto', collate); the loss covers the answers only.

    Args:
        tokenizer: the base model's tokenizer (with a pad token, as loading.models.load_tokenizer gives).
        rows: data rows, e.g. from loading.rows.read_rows.
        max_length: longest example in tokens.
        source: the data file, for the error message when no row is left.
    """
    examples = encode_rows(Encoder(tokenizer, "causal", "auto", max_length), rows)
    if not examples:
        raise ConfigError(f"{source or 'the data'} holds no examples with an answer to score")
    return collate(examples, tokenizer.pad_token_id, "causal")
