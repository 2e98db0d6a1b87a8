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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..core import atomic
from ..core.api import add_adapter, count_parameters, disabled
from ..errors import ConfigError, LorakitError
from ..fast import fusion_report, optimize
from ..loading.models import BUILTIN_GGUF, load_model, load_tokenizer, log_to_stderr, resolve_model
from ..loading.rows import Example
from ..quant.quantize import quantize
from . import distributed
from . import task as builtin
from .adapter_options import build_adapter_config
from .batches import MicroBatches
from .checkpoint import check_resume_options
from .data import encode_run_data, read_run_data
from .evaluate import classify_scores, generate, generation_scores, heldout_loss
from .fields import build_options, given_fields, read_config_file
from .layout import ADAPTER_DIR
from .loop import bf16_enabled, total_steps, train_loop
from .loraplus import check_ratio
from .options import TrainOptions
from .packing import check_packing_options, training_batches
from .report import (check_output_dir, format_scores, plot_loss, prepare_output_dir, write_generations,
                     write_metrics)


@dataclass
class TrainResult:
    """What `train` returns: where the run wrote its files, its metrics, and the model in memory."""

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
    """Seed python's, torch's and (when installed) numpy's global generators."""
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
    log = _logger(opts.quiet or not dist.is_main)  # rank 0 alone prints and writes
    started = time.perf_counter()
    check_output_dir(opts)  # before anything: an earlier run's files are never replaced by accident
    _check_run(opts, dist)  # options alone, then the data: a bad file fails before minutes of model loading,
    seed_everything(opts.seed)
    data = read_run_data(opts)  # before --nproc starts workers, and before the output directory is touched
    launched = opts
    opts = dataclasses.replace(opts, prompt_format=data.prompt_format)  # options.json records what was used
    if opts.resume:  # refuses a changed option (or no checkpoint) before the model loads
        check_resume_options(Path(opts.output_dir), opts)
    if opts.nproc > 1 and not dist.enabled:
        return _launched(launched, model, log)

    path, tokenizer = _tokenizer(opts, model, tokenizer, log)
    train_set, eval_set = encode_run_data(opts, tokenizer, data)  # tokenized before the model loads, too
    model = _load_model(opts, path, model, data.label_names, device, dist)
    log(f"data: {len(train_set)} training / {len(eval_set)} held-out examples"
        + (" (built-in task)" if not opts.data else f" from {opts.data}"))
    compute = torch.bfloat16 if bf16_enabled(opts.precision, device) else None  # the varlen probe's autocast
    batches = training_batches(opts, train_set, tokenizer.pad_token_id, model, dist.world_size, device, log,
                               compute_dtype=compute)
    opts = _resolved_packing(opts, batches)
    sizes = _add_adapter(model, opts, given, total_steps(opts, batches.per_epoch), log)
    if opts.optimize or opts.checkpoint != "none" or opts.cuda_graphs:
        _optimize(model, log, opts.checkpoint, bf16_enabled(opts.precision, device), opts.cuda_graphs)
    _distribute(model, opts, dist, device, log)
    prepare_output_dir(opts, dist)

    evaluate_fn = _scorer(opts, model, tokenizer, eval_set, tokenizer.pad_token_id, device)
    with disabled(model):
        before, before_texts = evaluate_fn(final=True)
    log(f"before training: {format_scores(before)}")
    history, train_seconds = _run_loop(model, batches, opts, device, evaluate_fn, on_step, dist)
    after, after_texts = evaluate_fn(final=True)
    log(f"after training:  {format_scores(after)}")

    adapter_dir = distributed.save_adapter(model, Path(opts.output_dir) / ADAPTER_DIR, dist)
    metrics = _metrics(opts, sizes, before, after, history, train_seconds, started, device, dist)
    dist.close()
    if dist.is_main:
        _report(opts, metrics, history, tokenizer, eval_set, before_texts, after_texts, adapter_dir, log)
    return TrainResult(Path(opts.output_dir), adapter_dir, metrics, model, tokenizer)


def _logger(quiet: bool) -> Callable[[str], None]:
    """Progress lines to stderr, or nowhere."""
    return (lambda *a: None) if quiet else log_to_stderr


def _launched(opts: TrainOptions, model, log) -> TrainResult:
    """--nproc N: the same run on N processes under torchrun; the result is read back from the run directory
    (the model lives in the workers, so TrainResult.model is None)."""
    if model is not None:
        raise ConfigError("--nproc starts new processes: give the model as a name or path, not an object")
    out_dir = Path(opts.output_dir)
    code = distributed.launch(opts, out_dir, log)
    if code != 0:
        raise LorakitError(f"the {opts.nproc} training processes failed (torchrun exit code {code}); "
                           "their output is above")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return TrainResult(out_dir, out_dir / ADAPTER_DIR, metrics, None, None)


def _check_run(opts: TrainOptions, dist: distributed.Distributed) -> None:
    """Options that cannot run (alone or together), before anything is read, loaded or written."""
    distributed.check_options(opts, dist)
    check_ratio(opts.loraplus_lr_ratio)
    check_packing_options(opts)
    if opts.bits == 4 and opts.strategy == "fsdp" and (dist.enabled or opts.nproc > 1):
        raise ConfigError("--bits 4 trains on a 4-bit base in one process or with --strategy ddp, not with fsdp")
    if opts.checkpoint != "none" and opts.gradient_checkpointing:
        raise ConfigError(f"--checkpoint {opts.checkpoint} and --gradient-checkpointing both checkpoint the blocks: "
                          "give one of them")
    if opts.cuda_graphs and (opts.checkpoint == "offload" or opts.gradient_checkpointing):
        raise ConfigError("--cuda-graphs combines with --checkpoint recompute, not with --checkpoint offload or "
                          "--gradient-checkpointing: drop one of them")
    if opts.cuda_graphs and (dist.enabled or opts.nproc > 1):
        raise ConfigError("--cuda-graphs runs in one process: drop --nproc (DDP and FSDP take the blocks eagerly)")


def _resolved_packing(opts: TrainOptions, batches) -> TrainOptions:
    """The options with packing as the run did it (True/False) and, packed, the token budget it used: what
    options.json, the checkpoints and metrics.json record."""
    if getattr(batches, "packed", False):
        return dataclasses.replace(opts, packing=True, pack_tokens=batches.budget)
    return dataclasses.replace(opts, packing=False)


def _tokenizer(opts: TrainOptions, model, tokenizer, log) -> tuple[Optional[str], Any]:
    """(the resolved --model path, or None for a model object; its tokenizer)."""
    if model is not None:
        if tokenizer is None:
            raise ConfigError("pass the tokenizer together with a model object")
        return None, tokenizer
    path = resolve_model(opts.model, log)
    return path, tokenizer or load_tokenizer(path)


def _load_model(opts: TrainOptions, path: Optional[str], model, label_names: Optional[list[str]],
                device: torch.device, dist: distributed.Distributed):
    """The model on its device, loaded from `path` (or the object given); --bits 4: its linear layers in NF4."""
    sharded = dist.shards_model(opts.strategy)  # FSDP: stays on the CPU; fully_shard moves each rank's shard
    if model is None:  # --bits 4: loaded on the CPU, each layer quantized onto the device (never all dense there)
        model = load_model(path, opts.task, num_labels=opts.num_labels or len(label_names or []) or 2,
                           device="cpu" if sharded or opts.bits == 4 else str(device))
    if opts.bits == 4:  # QLoRA: the frozen base in NF4, the adapter (added next) in fp32
        compute = torch.bfloat16 if bf16_enabled(opts.precision, device) else torch.float32
        quantize(model, compute_dtype=compute, device=None if sharded else device)
    if not sharded:
        model.to(device)
    return model


def _add_adapter(model, opts: TrainOptions, given: set[str], steps: int, log) -> tuple[int, int]:
    """Add the adapter the options describe (its init seeded by --seed); returns (trainable, total) sizes."""
    torch.manual_seed(opts.seed)
    adapter_config = build_adapter_config(opts, opts.task, given, steps=steps)
    adapter_config.base_model_name_or_path = _model_reference(opts.model, model)
    add_adapter(model, adapter_config)
    n_trainable, n_total = count_parameters(model)
    targets = adapter_config.target_modules
    if adapter_config.parameter_targets:
        targets = f"{targets} and parameters {adapter_config.parameter_targets}" if targets else \
            f"parameters {adapter_config.parameter_targets}"
    log(f"adapter: {opts.adapter} r={opts.r} on {targets}: {n_trainable:,} trainable of "
        f"{n_total:,} parameters ({100 * n_trainable / n_total:.3f}%)")
    return n_trainable, n_total


def _optimize(model, log, checkpoint: str = "none", bf16: bool = False, cuda_graphs: bool = False) -> None:
    """--optimize / --checkpoint: the fast paths, installed before any DDP/FSDP wrapping (they patch the model's
    own modules, and FSDP2 unshards each block's parameters before its fused calls read them). Under a bf16
    autocast over weights in another dtype every call casts W, which the wide form cannot take: no widening."""
    model.train()  # the report depends on the mode (dropout): give the training one
    first = next(model.parameters(), None)
    wide = "auto" if not bf16 or first is None or first.dtype == torch.bfloat16 else False
    counts = optimize(model, checkpoint={"none": False, "recompute": True, "offload": "offload"}[checkpoint],
                      wide=wide, cuda_graphs=cuda_graphs)
    log(f"optimize: {counts['linear']} adapted linears on the fused path, {counts['not_fused']} not fused"
        + (f"; {counts['checkpoint']} blocks checkpointed ({checkpoint})" if checkpoint != "none" else "")
        + (f"; {counts['cuda_graphs']} blocks replayed from CUDA graphs" if cuda_graphs else ""))
    for path, reason in fusion_report(model):
        log(f"  not fused: {path}: {reason}")


def _distribute(model, opts: TrainOptions, dist: distributed.Distributed, device: torch.device, log) -> None:
    """Under torchrun: wrap the adapted model (DDP or FSDP) and give each rank its own dropout stream."""
    if not dist.enabled:
        return
    distributed.wrap_model(model, dist, opts.strategy, device, bf16=bf16_enabled(opts.precision, device))
    distributed.decorrelate_rng(dist, opts.seed)
    log(f"{opts.strategy} on {dist.world_size} processes ({device.type}); --batch-size {opts.batch_size} is "
        f"the global micro-batch, {opts.batch_size // dist.world_size}+ rows per process")


def _run_loop(model, batches: MicroBatches, opts: TrainOptions, device: torch.device, evaluate_fn, on_step,
              dist: distributed.Distributed) -> tuple[list[dict], float]:
    """options.json, then the training loop; returns (its history, seconds it took). A resumed run first checks
    its options against the checkpoint's (refusing changes that alter the training), so options.json never
    records values the run did not use (checked again here: packing left automatic is known only now)."""
    out_dir = Path(opts.output_dir)
    if opts.resume:
        check_resume_options(out_dir, opts)
    if dist.is_main:
        atomic.write_text(out_dir / "options.json", json.dumps(dataclasses.asdict(opts), indent=2) + "\n")
    t_train = time.perf_counter()
    history = train_loop(model, batches, opts, device, out_dir, evaluate=lambda: evaluate_fn(final=False)[0],
                         on_step=on_step, progress=not opts.quiet, dist=dist)
    return history, time.perf_counter() - t_train


def _metrics(opts: TrainOptions, sizes: tuple[int, int], before: dict, after: dict, history: list[dict],
             train_seconds: float, started: float, device: torch.device, dist: distributed.Distributed) -> dict:
    """metrics.json's content."""
    steps = [h for h in history if "loss" in h]
    return {
        "model": opts.model, "adapter": opts.adapter, "task": opts.task if opts.data else "builtin:record-line",
        "trainable_params": sizes[0], "total_params": sizes[1], "before": before, "after": after,
        "train": {"steps": steps[-1]["step"] if steps else 0, "seconds": train_seconds,
                  "tokens_per_s": steps[-1]["tokens_per_s"] if steps else 0.0,
                  "tokens": steps[-1].get("tokens", 0) if steps else 0,
                  "padding_fraction": steps[-1].get("padding_fraction") if steps else None,
                  # the progress bar's loss: the mean of the last loop.LOSS_WINDOW steps' losses
                  "final_loss": steps[-1].get("running_loss", steps[-1]["loss"]) if steps else None},
        "wall_seconds": time.perf_counter() - started, "device": str(device),
        "processes": dist.world_size, "strategy": dist.strategy,
        "options": dataclasses.asdict(opts), "history": history,
    }


def _report(opts: TrainOptions, metrics: dict, history: list[dict], tokenizer, eval_set: list[Example],
            before_texts, after_texts, adapter_dir: Path, log) -> None:
    """Rank 0's files next to the adapter: metrics.json, the loss curve, before/after generations."""
    out_dir = Path(opts.output_dir)
    write_metrics(out_dir, metrics)
    plot_loss(out_dir, history, title=f"{opts.adapter} on {Path(opts.model).name}")
    written = ["metrics.json", "loss_curve.png"]
    if before_texts is not None and after_texts is not None:
        k = min(opts.samples, len(eval_set))
        prompts = [tokenizer.decode(e.prompt_ids) for e in eval_set[:k]]
        write_generations(out_dir, prompts, [e.reference for e in eval_set[:k]], before_texts[:k], after_texts[:k])
        written.append("generations.md")
    log(f"wrote {adapter_dir}, {', '.join(written)} to {out_dir} "
        f"({metrics['wall_seconds']:.0f} s in all, {metrics['train']['seconds']:.0f} s training)")


def _model_reference(name: str, model) -> str:
    """What adapter_config.json records as the base, in a form PEFT's AutoPeftModel loads: a bundled model or a
    GGUF file as the converted model directory lorakit cached (it loads offline), a local path resolved, a hub name
    as given."""
    path = Path(name).expanduser()
    if name in BUILTIN_GGUF or path.suffix.lower() == ".gguf":
        loaded_from = getattr(getattr(model, "config", None), "_name_or_path", None)
        if loaded_from and (Path(loaded_from) / "config.json").is_file():  # the converted directory this run loaded
            return str(Path(loaded_from).resolve())
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
        if not final or not eval_set:
            return scores, None
        # generations.md always; --score none generates only its --samples examples
        shown = eval_set if kind != "none" else eval_set[: opts.samples]
        if not shown:
            return scores, None
        texts = generate(model, tokenizer, [e.prompt_ids for e in shown], opts.max_new_tokens, device=device)
        if kind == "none":
            return scores, texts
        refs = [e.reference for e in eval_set]
        gen = builtin.score(texts, refs) if kind == "builtin" else generation_scores(texts, refs, kind)
        return {**gen, **scores}, texts

    return evaluate
