"""The functions behind `lorakit train | eval | merge | info` (registered in cli/app.py; `generate` is in
cli/generate.py). Each takes its options dataclass, prints a human-readable result to stdout and returns the
exit code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from ..core.api import set_active
from ..core.atomic import atomic_dir
from ..core.files import load_adapter, read_config, read_tensors
from ..errors import AdapterFormatError, ConfigError
from ..export.engines import engine_support
from ..export.merged import load_adapted, memory_needed, merge_into_base, trained_bits
from ..loading.models import BUILTIN_MODEL, load_pretrained, log_to_stderr, resolve_model
from ..loading.rows import Encoder, check_rows, label_names_of, read_rows
from ..train import task as builtin
from ..train import train
from ..train.evaluate import classify_scores, generate, generation_scores, heldout_loss
from ..train.options import TrainOptions
from ..train.report import format_scores
from ..train.layout import adapter_dir
from .options import EvalOptions, InfoOptions, MergeOptions


def run_train(options: TrainOptions) -> int:
    """`lorakit train`: lorakit.train with the parsed options."""
    train(options)
    return 0


# --- shared helpers -------------------------------------------------------------------------------------
def base_model_of(adapter: Optional[str], model: str) -> str:
    """--model, or, when left at its default, the base recorded in the adapter's config."""
    if adapter and model == BUILTIN_MODEL:
        recorded = json.loads((adapter_dir(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if recorded and (recorded == BUILTIN_MODEL or Path(recorded).exists()):
            return recorded
    return model


def _load_with_adapters(options, adapters: list[str], base_from: Optional[str] = None):
    """(model, tokenizer, device) with each adapter loaded under its own name (adapter-0, adapter-1, ...).
    The base is --model, or the one recorded in the first adapter (or `base_from`) when --model is left out."""
    num_labels = options.num_labels or 2
    if options.task == "classify" and adapters:  # the head's size is in the saved classifier copy
        num_labels = options.num_labels or _saved_num_labels(adapter_dir(adapters[0])) or 2
    base = base_model_of(adapters[0] if adapters else base_from, options.model)
    model, tokenizer, device = load_pretrained(base, options.task, num_labels, options.device, log=log_to_stderr)
    for i, a in enumerate(adapters):
        load_adapter(model, adapter_dir(a), name=f"adapter-{i}")
    model.eval()
    return model, tokenizer, device


def _saved_num_labels(directory: Path) -> Optional[int]:
    """Rows of the saved classification head's weight, if the adapter saved one."""
    for key, t in read_tensors(directory).items():
        if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
            return int(t.shape[0])
    return None


# --- eval -----------------------------------------------------------------------------------------------
def run_eval(options: EvalOptions) -> int:
    """`lorakit eval`: score the base model or an adapter on --data (or the built-in task's held-out rows)."""
    adapters = [options.adapter] if options.adapter else []
    rows = _eval_rows(options)  # read and checked before the model loads
    model, tokenizer, device = _load_with_adapters(options, adapters)
    if adapters:
        set_active(model, "adapter-0")
    labels = label_names_of(rows) if options.task == "classify" else None
    encoder = Encoder(tokenizer, options.task, options.prompt_format, options.max_length, labels)
    examples = [encoder.encode(r) for r in rows]
    pad = tokenizer.pad_token_id
    if options.task == "classify":
        scores = classify_scores(model, examples, pad, options.batch_size, device)
    else:
        scores = heldout_loss(model, examples, pad, options.batch_size, device)
        if options.metric != "perplexity":
            texts = generate(model, tokenizer, [e.prompt_ids for e in examples], options.max_new_tokens,
                             options.batch_size, device)
            scores.update(_generation_scores(options, texts, examples))
    what = f"adapter {options.adapter}" if options.adapter else f"base model {options.model}"
    print(f"{what} on {len(examples)} examples: {format_scores(scores)}")
    print(json.dumps(scores))
    return 0


def _eval_rows(options: EvalOptions) -> list[dict]:
    """The rows to score: --data, or the built-in task's held-out rows; the first --eval-examples of them."""
    if options.data:
        rows = read_rows(options.data)
        check_rows(rows, options.task, options.data)
    else:
        if options.task != "causal":
            raise ConfigError("pass --data for --task classify")
        rows = builtin.builtin_rows(0, options.eval_examples or 40, options.seed)[1]
    return rows[: options.eval_examples] if options.eval_examples else rows


def _generation_scores(options: EvalOptions, texts: list[str], examples) -> dict[str, float]:
    """The built-in task's own score (no --data, --metric auto), BLEU, or exact match."""
    refs = [e.reference for e in examples]
    if not options.data and options.metric == "auto":
        return builtin.score(texts, refs)
    if options.metric == "bleu":
        return generation_scores(texts, refs, "bleu", grouped=_grouped_refs(examples))
    return generation_scores(texts, refs, "exact")


def _grouped_refs(examples) -> list[list[str]]:
    """All references of rows with the same prompt (multi-reference BLEU, e.g. E2E's MRs)."""
    by_prompt: dict[tuple, list[str]] = {}
    for e in examples:
        by_prompt.setdefault(tuple(e.prompt_ids), []).append(e.reference)
    return [by_prompt[tuple(e.prompt_ids)] for e in examples]


# --- merge ----------------------------------------------------------------------------------------------
def run_merge(options: MergeOptions) -> int:
    """`lorakit merge`: merge an adapter into its base and save a standalone model. The merged weights must be
    finite in their dtype and (with --check) give the adapted model's logits on a sample, or nothing is written;
    the output directory appears whole (core/atomic.py). An adapter of a `--bits 4` run is merged onto the NF4
    base it was trained on, dequantised to float32 (lorakit.export.merged), with the memory that takes stated."""
    if not options.adapter:
        raise ConfigError("give the adapter directory: lorakit merge ADAPTER_DIR --output DIR")
    bits = trained_bits(adapter_dir(options.adapter))
    if bits == 4:
        model, tokenizer, device = _load_nf4_trained(options)
    else:
        model, tokenizer, device = _load_with_adapters(options, [options.adapter])
    sample = _sample_input(tokenizer, device)
    with torch.no_grad():
        expected = model(**sample).logits.float() if options.check else None
    merge_into_base(model, bits)
    _check_finite_weights(model, options.adapter)
    diff = _check_logits(model, sample, expected, options.adapter) if expected is not None else None
    out = write_merged(model, tokenizer, options.output)
    base = "its NF4-quantised base (as trained), dequantised to float32" if bits == 4 else options.model
    print(f"merged {options.adapter} into {base}: standalone model in {out}")
    if diff is not None:
        print(f"check: max |logit difference| merged vs adapted = {diff:.2e}")
    return 0


def _load_nf4_trained(options: MergeOptions):
    """(model, tokenizer, device) of a --bits 4 run: the base re-quantised to NF4 on the CPU with the adapter on
    it, after a line stating the memory the merge needs."""
    if options.task != "causal":
        raise ConfigError("merging a --bits 4 run is done for --task causal models")
    adapter = adapter_dir(options.adapter)
    path = resolve_model(base_model_of(options.adapter, options.model), log_to_stderr)
    need = memory_needed(path, 4)
    if need is not None:
        log_to_stderr(need.describe())
    model, tokenizer = load_adapted(adapter, path, 4)
    return model, tokenizer, torch.device("cpu")


def _check_finite_weights(model, adapter: str) -> None:
    """Every floating tensor of the merged model is finite in its own dtype (W + ΔW can overflow fp16)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterFormatError(f"merging {adapter} gives NaN or inf in {name} "
                                     f"({str(t.dtype).replace('torch.', '')}); nothing was written")


def _check_logits(model, sample, expected: torch.Tensor, adapter: str) -> float:
    """The merged model's logits on the sample against the adapted model's; both must be finite (a NaN
    difference fails: `not diff <= tolerance`). Returns the largest difference."""
    with torch.no_grad():
        got = model(**sample).logits.float()
    if not (torch.isfinite(expected).all() and torch.isfinite(got).all()):
        raise AdapterFormatError(f"{adapter}: the adapted or merged model gives NaN or inf logits on a sample; "
                                 "nothing was written")
    diff = float((got - expected).abs().max())
    if not diff <= 1e-3 * max(1.0, float(expected.abs().max())):
        raise AdapterFormatError(f"the merged model's outputs differ from the adapted model's by {diff:.3g}; "
                                 "nothing was written")
    return diff


def write_merged(model, tokenizer, output) -> Path:
    """The merged model and its tokenizer as one directory, swapped in whole (core/atomic.py): a reader of
    `output` sees the previous model or the new one."""
    out = Path(output)
    with atomic_dir(out, replace_ok=_holds_a_model) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _holds_a_model(directory: Path) -> bool:
    """merge replaces an existing --output only when it is empty or an earlier model directory (config.json):
    a directory of other files is never swapped away."""
    return not any(directory.iterdir()) or (directory / "config.json").is_file()


def _sample_input(tokenizer, device) -> dict[str, torch.Tensor]:
    enc = tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


# --- info -----------------------------------------------------------------------------------------------
def adapter_info(directory: str) -> dict[str, Any]:
    """What `lorakit info` shows of an adapter directory, as a dict."""
    d = adapter_dir(directory)
    config = read_config(d)
    tensors = read_tensors(d)
    raw = json.loads((d / "adapter_config.json").read_text())
    size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    return {
        "directory": str(d), "type": config.variant.lower(), "peft_type": raw.get("peft_type"),
        "rank": raw.get("r"), "rank_pattern": raw.get("rank_pattern") or {},
        "alpha": raw.get(config.run_option_fields.get("lora_alpha", "lora_alpha")),  # the variant's alpha field
        "target_modules": raw.get("target_modules"),
        **({"target_parameters": raw["target_parameters"]} if raw.get("target_parameters") else {}),
        "modules_to_save": raw.get("modules_to_save"),
        "parameters": int(sum(t.numel() for t in tensors.values())), "tensors": len(tensors), "dtypes": dtypes,
        "size_on_disk_bytes": size, "base_model": raw.get("base_model_name_or_path"),
        "serving_engines": _engines_line(d),
    }


def _engines_line(directory: Path) -> str:
    """Which serving engines load the directory as it is (their default limits), and why the others refuse."""
    parts = []
    for engine, problems in engine_support(directory).items():
        parts.append(f"{engine}: loads as is" if not problems else f"{engine}: no ({'; '.join(problems)})")
    return "; ".join(parts) + ("" if all("loads as is" in p for p in parts) else
                               " — lorakit export DIR --for ENGINE --output OUT converts it")


def run_info(options: InfoOptions) -> int:
    """`lorakit info`: describe an adapter directory."""
    if not options.directory:
        raise ConfigError("give the adapter directory: lorakit info DIR")
    info = adapter_info(options.directory)
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "size_on_disk_bytes":
            value = f"{value:,} bytes ({value / 2**20:.2f} MiB)"
        elif key == "parameters":
            value = f"{value:,}"
        elif key == "target_modules" and isinstance(value, list) and len(value) > 8:
            value = _summarise_paths(value)
        print(f"{key:<{width}}  {value}")
    return 0


def _summarise_paths(paths: list[str]) -> str:
    """Many module paths (an all-linear or regex target, saved resolved) as their distinct names with counts."""
    names: dict[str, int] = {}
    for path in paths:
        leaf = path.rsplit(".", 1)[-1]
        names[leaf] = names.get(leaf, 0) + 1
    listed = ", ".join(f"{n} ×{c}" for n, c in sorted(names.items()))
    return f"{len(paths)} modules: {listed}"
