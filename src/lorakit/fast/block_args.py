"""A checkpointed block's call, sorted for its autograd node (checkpoint.py): which arguments need gradients, the
KV caches it must run without, and the tensors among its output.

A top-level tensor argument other than the hidden state that needs a gradient (T5's position bias from block 1 on,
a decoder's encoder output) becomes an input of the block's node: its slot in the call (a position after the hidden
state, or a keyword) is found here, and the call is rebuilt with the recompute's leaves in those slots. One nested in
a tuple, list or dict, or one sharing the hidden state's memory, is left to torch's checkpoint.
"""

from __future__ import annotations

from typing import Optional

import torch


def grad_slots(hidden: torch.Tensor, rest: tuple, named: dict) -> Optional[list]:
    """Where the call's other tensors that need gradients sit.

    Args:
        hidden: the block's hidden state.
        rest: the positional arguments after it.
        named: the keyword arguments (the hidden state's own removed).

    Returns:
        The slots, in call order: an int for a position in `rest`, a str for a keyword; None when such a tensor sits
        inside a tuple, list or dict, or shares the hidden state's memory (the same tensor, or a view of it).
    """
    slots = []
    for slot, v in (*enumerate(rest), *named.items()):
        if isinstance(v, torch.Tensor):
            if not v.requires_grad:
                continue
            if _shares_memory(v, hidden):  # two leaves of one memory would not see each other's writes
                return None
            slots.append(slot)
        elif needs_grad((v,)):
            return None
    return slots


def with_args(rest: tuple, named: dict, slots: list, values) -> tuple:
    """(rest, named) with the arguments at `slots` replaced, in order, by `values` (copies; the inputs stay)."""
    rest, named = list(rest), dict(named)
    for slot, v in zip(slots, values):
        if isinstance(slot, int):
            rest[slot] = v
        else:
            named[slot] = v
    return tuple(rest), named


def at_slots(rest: tuple, named: dict, slots: list) -> list:
    """The arguments at `slots`, in order."""
    return [rest[s] if isinstance(s, int) else named[s] for s in slots]


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a is b or a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no plain storage (sparse, a wrapper subclass): assume shared
        return True


def needs_grad(values) -> bool:
    """Whether a tensor among `values` (or inside a tuple, list or dict among them) needs a gradient."""
    for v in values:
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, (tuple, list)):
            if needs_grad(v):
                return True
        elif isinstance(v, torch.Tensor) and v.requires_grad:
            return True
    return False


def without_caches(args: tuple, kwargs: dict) -> tuple:
    """(args, kwargs, whether the block reads a cache). A KV cache would see the block twice (forward and recompute)
    and serve the recompute stale, gradient-less keys: training blocks run without one, as HF's own checkpointing
    does. One that already holds keys (a prefix the block attends to) is read, not only written: that block must
    run unchecked."""
    caches = [v for v in (*args, *kwargs.values()) if _is_cache(v)]
    if any(_holds_keys(c) for c in caches):
        return args, kwargs, True
    if caches:  # GPT-2, Bloom and others pass it positionally
        args = tuple(None if _is_cache(a) else a for a in args)
    for name in ("past_key_values", "layer_past", "past_key_value"):
        if kwargs.get(name) is not None:
            kwargs[name] = None
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs, False


def _is_cache(value) -> bool:
    """A transformers Cache (by its base class's name: transformers is not imported here)."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers") for c in type(value).__mro__)


def _holds_keys(cache) -> bool:
    try:
        return cache.get_seq_length() > 0
    except Exception:  # a cache kind without the method: assume it holds some
        return True


def tensors_of(out) -> Optional[tuple]:
    """The tensors a block's output hands out: the output itself, or a tuple's or list's top-level tensors when it
    starts with one; None for another form."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return tuple(v for v in out if isinstance(v, torch.Tensor))
    return None


def with_tensors(out, outs: tuple):
    """`out` with its top-level tensors replaced, in order, by `outs` (the node's)."""
    if isinstance(out, torch.Tensor):
        return outs[0]
    handed = iter(outs)
    items = [next(handed) if isinstance(v, torch.Tensor) else v for v in out]
    return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)  # a namedtuple takes fields
