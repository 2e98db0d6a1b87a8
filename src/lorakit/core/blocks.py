"""Finding a model's repeated blocks (the decoder or encoder layers of a transformer).

Activation checkpointing wraps each block; FSDP shards each block on its own. Both ask `repeated_blocks`.
"""

from __future__ import annotations

from torch import nn


def repeated_blocks(model: nn.Module, *, no_split_classes: bool = False) -> list[nn.Module]:
    """The members of the longest nn.ModuleList whose entries all share one class (the first such list on a
    tie), in order; [] when the model has none.

    Args:
        model: any module tree.
        no_split_classes: first look for HF's `_no_split_modules` classes on `model` and, when any module is
            of one of them, return all of those instead (in module order). That set can be larger than the
            layer list: for BERT it also names the embeddings, which FSDP then shards as a unit of its own.

    Returns:
        The blocks, in `model.modules()` order.
    """
    if no_split_classes:
        names = set(getattr(model, "_no_split_modules", None) or [])
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        if blocks:
            return blocks
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(x) for x in m}) == 1:
            best = list(m)
    return best
