"""The loop's optimizer: AdamW on the adapter, with LoRA+ parameter groups when asked.

LoRA+ (Hayou et al., 2024; PEFT's create_loraplus_optimizer) trains each low-rank delta's B factor with a
learning rate `ratio` times that of A. Which parameter is B is asked of the low-rank protocol
(Delta.linear_factors gives the live parameters; low_rank_factors a view of B's storage), never read from a
parameter name, so every low-rank variant gets it; a delta without factors trains at the base rate. As in
PEFT, deltas on embedding layers train at `embedding_lr` (PEFT's loraplus_lr_embedding, 1e-6).
"""

from __future__ import annotations

import torch

from ..core.api import adapted_layers
from ..errors import ConfigError

EMBEDDING_LR = 1e-6  # PEFT's default loraplus_lr_embedding


def factor_roles(model) -> tuple[set[int], set[int]]:
    """(ids of the B-factor parameters, ids of the parameters of deltas on embedding layers)."""
    b_ids: set[int] = set()
    embedding_ids: set[int] = set()
    for _, layer in adapted_layers(model):
        for delta in layer.deltas.values():
            params = [p for p in delta.parameters() if p.requires_grad]
            if layer.ops.kind == "embedding":
                embedding_ids.update(id(p) for p in params)
                continue
            live = delta.linear_factors()
            if live is not None:
                b_ids.add(id(live[1]))
                continue
            factors = delta.low_rank_factors()
            if factors is not None:  # B's storage: the parameter it is a view of
                ptr = factors[0].data_ptr()
                b_ids.update(id(p) for p in params if p.data_ptr() == ptr)
    return b_ids, embedding_ids


def param_groups(model, params: list[torch.nn.Parameter], lr: float, ratio: float,
                 embedding_lr: float = EMBEDDING_LR) -> list[dict]:
    """Optimizer groups: [base (A and everything else) at lr, B factors at lr·ratio, embedding deltas]; the
    base group comes first (the loop logs its rate). Empty groups are left out."""
    b_ids, embedding_ids = factor_roles(model)
    groups = {"base": [], "b": [], "embedding": []}
    for p in params:
        key = "embedding" if id(p) in embedding_ids else "b" if id(p) in b_ids else "base"
        groups[key].append(p)
    rates = {"base": lr, "b": lr * ratio, "embedding": embedding_lr}
    return [{"params": ps, "lr": rates[k]} for k, ps in groups.items() if ps or k == "base"]


def check_ratio(ratio: float) -> None:
    """ConfigError unless the LoRA+ ratio is >= 0 (0: off)."""
    if not ratio >= 0:
        raise ConfigError(f"--loraplus-lr-ratio must be >= 0 (0: off), got {ratio}")


def build_optimizer(model, params: list[torch.nn.Parameter], options) -> torch.optim.Optimizer:
    """AdamW on `params` (options.lr, options.weight_decay); LoRA+ groups when options.loraplus_lr_ratio > 0."""
    ratio = getattr(options, "loraplus_lr_ratio", 0.0)
    check_ratio(ratio)
    groups = param_groups(model, params, options.lr, ratio) if ratio > 0 else params
    return torch.optim.AdamW(groups, lr=options.lr, weight_decay=options.weight_decay)
