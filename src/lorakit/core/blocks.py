"""Finding a model's repeated blocks (the decoder or encoder layers of a transformer).

FSDP shards each block on its own (`repeated_blocks`); activation checkpointing wraps the blocks transformers itself
would checkpoint (`checkpoint_units`), which for an encoder-decoder are both stacks' layers.
"""

from __future__ import annotations

from torch import nn


def repeated_blocks(model: nn.Module, *, no_split_classes: bool = False) -> list[nn.Module]:
    """The members of the longest nn.ModuleList whose entries all share one class (the first such list on a
    tie), in order; [] when the model has none.

    Args:
        model: any module tree.
        no_split_classes: FSDP's choice: first HF's `_no_split_modules` classes on `model` and, when any module
            is of one of them, all of those (in module order; for BERT that also names the embeddings, which
            FSDP then shards as a unit of their own); else the longest nn.ModuleList whatever its entries.

    Returns:
        The blocks, in `model.modules()` order.
    """
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if no_split_classes:
        names = set(getattr(model, "_no_split_modules", None) or [])
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        if blocks:
            return blocks
    else:
        lists = [m for m in lists if len({type(x) for x in m}) == 1]
    return list(max(lists, key=len)) if lists else []


def checkpoint_units(model: nn.Module) -> list[nn.Module]:
    """The blocks activation checkpointing wraps: the modules transformers checkpoints itself (subclasses of its
    GradientCheckpointingLayer: every encoder and decoder layer, both stacks of T5, BART or Whisper, a multimodal
    model's vision blocks), the outermost ones only; for a model without them, `repeated_blocks(model)`.

    Returns:
        The blocks, in `model.modules()` order.
    """
    units, inside = [], []
    for name, m in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue  # within a unit already taken: checkpointing it again would recompute twice
        if any(k.__name__ == "GradientCheckpointingLayer" and k.__module__.startswith("transformers")
               for k in type(m).__mro__):  # by name: transformers is not imported here
            units.append(m)
            inside.append(name + "." if name else "")  # the root itself: everything below it
    return units or repeated_blocks(model)
