"""Composition: exact weighted sums of adapters, refactored to a rank, and a LoraHub-style weight search.

    report = lorakit.combine(model, {"a": 0.7, "b": 0.3}, name="ab", rank=16)
    print(report.relative_error)      # ‖ΔW − ΔW_16‖_F / ‖ΔW‖_F over all layers (0 for rank=None)

combine computes ΔW = Σ w_i ΔW_i per layer exactly and writes its best rank-k approximation (truncated
SVD) as a new LoRA adapter. For plain LoRA it never forms ΔW: ΔW = U·V with U = [w_i s_i B_i] [out, R],
V = [A_i] [R, in] (R = Σ r_i); QR of U and Vᵀ leaves an R×R core whose SVD gives ΔW's singular triplets.
Other variants are materialised through `delta_weight` and decomposed densely. (PEFT's "linear"
combination concatenates scaled factors and is not the weighted sum of ΔW; see PEFT issue #3004.)

lorahub_search finds weights on a few labelled examples without gradients (Nelder–Mead, as LoraHub
searches with a gradient-free optimiser and an L1 penalty), evaluating each candidate exactly in a
`weighted` block (W + Σ w_i ΔW_i, no refactoring). `compose` is the `lorakit compose` command.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from ..core.adapted import AdaptedLayer
from ..variants.lora import LoraConfig
from ..errors import AdapterNameError, ConfigError, MixedBatchError
from ..variants.lora import LoraDelta
from ..core.api import _check_new_name, adapted_layers, add_adapter, get_config, list_adapters


@dataclass
class CombineReport:
    name: str
    rank: int
    weights: dict[str, float]
    relative_error: float
    """‖ΔW − ΔW_k‖_F / ‖ΔW‖_F with every layer's ΔW stacked together."""
    layer_errors: dict[str, float] = field(default_factory=dict)
    """The same ratio per module path."""

    def __str__(self) -> str:
        worst = max(self.layer_errors.items(), key=lambda kv: kv[1], default=("-", 0.0))
        return (f"combined {self.weights} into {self.name!r} at rank {self.rank}: relative Frobenius error "
                f"{self.relative_error:.3e} (worst layer {worst[0]}: {worst[1]:.3e})")


def _check_weights(model: nn.Module, weights: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"weights must be a non-empty {{adapter name: weight}} mapping, got {weights!r}")
    known = list_adapters(model)
    out = {}
    for name, w in weights.items():
        if name not in known:
            raise AdapterNameError(f"no adapter named {name!r}; this model has {sorted(known)}")
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"the weight of {name!r} must be a finite number, got {w!r}")
        out[name] = float(w)
    return out


# --- exact low-rank factors of Σ w_i ΔW_i --------------------------------------------------------------
def _svd_of_sum(layer: AdaptedLayer, weights: dict[str, float]):
    """(left [out, m], singular values [m], right [m, in·k]) of the layer's Σ w ΔW in canonical layout, fp64."""
    parts = [(w, layer.deltas[n]) for n, w in weights.items() if n in layer.deltas and w != 0.0]
    factors = [_factors(d) for _, d in parts]
    if parts and all(f is not None for f in factors):
        u = torch.cat([b.double() * (w * s) for (w, _), (b, _, s) in zip(parts, factors)], 1)  # [out, R]
        v = torch.cat([a.double() for _, a, _ in factors], 0)  # [R, in·k]
        q_u, r_u = torch.linalg.qr(u)
        q_v, r_v = torch.linalg.qr(v.t())
        uc, s, vch = torch.linalg.svd(r_u @ r_v.t(), full_matrices=False)  # the small core
        return q_u @ uc, s, vch @ q_v.t()
    ops = layer.ops
    dense = torch.zeros(ops.out_features, ops.in_features * math.prod(ops.kernel), dtype=torch.float64,
                        device=layer.base_weight().device)
    for w, d in parts:
        dense += w * ops.from_layer_layout(d.delta_weight(layer).detach()).double().flatten(1)
    left, s, right = torch.linalg.svd(dense, full_matrices=False)
    return left, s, right


def _factors(delta: nn.Module):
    """(B [out, r], A [r, in·k], s) when the delta's ΔW is exactly s·B·A (Delta.low_rank_factors), else None."""
    get = getattr(delta, "low_rank_factors", None)
    if get is not None:
        return get()
    if type(delta) is LoraDelta:
        return delta.lora_B.detach().flatten(1), delta.lora_A.detach().flatten(1), delta.scaling
    return None


def _numerical_rank(s: torch.Tensor, shape) -> int:
    if not s.numel() or s[0] == 0:
        return 0
    return int((s > s[0] * max(shape) * torch.finfo(torch.float32).eps).sum())


@torch.no_grad()
def combine(model: nn.Module, weights: Mapping[str, float], name: str, rank: Optional[int] = None) -> CombineReport:
    """Add adapter `name` (LoRA, inactive unless it is the only one) whose ΔW is the best rank-`rank`
    approximation of Σ weights[a]·ΔW_a on every layer any of them adapts. rank=None: exact (the
    numerical rank of the sum). Returns the relative error of the approximation."""
    weights = _check_weights(model, weights)
    _check_new_name(model, name)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer or None, got {rank!r}")
    for n in weights:
        if get_config(model, n).modules_to_save:
            raise ConfigError(f"adapter {n!r} has modules_to_save; combine mixes weight deltas only")
    layers = {p: m for p, m in adapted_layers(model) if any(n in m.deltas for n in weights)}
    factors = {p: _svd_of_sum(m, weights) for p, m in layers.items()}
    exact = max((_numerical_rank(s, (left.shape[0], right.shape[1])) for left, s, right in factors.values()), default=1)
    k = rank if rank is not None else max(exact, 1)
    pattern = "|".join(re.escape(p) for p in layers)
    first = get_config(model, next(iter(weights)))
    config = LoraConfig(r=k, lora_alpha=k, target_modules=f"(?:{pattern})", init_lora_weights=True,
                        base_model_name_or_path=first.base_model_name_or_path)
    add_adapter(model, config, name)
    errors, lost, total = {}, 0.0, 0.0
    for path, (left, s, right) in factors.items():
        keep = min(k, s.numel())
        root = s[:keep].sqrt()
        delta = layers[path].deltas[name]
        b = torch.zeros(delta.lora_B.shape[0], k, dtype=torch.float64, device=left.device)
        a = torch.zeros(k, right.shape[1], dtype=torch.float64, device=left.device)
        b[:, :keep] = left[:, :keep] * root
        a[:keep] = root[:, None] * right[:keep]
        delta.lora_B.copy_(b.view(delta.lora_B.shape))
        delta.lora_A.copy_(a.view(delta.lora_A.shape))
        tail, whole = float((s[keep:] ** 2).sum()), float((s ** 2).sum())
        errors[path] = math.sqrt(tail / whole) if whole > 0 else 0.0
        lost, total = lost + tail, total + whole
    return CombineReport(name, k, weights, math.sqrt(lost / total) if total > 0 else 0.0, errors)


# --- exact evaluation of a weighted sum, for the search ----------------------------------------------------
@contextlib.contextmanager
def weighted(model: nn.Module, weights: Mapping[str, float]) -> Iterator[nn.Module]:
    """Within the block every adapted layer computes with W + Σ w_a·ΔW_a (each delta's own forward, no
    refactoring); the model's active set is ignored. Adapters must be unmerged."""
    weights = _check_weights(model, weights)
    layers = [m for _, m in adapted_layers(model)]
    if any(m.merged for m in layers):
        raise MixedBatchError("weighted needs unmerged adapters: call lorakit.unmerge(model) first")
    if any(m.routing is not None for m in layers):
        raise MixedBatchError("another routing (per_row or weighted) is active on this model")

    def route(layer: AdaptedLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y0 = layer.base_layer(x, *args, **kwargs)
        if layer.disabled:
            return y0
        y = y0
        for n, w in weights.items():
            if n in layer.deltas and w != 0.0:
                y = y + w * (layer.deltas[n](x, y0, layer) - y0)  # w · (ΔW x), for any variant
        return y

    try:
        for m in layers:
            m.routing = route
        yield model
    finally:
        for m in layers:
            m.routing = None


# --- LoraHub: gradient-free search of the weights ------------------------------------------------------------
@dataclass
class SearchResult:
    weights: dict[str, float]
    loss: float
    """loss_fn at the best weights (without the L1 term)."""
    evaluations: int
    history: list[tuple[dict[str, float], float]] = field(default_factory=list)
    """(weights, loss) of every evaluation, in order."""


def lorahub_search(model: nn.Module, adapters: Sequence[str], loss_fn: Callable[[nn.Module], float], *,
                   max_evals: int = 40, l1: float = 0.05, bound: float = 1.5,
                   init: Optional[Sequence[float]] = None) -> SearchResult:
    """Weights for `adapters` minimising loss_fn(model) + l1·Σ|w| over [-bound, bound]^n (Nelder–Mead,
    at most max_evals evaluations, from `init` or zeros as LoraHub starts). Each evaluation runs
    loss_fn inside weighted(model, w), under torch.no_grad(). Use combine(...) to keep the result."""
    from scipy.optimize import minimize

    adapters = list(adapters)
    _check_weights(model, {a: 0.0 for a in adapters})
    if max_evals < len(adapters) + 1:
        raise ConfigError(f"max_evals must be at least the number of adapters + 1 ({len(adapters) + 1})")
    x0 = torch.zeros(len(adapters), dtype=torch.float64) if init is None else torch.tensor(init, dtype=torch.float64)
    if x0.shape != (len(adapters),):
        raise ConfigError(f"init needs {len(adapters)} weights, got {list(init)}")
    history: list[tuple[dict[str, float], float]] = []

    def objective(w) -> float:
        ws = {a: float(min(max(v, -bound), bound)) for a, v in zip(adapters, w)}
        with torch.no_grad(), weighted(model, ws):
            loss = float(loss_fn(model))
        history.append((ws, loss))
        return loss + l1 * sum(abs(v) for v in ws.values()) if math.isfinite(loss) else float("inf")

    step = bound / 3
    simplex = [x0.tolist()] + [(x0 + step * torch.eye(len(adapters), dtype=torch.float64)[i]).tolist()
                               for i in range(len(adapters))]
    minimize(objective, x0.numpy(), method="Nelder-Mead", bounds=[(-bound, bound)] * len(adapters),
             options={"maxfev": max_evals, "initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-5})
    best = min(history, key=lambda h: h[1] + l1 * sum(abs(v) for v in h[0].values()))
    return SearchResult(dict(best[0]), best[1], len(history), history)


def batches_loss(batches: Sequence[Mapping[str, torch.Tensor]]) -> Callable[[nn.Module], float]:
    """A loss_fn for HF models: the mean of model(**batch).loss over the batches (e.g. with labels)."""
    def loss_fn(model: nn.Module) -> float:
        return sum(float(model(**b).loss) for b in batches) / len(batches)
    return loss_fn


# --- `lorakit compose` ---------------------------------------------------------------------------------------
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
    import json
    from pathlib import Path

    from ..core.files import load_adapter, save_adapter

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
        from ..core.api import set_active

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
    from pathlib import Path

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
    from ..core.files import read_config

    base = read_config(next(iter(named.values()))).base_model_name_or_path
    if not base:
        raise ConfigError("the adapter does not name its base model: give --model")
    return base


def _load_base(path: str, device: str):
    from pathlib import Path

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
    import csv
    import json

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


__all__ = ["combine", "CombineReport", "weighted", "lorahub_search", "SearchResult", "batches_loss",
           "ComposeOptions", "compose"]
