"""LoraHub: find the weights of an adapter combination on a few labelled examples, without gradients.

Nelder–Mead, as LoraHub searches with a gradient-free optimiser and an L1 penalty; each candidate is evaluated
exactly in a `weighted` block (W + Σ w_i ΔW_i, no refactoring). Keep the result with `combine`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..core.api import adapter_names
from ..errors import ConfigError
from .combine import check_weights, weighted


@dataclass
class SearchResult:
    """What lorahub_search returns: the best weights, their loss, and every evaluation made."""

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

    adapters = list(adapter_names(adapters))
    check_weights(model, {a: 0.0 for a in adapters})
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


__all__ = ["lorahub_search", "SearchResult", "batches_loss"]
