"""`lorakit.train(...)`: load → data → adapter → score before → train → score after → save and report.

    import lorakit
    result = lorakit.train()                                   # the built-in demo task
    result = lorakit.train(model="path/to/hf-model", data="train.jsonl", r=16, target_modules=["q_proj", "v_proj"])
    result = lorakit.train(config="run.yaml", lr=1e-4)         # a config file, with overrides
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError, LorakitError
from ..core.api import add_adapter, count_parameters, disabled
from . import distributed
from . import task as builtin
from .data import Encoder, Example, MicroBatches, label_names_of, read_rows
from .evaluate import classify_scores, generate, generation_scores, heldout_loss
from .fields import build_options, given_fields, read_config_file
from .loop import total_steps, train_loop
from ..loading.models import load_model, load_tokenizer, resolve_model
from .adapter_options import build_adapter_config
from .options import TrainOptions
from .report import format_scores, plot_loss, write_generations, write_metrics

ADAPTER_DIR = "adapter"


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]
    model: Any = field(repr=False)  # the adapted model, in memory
    tokenizer: Any = field(repr=False)


def resolve_options(options: Optional[TrainOptions] = None, config: Optional[str] = None,
                    **overrides: Any) -> tuple[TrainOptions, set[str]]:
    """(options, names the user set). Layers: defaults < built-in recipe (no data) < config file < overrides."""
    if options is not None:
        options = dataclasses.replace(options, **overrides) if overrides else options
        return options, set(given_fields(options))
    from_file = read_config_file(config) if config else {}
    user = {**from_file, **overrides}
    opts = build_options(TrainOptions, builtin.preset_for(user), from_file, overrides)
    return opts, {k.replace("-", "_") for k in user}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def train(options: Optional[TrainOptions] = None, *, config: Optional[str] = None, model=None, tokenizer=None,
          on_step: Optional[Callable[[int, dict], None]] = None, **overrides: Any) -> TrainResult:
    """Fine-tune with an adapter and write the run directory. Any TrainOptions field can be a keyword.
    `model` is a name/path like --model, or a model object already in memory (give its `tokenizer` too)."""
    if isinstance(model, (str, os.PathLike)):
        overrides["model"], model = str(model), None
    opts, given = resolve_options(options, config, **overrides)
    dist, device = distributed.setup(opts.device)  # one process, or one of torchrun's
    quiet = opts.quiet or not dist.is_main  # rank 0 alone prints and writes
    log = (lambda *a: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.perf_counter()
    out_dir = Path(opts.output_dir)
    if opts.nproc > 1 and not dist.enabled:
        if model is not None:
            raise ConfigError("--nproc starts new processes: give the model as a name or path, not an object")
        return _launched(opts, out_dir, log)
    distributed.check_options(opts, dist)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(opts.seed)
    sharded = dist.enabled and opts.strategy == "fsdp"

    # --- model and data (the data first: a bad file fails before minutes of model loading) ----------------
    train_rows, eval_rows = _rows(opts)
    if model is None:
        path = resolve_model(opts.model, log)
        tokenizer = tokenizer or load_tokenizer(path)
    elif tokenizer is None:
        raise ConfigError("pass the tokenizer together with a model object")
    label_names = label_names_of(train_rows) if opts.task == "classify" else None
    if model is None:
        # FSDP: load on the CPU; fully_shard moves each rank's shard to its device
        model = load_model(path, opts.task, num_labels=opts.num_labels or len(label_names or []) or 2,
                           device="cpu" if sharded else str(device))
    if not sharded:
        model.to(device)
    encoder = Encoder(tokenizer, opts.task, opts.prompt_format, opts.max_length, label_names)
    train_set = _encode(encoder, train_rows, opts.task)
    eval_set = _encode(encoder, eval_rows, opts.task)
    log(f"data: {len(train_set)} training / {len(eval_set)} held-out examples"
        + (" (built-in task)" if not opts.data else f" from {opts.data}"))

    # --- adapter --------------------------------------------------------------------------------------
    batches = MicroBatches(train_set, opts.batch_size, opts.seed, pad_id=tokenizer.pad_token_id, task=opts.task)
    steps = total_steps(opts, batches.per_epoch)
    torch.manual_seed(opts.seed)
    adapter_config = build_adapter_config(opts, opts.task, given, steps=steps)
    adapter_config.base_model_name_or_path = _model_reference(opts.model)
    add_adapter(model, adapter_config)
    n_trainable, n_total = count_parameters(model)
    log(f"adapter: {opts.adapter} r={opts.r} on {opts.target_modules}: {n_trainable:,} trainable of "
        f"{n_total:,} parameters ({100 * n_trainable / n_total:.3f}%)")
    if dist.enabled:
        use_bf16 = opts.precision == "bf16" or (opts.precision == "auto" and device.type == "cuda")
        distributed.wrap_model(model, dist, opts.strategy, device, bf16=use_bf16)
        distributed.decorrelate_rng(dist, opts.seed)
        log(f"{opts.strategy} on {dist.world_size} processes ({device.type}); --batch-size {opts.batch_size} is "
            f"the global micro-batch, {opts.batch_size // dist.world_size}+ rows per process")

    pad_id = tokenizer.pad_token_id
    evaluate_fn = _scorer(opts, model, tokenizer, eval_set, pad_id, device)
    with disabled(model):
        before, before_texts = evaluate_fn(final=True)
    log(f"before training: {format_scores(before)}")

    # --- train ----------------------------------------------------------------------------------------
    if dist.is_main:
        (out_dir / "options.json").write_text(json.dumps(dataclasses.asdict(opts), indent=2) + "\n")
    t_train = time.perf_counter()
    history = train_loop(model, batches, opts, device, out_dir, evaluate=lambda: evaluate_fn(final=False)[0],
                         on_step=on_step, progress=not opts.quiet, dist=dist)
    train_seconds = time.perf_counter() - t_train
    after, after_texts = evaluate_fn(final=True)
    log(f"after training:  {format_scores(after)}")

    # --- save and report --------------------------------------------------------------------------------
    adapter_dir = distributed.save_adapter(model, out_dir / ADAPTER_DIR, dist)
    steps = [h for h in history if "loss" in h]
    metrics = {
        "model": opts.model, "adapter": opts.adapter, "task": opts.task if opts.data else "builtin:record-line",
        "trainable_params": n_trainable, "total_params": n_total, "before": before, "after": after,
        "train": {"steps": steps[-1]["step"] if steps else 0, "seconds": train_seconds,
                  "tokens_per_s": steps[-1]["tokens_per_s"] if steps else 0.0,
                  "final_loss": steps[-1]["loss"] if steps else None},
        "wall_seconds": time.perf_counter() - started, "device": str(device),
        "processes": dist.world_size, "strategy": dist.strategy,
        "options": dataclasses.asdict(opts), "history": history,
    }
    dist.close()
    if not dist.is_main:
        return TrainResult(out_dir, adapter_dir, metrics, model, tokenizer)
    write_metrics(out_dir, metrics)
    plot_loss(out_dir, history, title=f"{opts.adapter} on {Path(opts.model).name}")
    if before_texts is not None and after_texts is not None:
        k = min(opts.samples, len(eval_set))
        prompts = [tokenizer.decode(e.prompt_ids) for e in eval_set[:k]]
        write_generations(out_dir, prompts, [e.reference for e in eval_set[:k]], before_texts[:k], after_texts[:k])
    log(f"wrote {adapter_dir}, metrics.json, loss_curve.png to {out_dir} "
        f"({metrics['wall_seconds']:.0f} s in all, {train_seconds:.0f} s training)")
    return TrainResult(out_dir, adapter_dir, metrics, model, tokenizer)


def _launched(opts: TrainOptions, out_dir: Path, log) -> TrainResult:
    """--nproc N: the same run on N processes under torchrun; the result is read back from the run directory
    (the model lives in the workers, so TrainResult.model is None)."""
    code = distributed.launch(opts, out_dir, log)
    if code != 0:
        raise LorakitError(f"the {opts.nproc} training processes failed (torchrun exit code {code}); "
                           "their output is above")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return TrainResult(out_dir, out_dir / ADAPTER_DIR, metrics, None, None)


def _rows(opts: TrainOptions) -> tuple[list[dict], list[dict]]:
    if not opts.data:
        if opts.task != "causal":
            raise ConfigError("the built-in task is a causal LM task: pass --data for --task classify")
        return builtin.builtin_rows(opts.train_examples, opts.eval_examples or 40, opts.seed)
    rows = read_rows(opts.data)
    if opts.eval_data:
        eval_rows = read_rows(opts.eval_data)
    else:  # hold out a deterministic slice
        order = random.Random(opts.seed).sample(range(len(rows)), len(rows))
        n_eval = min(500, max(1, int(len(rows) * opts.eval_fraction)))
        eval_rows, rows = [rows[i] for i in order[:n_eval]], [rows[i] for i in order[n_eval:]]
    if opts.train_examples:
        rows = rows[: opts.train_examples]
    if opts.eval_examples:
        eval_rows = eval_rows[: opts.eval_examples]
    return rows, eval_rows


def _encode(encoder: Encoder, rows: list[dict], task: str) -> list[Example]:
    examples = [encoder.encode(r) for r in rows]
    if task == "causal":  # an answer cut away entirely by --max-length teaches nothing
        examples = [e for e in examples if any(label != -100 for label in e.labels[1:])]
    return examples


def _model_reference(name: str) -> str:
    """What adapter_config.json records as the base: a built-in or hub name as given, a local path resolved."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _scorer(opts: TrainOptions, model, tokenizer, eval_set: list[Example], pad_id: int, device):
    """evaluate(final) → (scores, generations or None). Loss-only in the middle of training (cheap)."""
    kind = opts.score
    if kind == "auto":
        kind = "builtin" if not opts.data else "none"

    def evaluate(final: bool):
        if opts.task == "classify":
            return classify_scores(model, eval_set, pad_id, device=device), None
        scores = heldout_loss(model, eval_set, pad_id, device=device)
        if not final or kind == "none" or not eval_set:
            return scores, None
        texts = generate(model, tokenizer, [e.prompt_ids for e in eval_set], opts.max_new_tokens, device=device)
        refs = [e.reference for e in eval_set]
        gen = builtin.score(texts, refs) if kind == "builtin" else generation_scores(texts, refs, kind)
        return {**gen, **scores}, texts

    return evaluate
