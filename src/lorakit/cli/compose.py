"""`lorakit compose`: load a base and several adapters, search (or take) their weights, combine them into one
LoRA adapter and save it with compose.json."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..core.api import set_active
from ..core.files import load_adapter, read_config, save_adapter
from ..errors import AdapterNameError, ConfigError
from ..multi.combine import combine, weighted
from ..multi.lorahub import batches_loss, lorahub_search


@dataclass
class ComposeOptions:
    adapters: list[str] = field(default_factory=list)
    """Adapter directories to compose (two or more); NAME=DIR names one (default: the directory's name)."""
    model: str = ""
    """Base model: a local Hugging Face model directory or a .gguf file. Empty: the first adapter's
    base_model_name_or_path."""
    weights: list[float] = field(default_factory=list)
    """Fixed weights, one per adapter: no search, the adapters are combined with these."""
    data: Optional[str] = None
    """Few labelled examples for the search: JSON/JSONL/CSV/TSV with prompt/completion, input/output,
    Alpaca instruction/input/output, or E2E mr/ref fields. Needed unless --weights is given."""
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
    """Longest example in tokens (longer ones lose the start of the prompt)."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""


def compose(options: ComposeOptions) -> dict:
    """`lorakit compose`: load the base and the adapters, search (or take) the weights, combine them
    into one LoRA adapter, save it with compose.json. Returns the summary that compose.json holds."""
    named = _named_dirs(options.adapters)
    if options.weights and len(options.weights) != len(named):
        raise ConfigError(f"--weights needs one weight per adapter ({len(named)}), got {len(options.weights)}")
    try:
        fixed = [float(w) for w in options.weights]
    except ValueError:
        raise ConfigError(f"--weights must be numbers, got {options.weights}") from None
    if not fixed and not options.data:
        raise ConfigError("give --data (a few labelled examples to search the weights on) or --weights")
    examples = _read_examples(Path(options.data), options.examples) if options.data else []
    model, tokenizer = _load_base(options.model or _base_of(named), options.device)
    for name, directory in named.items():
        load_adapter(model, directory, name)
    loss_fn = batches_loss([_encode(tokenizer, examples, options.max_length, model.device)]) if examples else None
    summary: dict = {"adapters": {n: str(d) for n, d in named.items()}, "examples": len(examples)}
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
    (out / "compose.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(report)
    for key in ("base_loss", "search_loss", "composed_loss"):
        if key in summary:
            print(f"{key.replace('_', ' ')}: {summary[key]:.4f}")
    print(f"saved {out}")
    return summary


def _named_dirs(specs: Sequence[str]) -> dict[str, str]:
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
    base = read_config(next(iter(named.values()))).base_model_name_or_path
    if not base:
        raise ConfigError("the adapter does not name its base model: give --model")
    return base


def _load_base(path: str, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    kwargs = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
    where = p.parent if p.suffix == ".gguf" else path
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


_FIELDS = (("prompt", "completion"), ("input", "output"), ("mr", "ref"), ("sentence", "label"))


def _read_examples(path, limit: int) -> list[tuple[str, str]]:
    """The first `limit` (prompt, completion) pairs of a JSON/JSONL/CSV/TSV file."""
    if not path.is_file():
        raise ConfigError(f"no data file at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv" else ","))
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)
    pairs = []
    for row in rows[:limit]:
        if "instruction" in row:
            body = row["instruction"] + (f"\n\n### Input:\n{row['input']}" if row.get("input") else "")
            pairs.append((f"### Instruction:\n{body}\n\n### Response:\n", str(row.get("output", ""))))
            continue
        keys = next((k for k in _FIELDS if k[0] in row and k[1] in row), None)
        if keys is None:
            raise ConfigError(f"{path}: a row needs one of the field pairs {_FIELDS} or Alpaca fields; "
                              f"got {sorted(row)}")
        pairs.append((str(row[keys[0]]).strip() + "\n", str(row[keys[1]]).strip()))
    if not pairs:
        raise ConfigError(f"{path} holds no examples")
    return pairs


def _encode(tokenizer, pairs: list[tuple[str, str]], max_length: int, device) -> dict[str, torch.Tensor]:
    """One right-padded batch; the loss covers the completion tokens (and EOS) only."""
    eos = tokenizer.eos_token_id
    rows = []
    for prompt, completion in pairs:
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (p + c)[-max_length:]
        labels = ([-100] * len(p) + c)[-max_length:]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, labels in rows:
        fill = width - len(ids)
        batch["input_ids"].append(ids + [pad] * fill)
        batch["attention_mask"].append([1] * len(ids) + [0] * fill)
        batch["labels"].append(labels + [-100] * fill)
    return {k: torch.tensor(v, device=device) for k, v in batch.items()}
