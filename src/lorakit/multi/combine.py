"""Composition: exact weighted sums of adapters, refactored to a rank, and a LoraHub-style weight search.

    report = lorakit.combine(model, {"a": 0.7, "b": 0.3}, name="ab", rank=16)
    print(report.relative_error)      # ‖ΔW − ΔW_16‖_F / ‖ΔW‖_F over all layers (0 for rank=None)

combine computes ΔW = Σ w_i ΔW_i per layer exactly and writes its best rank-k approximation (truncated
SVD) as a new adapter of the registry's factored variant (LoRA: `core.registry.factored_variant`). When
every delta is a low-rank product (`Delta.low_rank_factors`) it never forms ΔW: ΔW = U·V with
U = [w_i s_i B_i] [out, R], V = [A_i] [R, in] (R = Σ r_i); QR of U and Vᵀ leaves an R×R core whose SVD gives
ΔW's singular triplets. Other deltas are materialised through `delta_weight` and decomposed densely. (PEFT's "linear"
combination concatenates scaled factors and is not the weighted sum of ΔW; see PEFT issue #3004.)

`weighted` evaluates W + Σ w_i ΔW_i exactly, with no refactoring (the LoraHub search in lorahub.py uses it).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

import torch
from torch import nn

from ..core.adapted import AdaptedLayer
from ..core.api import adapted_layers, add_adapter, check_new_name, get_config, require_adapters
from ..core.registry import factored_variant
from ..errors import ConfigError
from .routing import routed


@dataclass
class CombineReport:
    """What combine returns: the new adapter's name and rank, the weights, and the error of the rank-k refactoring."""

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


def check_weights(model: nn.Module, weights: Mapping[str, float]) -> dict[str, float]:
    """{adapter name: float weight} after checking every name is an adapter of `model` and every weight a
    finite number (AdapterNameError / ConfigError otherwise)."""
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"weights must be a non-empty {{adapter name: weight}} mapping, got {weights!r}")
    require_adapters(model, list(weights))
    out = {}
    for name, w in weights.items():
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"the weight of {name!r} must be a finite number, got {w!r}")
        out[name] = float(w)
    return out


# --- exact low-rank factors of Σ w_i ΔW_i --------------------------------------------------------------
def _svd_of_sum(layer: AdaptedLayer, weights: dict[str, float]):
    """(left [out, m], singular values [m], right [m, in·k]) of the layer's Σ w ΔW in canonical layout, fp64."""
    parts = [(w, layer.deltas[n]) for n, w in weights.items() if n in layer.deltas and w != 0.0]
    factors = [d.low_rank_factors() for _, d in parts]  # (B [out, r], A [r, in·k], s) or None
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


def _numerical_rank(s: torch.Tensor, shape) -> int:
    if not s.numel() or s[0] == 0:
        return 0
    return int((s > s[0] * max(shape) * torch.finfo(torch.float32).eps).sum())


@torch.no_grad()
def combine(model: nn.Module, weights: Mapping[str, float], name: str, rank: Optional[int] = None) -> CombineReport:
    """Add adapter `name` (of the factored variant, LoRA; inactive unless it is the only one) whose ΔW is the
    best rank-`rank` approximation of Σ weights[a]·ΔW_a on every layer any of them adapts. rank=None: exact
    (the numerical rank of the sum). Returns the relative error of the approximation."""
    weights = check_weights(model, weights)
    check_new_name(model, name)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer or None, got {rank!r}")
    for n in weights:
        if get_config(model, n).modules_to_save:
            raise ConfigError(f"adapter {n!r} has modules_to_save; combine mixes weight deltas only")
        if get_config(model, n).parameter_targets:
            raise ConfigError(f"adapter {n!r} adapts parameters (target_parameters): combine mixes the deltas of "
                              "modules only (PEFT's add_weighted_adapter refuses them too)")
    layers = {p: m for p, m in adapted_layers(model) if any(n in m.deltas for n in weights)}
    factors = {p: _svd_of_sum(m, weights) for p, m in layers.items()}
    exact = max((_numerical_rank(s, (left.shape[0], right.shape[1])) for left, s, right in factors.values()), default=1)
    k = rank if rank is not None else max(exact, 1)
    pattern = "|".join(re.escape(p) for p in layers)
    first = get_config(model, next(iter(weights)))
    config = factored_variant().factored_config(k, target_modules=f"(?:{pattern})",
                                                base_model_name_or_path=first.base_model_name_or_path)
    add_adapter(model, config, name)
    errors, lost, total = {}, 0.0, 0.0
    for path, (left, s, right) in factors.items():
        keep = min(k, s.numel())
        root = s[:keep].sqrt()
        delta = layers[path].deltas[name]
        scale = delta.low_rank_factors()[2]  # ΔW = scale·B·A: B takes 1/scale (1 for alpha = r)
        b = left[:, :keep] * root  # [out, keep]
        delta.set_low_rank_factors(b / scale if scale != 1.0 else b, root[:, None] * right[:keep])
        tail, whole = float((s[keep:] ** 2).sum()), float((s ** 2).sum())
        errors[path] = math.sqrt(tail / whole) if whole > 0 else 0.0
        lost, total = lost + tail, total + whole
    return CombineReport(name, k, weights, math.sqrt(lost / total) if total > 0 else 0.0, errors)


# --- exact evaluation of a weighted sum, for the search ----------------------------------------------------
@contextlib.contextmanager
def weighted(model: nn.Module, weights: Mapping[str, float]) -> Iterator[nn.Module]:
    """Within the block every adapted layer computes with W + Σ w_a·ΔW_a (each delta's own forward, no
    refactoring); the model's active set is ignored. Adapters must be unmerged."""
    weights = check_weights(model, weights)
    layers = [m for _, m in adapted_layers(model)]

    def route(layer: AdaptedLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y0 = layer.base_layer(x, *args, **kwargs)
        if layer.disabled:
            return y0
        y = y0
        for n, w in weights.items():
            if n in layer.deltas and w != 0.0:
                y = y + w * (layer.deltas[n](x, y0, layer) - y0)  # w · (ΔW x), for any variant
        return y

    with routed(layers, route, "weighted"):
        yield model


__all__ = ["combine", "CombineReport", "weighted"]
