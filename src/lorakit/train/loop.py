"""The training loop: one explicit loop, no framework.

    for step in steps:
        for each micro-batch of the step:  loss = token-summed CE / tokens in the step (+ hook losses); backward
        clip; AdamW step (adapter parameters only); schedule step; hooks.after_step(step); zero grads
        log; evaluate every N steps; checkpoint every N steps

A checkpoint (train/checkpoint.py: safetensors + JSON, never a pickle) holds everything the next step depends
on (adapter and optimizer tensors, schedule, the RNG states of torch/python/numpy, the step, which fixes the
data position), so a resumed run ends with the same adapter, bit for bit on CPU, as a run that was never
interrupted.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..core.api import training_hooks
from ..errors import ConfigError
from ..loading.rows import IGNORE
from .batches import MicroBatches
from .checkpoint import CHECKPOINTS, latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import Distributed
from .loraplus import build_optimizer
from .packed_attention import packed_loss_sum
from .packing import real_tokens

LOSS_WINDOW = 10  # the progress bar's loss and metrics.json's final_loss: the mean of the last 10 step losses


# --- loss -----------------------------------------------------------------------------------------------
def causal_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed next-token CE over labelled tokens, their count). Only positions that predict a labelled token
    get logits: with the loss on completions only, most of the [T, vocab] lm_head work is skipped."""
    labels = batch["labels"]  # [B, T], IGNORE on prompt and padding
    targets = labels[:, 1:]  # position t predicts token t+1
    has_label = (targets != IGNORE).any(dim=0)
    start = int(has_label.nonzero()[0]) if has_label.any() else targets.shape[1] - 1
    kwargs = {}
    keep = labels.shape[1] - start  # logits for positions start .. T-1
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
    logits = logits[:, -keep:-1] if keep > 1 else logits[:, :0]  # [B, T-1-start, V]
    targets = targets[:, start:]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def classify_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed CE of the batch's class logits, its number of rows)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, C]
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), len(batch["labels"])


def _accepts(model, name: str) -> bool:
    # the forward about to be called (an instance patch hides the class's keywords: then False)
    model = getattr(model, "module", model)  # the model inside a DDP wrapper
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# --- schedule -------------------------------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak LR at `step`: linear warmup, then cosine/linear decay to 0 or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)


def total_steps(options, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of the run: max_steps when set, else epochs over the micro-batches / grad_accum."""
    if options.max_steps > 0:
        return options.max_steps
    return max(1, math.ceil(options.epochs * micro_batches_per_epoch / options.grad_accum))


def warmup_steps(options, total: int) -> int:
    """Warmup steps: `options.warmup` as a fraction of `total` when below 1, else as a count."""
    return int(options.warmup * total) if options.warmup < 1 else int(options.warmup)


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of the parameters being trained, in named_parameters order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --- the loop -------------------------------------------------------------------------------------------
def bf16_enabled(precision: str, device: torch.device) -> bool:
    """The bf16 policy: "bf16" always, "auto" on a GPU, else float32 ("fp32", or "auto" on the CPU)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


@dataclass
class _Training:
    """What the loop's steps share: the optimizer side, the step range and the running log."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    hooks: list
    loss_sum: Callable
    bf16: bool
    steps: int
    start: int = 0
    history: list[dict] = field(default_factory=list)
    tokens_done: int = 0  # real (not padding) input tokens of every micro-batch so far (all ranks' rows)
    slots_done: int = 0  # token slots computed for them, padding included
    started: float = 0.0  # perf_counter when the first step began
    recent: list[float] = field(default_factory=list)  # the last LOSS_WINDOW step losses


def train_loop(model, batches: MicroBatches, options, device: torch.device, out_dir: Path,
               evaluate: Optional[Callable[[], dict[str, float]]] = None,
               on_step: Optional[Callable[[int, dict], None]] = None, progress: bool = True,
               dist: Distributed = Distributed()) -> list[dict]:
    """Train the model's trainable (adapter) parameters in place. Returns the history of logged records.
    Under torch.distributed, `model` is already wrapped (distributed.wrap_model) and every rank calls this."""
    run = _build(model, batches, options, device)
    if options.resume:
        _resume(run, model, out_dir, dist)
    _enter_training(model, options)
    forward = dist.forward_model(model)  # DDP's wrapper syncs gradients; FSDP hooks live on the model itself
    bar = _progress(run.steps, run.start, progress and dist.is_main)
    run.started = time.perf_counter()
    for step in range(run.start, run.steps):
        micro = [batches[step * options.grad_accum + k] for k in range(options.grad_accum)]
        step_loss = _accumulate(run, forward, micro, options, device, dist)
        _apply_step(run, step, options)
        record = _record(run, step + 1, step_loss, bar, options)
        _after_step(run, model, step + 1, record, options, out_dir, evaluate, on_step, dist)
    if bar is not None:
        bar.close()
    _leave_training(model, options, run.hooks)
    return run.history


def _build(model, batches: MicroBatches, options, device: torch.device) -> _Training:
    """Optimizer (AdamW on the trainable parameters), LR schedule, the adapter's training hooks, the loss."""
    params = list(trainable(model).values())
    if not params:
        raise ConfigError("the model has no trainable parameters (was an adapter added?)")
    steps = total_steps(options, batches.per_epoch)
    warmup = warmup_steps(options, steps)
    optimizer = build_optimizer(model, params, options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup, options.schedule))
    loss_sum = causal_loss_sum if options.task == "causal" else classify_loss_sum
    if getattr(batches, "packed", False):
        loss_sum = packed_loss_sum
    return _Training(params, optimizer, scheduler, training_hooks(model), loss_sum,
                     bf16_enabled(options.precision, device), steps)


def _resume(run: _Training, model, out_dir: Path, dist: Distributed) -> None:
    """Continue from the latest checkpoint in `out_dir`: tensors, schedule, hooks, RNG, step and history."""
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        raise ConfigError(f"--resume: no checkpoint in {out_dir / CHECKPOINTS}")
    run.start, run.history, progress = load_checkpoint(ckpt, model, run.optimizer, run.scheduler, run.hooks, dist)
    run.tokens_done, run.slots_done = progress.get("tokens", 0), progress.get("slots", 0)
    run.recent = [float(v) for v in progress.get("recent", [])]


def _enter_training(model, options) -> None:
    """HF gradient checkpointing when asked, then train mode."""
    if options.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ConfigError("--gradient-checkpointing needs a Hugging Face model")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def _leave_training(model, options, hooks: list) -> None:
    """Undo _enter_training (eval mode) and let the hooks finish the adapter (on_save)."""
    if options.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    for hook in hooks:
        if hasattr(hook, "on_save"):
            hook.on_save()


# --- one optimizer step -----------------------------------------------------------------------------------
def _accumulate(run: _Training, forward, micro: list[dict[str, torch.Tensor]], options, device: torch.device,
                dist: Distributed) -> float:
    """Forward and backward of the step's micro-batches (this rank's rows of each), gradients accumulated;
    returns the step's loss over all ranks (mean over the step's labelled targets)."""
    n_targets = sum(_count_targets(b, options.task) for b in micro)  # the step's loss is a mean over these
    own_loss = 0.0
    # without the cast cache under --cuda-graphs on a GPU: a block captured with a cached cast would replay that
    # cast, never the updated weights', so block_graphs runs such calls eagerly
    graphs = getattr(options, "cuda_graphs", False) and device.type == "cuda"
    for k, batch in enumerate(micro):
        run.tokens_done += real_tokens(batch)  # every rank holds the whole micro-batch
        run.slots_done += batch["input_ids"].numel()
        batch = {key: v.to(device) for key, v in dist.own_rows(batch).items()}
        with dist.grad_sync(last=k == len(micro) - 1):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.bf16,
                                cache_enabled=False if graphs else None):
                total, loss = _micro_loss(run, forward, batch, n_targets, options.grad_accum, dist.world_size)
            loss.backward()
        own_loss += float(total.detach()) / max(1, n_targets)
    (step_loss,) = dist.all_sum(own_loss)
    return step_loss


def _micro_loss(run: _Training, forward, batch: dict[str, torch.Tensor], n_targets: int, grad_accum: int,
                world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss of the batch's rows, the loss to backpropagate: its share of the step plus hook losses)."""
    total, _ = run.loss_sum(forward, batch)
    # ranks' gradients are averaged: * world_size makes their mean the whole batch's gradient
    loss = total / max(1, n_targets) * world_size
    for hook in run.hooks:
        extra = hook.extra_loss()
        if extra is not None:
            loss = loss + extra / grad_accum
    return total, loss


def _apply_step(run: _Training, step: int, options) -> None:
    """Clip, optimizer and schedule step, the hooks' after_step, then clear the gradients."""
    if options.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.params, options.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    for hook in run.hooks:
        hook.after_step(step)
    run.optimizer.zero_grad(set_to_none=True)


# --- after a step -----------------------------------------------------------------------------------------
def _record(run: _Training, done: int, step_loss: float, bar, options) -> dict:
    """The step's record (kept in the history every log_every steps, the first and the last) and the bar."""
    run.recent = (run.recent + [step_loss])[-LOSS_WINDOW:]
    speed = run.tokens_done / max(1e-9, time.perf_counter() - run.started)
    record = {"step": done, "loss": step_loss, "running_loss": sum(run.recent) / len(run.recent),
              "lr": run.optimizer.param_groups[0]["lr"], "tokens_per_s": speed,
              "tokens": run.tokens_done, "padding_fraction": 1 - run.tokens_done / max(1, run.slots_done)}
    if done % options.log_every == 0 or done == run.steps or done == 1:  # a resumed run logs as a whole one
        run.history.append(record)
    if bar is not None:
        bar.set_postfix(loss=f"{record['running_loss']:.3f}", tok_s=f"{speed:.0f}", lr=f"{record['lr']:.2e}",
                        refresh=False)
        bar.update(1)
    return record


def _after_step(run: _Training, model, done: int, record: dict, options, out_dir: Path,
                evaluate: Optional[Callable[[], dict[str, float]]], on_step: Optional[Callable[[int, dict], None]],
                dist: Distributed) -> None:
    """Evaluation and checkpoint when due (never after the last step: the caller scores and saves), on_step."""
    if evaluate is not None and options.eval_every and done % options.eval_every == 0 and done < run.steps:
        run.history.append({"step": done, **_evaluate(model, evaluate)})
    if options.checkpoint_every and done % options.checkpoint_every == 0 and done < run.steps:
        save_checkpoint(out_dir, done, model, run.optimizer, run.scheduler, run.history, run.hooks, options,
                        dist=dist, progress={"tokens": run.tokens_done, "slots": run.slots_done,
                                             "recent": list(run.recent)})
    if on_step is not None:
        on_step(done, record)


def _count_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    if task == "classify":
        return len(batch["labels"])
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _evaluate(model, evaluate: Callable[[], dict[str, float]]) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        out = evaluate()
    model.train()
    return out


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
