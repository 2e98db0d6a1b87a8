"""Options of the commands that only the command line has: `lorakit eval | generate | merge | info`.

Each attribute's docstring is its `--help` text; cli/app.py builds the flags from these dataclasses. (The
options of `train` are lorakit.train.options.TrainOptions, shared with `lorakit.train(...)`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..train.options import ModelOptions


def positional(default=None):
    """A field given as a bare command-line argument (e.g. `lorakit info DIR`)."""
    return field(default=default, metadata={"positional": True})


@dataclass
class EvalOptions(ModelOptions):
    """Options of `lorakit eval`."""

    data: Optional[str] = None
    """Data to score: JSONL/JSON/CSV/TSV with prompt/completion, Alpaca instruction/input/output, chat `messages`,
    plain `text`, or text/label (--task classify), as `lorakit train --data` reads. Empty: the built-in task's
    held-out rows."""
    prompt_format: Literal["auto", "raw", "chat", "alpaca"] = "auto"
    """How prompts are rendered, as in `lorakit train` (use the run's format). auto: chat template for
    `messages`, the Alpaca template for Alpaca rows, the prompt verbatim for prompt/completion."""
    max_length: int = 512
    """Longest example in tokens; longer examples are cut from the left of the prompt."""
    eval_examples: int = 0
    """Score only the first N rows of --data (0: all; the built-in task: 40)."""
    adapter: Optional[str] = None
    """Adapter directory to evaluate (empty: the base model)."""
    metric: Literal["auto", "accuracy", "bleu", "exact", "perplexity"] = "auto"
    """auto: accuracy for classify; perplexity plus exact match for causal data; the built-in task's score."""
    batch_size: int = 16
    """Examples per batch."""
    max_new_tokens: int = 64
    """Tokens generated per example for bleu/exact."""
    seed: int = 0
    """Seed of the built-in task's data."""


@dataclass
class GenerateOptions(ModelOptions):
    """Options of `lorakit generate`."""

    adapter: list[str] = field(default_factory=list)
    """Adapter directories; several are shown side by side. Empty: the base model only."""
    prompt: list[str] = field(default_factory=list)
    """Prompts (several allowed). Empty: read --prompts-file, or a few prompts of the built-in task."""
    prompts_file: Optional[str] = None
    """A file of prompts: plain text, one prompt a line; or .jsonl/.json/.csv/.tsv rows with a `prompt` field,
    or an `instruction` field (plus `input`) — answers in the rows are ignored, so training files work too."""
    format: Literal["auto", "raw", "chat", "alpaca"] = "auto"
    """How each prompt is rendered: raw (as it is), chat (a user turn of the chat template), alpaca (the Alpaca
    template). auto: the format the adapter was trained with (its run's options.json), else chat for a model
    with a chat template (instruct models), else raw."""
    with_base: bool = True
    """Also show the base model's output beside the adapters'."""
    max_new_tokens: int = 64
    """Tokens to generate (greedy)."""
    limit: int = 4
    """At most this many prompts from --prompts-file or the built-in task."""


@dataclass
class MergeOptions(ModelOptions):
    """Options of `lorakit merge`."""

    adapter: str = positional()
    """Adapter directory to merge into the base model."""
    output: str = "merged-model"
    """Directory of the standalone merged Hugging Face model (loadable with from_pretrained)."""
    check: bool = True
    """Compare the merged model's logits with the adapted model's on a sample input."""


@dataclass
class InfoOptions:
    """Options of `lorakit info`."""

    directory: str = positional()
    """An adapter directory (adapter_config.json + adapter_model.safetensors)."""
