"""Per-layer stacks and plans of per_row (routing.py), cached across blocks.

A layer's stack holds (a copy of) every delta of the layer that answers `Delta.linear_factors`, i.e. whose
forward is y + s·(drop(x)·Aᵀ)·Bᵀ on a linear-like layer (Linear, Conv1D); stack.py has its layout. A plan
says, for one set of adapters, which stack slot each adapter's rows read, and which deltas run their own
forward on their rows instead (any other delta: another form, an embedding, a convolution). Both are rebuilt
when a delta is replaced or its factors are written in place (hot_swap calls `clear_stacks`); writes no version
counter or assignment shows (through `param.data`: `p.data = new` or `p.data.copy_(...)`, or an optimizer outside
torch.optim's step hooks) need a `clear_stacks()` call (core/delta.py's STATE_EPOCH says what is seen).
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..core.adapted import AdaptedLayer
from ..core.api import adapted_layers
from ..core.delta import STATE_EPOCH
from ..triton_gate import runs_on
from .stack import AdapterStack, build_stack


def _fast_kind(delta: nn.Module) -> bool:
    """The delta's forward is a low-rank product on a linear-like layer: the stacked fast path applies."""
    return delta.linear_factors() is not None


def _delta_key(delta: nn.Module) -> tuple:
    """Changes whenever the delta's factors are replaced or written in place (or its scale or dropout)."""
    a, b, s, p = delta.linear_factors()
    return a._version, b._version, id(a), id(b), a.data_ptr(), b.data_ptr(), s, p


def _factors_unchanged(delta: nn.Module, seen: tuple) -> bool:
    """The delta still answers the factors `seen` (a, b, s, p, _delta_key) with the same storage and versions.
    The full check of a stacked delta, run when STATE_EPOCH moved: identity tests first, no tuple built."""
    f = delta.linear_factors()
    if f is None:
        return False
    a, b, s, p = f
    key = seen[4]
    return (a is seen[0] and b is seen[1] and s == seen[2] and p == seen[3] and a._version == key[0]
            and b._version == key[1] and a.data_ptr() == key[4] and b.data_ptr() == key[5])


@dataclass
class StackEntry:
    """A layer's cached stack and what it was built from (to know when to rebuild it)."""

    keys: dict[str, tuple]  # name → (delta id, _delta_key) of each stacked delta, in slot order
    stack: AdapterStack
    for_kernels: bool  # built where Triton kernels may run (rank padded for them: stack.padded_rank)
    # Aliases of the stacked factors' storage, kept alive with the entry: after `param.data = new` the allocator
    # cannot hand the old address back to a later factor, which the keys' data_ptr would take for the same one.
    held: tuple = ()


@dataclass
class LayerPlan:
    """How one layer serves one set of adapters: gid → stack slot, and the deltas that take the generic path."""

    entry: Optional[StackEntry]
    checks: tuple  # (name, its delta here or None, (a, b, s, p, _delta_key) if stacked) per gid: what it assumed
    slot_of_gid: Optional[torch.Tensor]  # long [G+1]; index gid+1 (0: no adapter) → slot
    slot_map: Optional[torch.Tensor]  # int32 [G]; slot or -1 (for the kernels)
    fast: list[tuple[int, nn.Module]] = field(default_factory=list)  # (gid, low-rank delta) in the stack
    slow: list[tuple[int, nn.Module]] = field(default_factory=list)  # (gid, delta) run on their rows
    epoch: int = -1  # STATE_EPOCH when every check last passed
    aliases: tuple = ()  # a detached alias per stacked factor (A and B of each fast delta): it shares the factor's
    # version counter and reads ~5x faster than the factor itself at scale (~7,000 scattered parameters)
    versions: list = field(default_factory=list)  # per factor, when the plan was made or last checked
    names: tuple = field(init=False)  # the adapter names of `checks`, and their deltas (None where absent), for
    deltas: tuple = field(init=False)  # the identity check in one C-level pass

    def __post_init__(self):
        self.names = tuple(name for name, _, _ in self.checks)
        self.deltas = tuple(delta for _, delta, _ in self.checks)


_VERSION = operator.attrgetter("_version")  # a C-level getter: the per-block check reads ~7,000 factors at 1B scale

# layer → its stack of every low-rank adapter (a copy of their weights), and its plans per adapter set.
_STACKS: "weakref.WeakKeyDictionary[AdaptedLayer, StackEntry]" = weakref.WeakKeyDictionary()
_PLANS: "weakref.WeakKeyDictionary[AdaptedLayer, dict]" = weakref.WeakKeyDictionary()
# Bumped by clear_stacks (lorakit.hot_swap calls it): open per_row blocks re-plan their layers.
GENERATION = [0]


def _stackable(layer: AdaptedLayer) -> dict[str, nn.Module]:
    """The layer's low-rank deltas of the most common dtype/device (others take the generic path)."""
    fast = {n: d.linear_factors() for n, d in layer.deltas.items()}
    fast = {n: f for n, f in fast.items() if f is not None}
    if not fast:
        return {}
    kinds = [(a.dtype, a.device, b.dtype) for a, b, _, _ in fast.values()]
    common = max(set(kinds), key=kinds.count)
    return {n: layer.deltas[n] for n, k in zip(fast, kinds) if k == common}


def layer_stack(layer: AdaptedLayer) -> Optional[StackEntry]:
    """The stack of all the layer's low-rank adapters (no autograd: inference only), rebuilt if any of
    them changed; None if the layer has none."""
    deltas = _stackable(layer)
    if not deltas:
        return None
    keys = {n: (id(d), _delta_key(d)) for n, d in deltas.items()}
    entry = _STACKS.get(layer)
    if entry is None or entry.keys != keys or entry.for_kernels != _kernels_on(entry.stack):
        with torch.no_grad():
            stack = build_stack(list(deltas.values()))
        held = tuple(t.detach() for d in deltas.values() for t in d.linear_factors()[:2])
        entry = _STACKS[layer] = StackEntry(keys, stack, _kernels_on(stack), held)
    return entry


def _kernels_on(stack: AdapterStack) -> bool:
    """Whether the kernels may run where `stack` lives (LORAKIT_TRITON can change between per_row blocks)."""
    return runs_on(stack.a.device)


def plan_is_current(layer: AdaptedLayer, lp: LayerPlan) -> bool:
    """Cheap check of only what this plan uses: the same delta objects, and its stacked ones unchanged. While
    STATE_EPOCH stands still (nothing was assigned to a delta, nothing converted), unchanged means the same version
    of every stacked factor, read through its alias; otherwise each delta is asked for its factors again (their
    identity, storage and versions). The storage of a factor is not read per block: at 32 adapters × 112 layers
    the check with it cost 3.7–13.6 ms a block on the GPU hosts measured, the storage reads 3.0 of the 3.7 ms
    where they were timed apart (cache misses on 7,168 scattered parameters), and what changes storage without
    an assignment is a write through `param.data`, which needs `clear_stacks` (the module docstring)."""
    entry = lp.entry
    if entry is not None and (_STACKS.get(layer) is not entry or entry.for_kernels != _kernels_on(entry.stack)):
        return False
    if any(map(operator.is_not, map(layer.deltas._modules.get, lp.names), lp.deltas)):  # identity, never __eq__
        return False
    if lp.epoch == STATE_EPOCH[0]:
        return list(map(_VERSION, lp.aliases)) == lp.versions
    if not all(seen is None or _factors_unchanged(delta, seen) for _, delta, seen in lp.checks):
        return False
    lp.epoch = STATE_EPOCH[0]
    return True


def _plan_layer(layer: AdaptedLayer, adapters: tuple, device) -> LayerPlan:
    modules = layer.deltas._modules
    wanted = any(n in modules and _fast_kind(modules[n]) for n in adapters)
    entry = layer_stack(layer) if wanted else None
    stacked = entry.keys if entry is not None else {}
    checks = tuple((n, modules.get(n), (*modules[n].linear_factors(), stacked[n][1]) if n in stacked else None)
                   for n in adapters)
    slots = [list(entry.keys).index(n) if entry is not None and n in entry.keys else -1 for n in adapters]
    fast = [(g, modules[n]) for g, n in enumerate(adapters) if slots[g] >= 0]
    slow = [(g, modules[n]) for g, n in enumerate(adapters) if slots[g] < 0 and n in modules]
    epoch = STATE_EPOCH[0]
    if not fast:
        return LayerPlan(None, checks, None, None, [], slow, epoch)
    none_slot = entry.stack.none_slot
    slot_of_gid = torch.tensor([none_slot] + [s if s >= 0 else none_slot for s in slots], device=device)
    slot_map = torch.tensor(slots, dtype=torch.int32, device=device)
    aliases = tuple(t.detach() for _, _, seen in checks if seen is not None for t in seen[:2])
    return LayerPlan(entry, checks, slot_of_gid, slot_map, fast, slow, epoch, aliases, list(map(_VERSION, aliases)))


def layer_plan(layer: AdaptedLayer, adapters: tuple, device) -> LayerPlan:
    """The cached plan of this layer for these adapters (in gid order), re-made when it went stale."""
    plans = _PLANS.get(layer)
    if plans is None:
        plans = _PLANS[layer] = {}
    lp = plans.get((adapters, device))
    if lp is None or not plan_is_current(layer, lp):
        lp = plans[(adapters, device)] = _plan_layer(layer, adapters, device)
    return lp


# --- a block's plans, taken by the next block over the same adapters ---------------------------------------------
@dataclass
class BlockPlans:
    """The layer plans one per_row block used, offered to the next block over the same adapters, which checks each
    (plan_is_current) at its layer's first call instead of looking it up. Only weak references: a plan lives in
    _PLANS while its layer does, so nothing here keeps a layer, a delta, a factor or a stack alive."""

    plans: tuple  # (weakref to the layer, weakref to its LayerPlan) per layer the block used
    epoch: int  # STATE_EPOCH then


# the model's first adapted layer → adapters → BlockPlans
_BLOCKS: "weakref.WeakKeyDictionary[AdaptedLayer, dict]" = weakref.WeakKeyDictionary()


def remember_block(anchor: AdaptedLayer, adapters: tuple, used: dict) -> None:
    """Keep the plans a block used (used: id(layer) → (layer, LayerPlan)) for the next block over `adapters` on
    the model whose first adapted layer is `anchor`, when each was checked against the current STATE_EPOCH."""
    if not used or any(lp.epoch != STATE_EPOCH[0] for _, lp in used.values()):
        return
    blocks = _BLOCKS.setdefault(anchor, {})
    if len(blocks) >= 64:
        blocks.clear()
    refs = tuple((weakref.ref(layer), weakref.ref(lp)) for layer, lp in used.values())
    blocks[adapters] = BlockPlans(refs, STATE_EPOCH[0])


def recall_block(anchor: AdaptedLayer, adapters: tuple) -> dict:
    """The plans (id(layer) → (layer, LayerPlan)) the last block over `adapters` used, unchecked: the caller
    checks each with plan_is_current before its layer uses it: at each layer's first call the check overlaps
    the device's work on the layers before it, where checking them all here kept the device idle for it.
    {} when a delta was assigned to or converted since (STATE_EPOCH moved) or a layer or plan is gone."""
    blocks = _BLOCKS.get(anchor)
    block = blocks.get(adapters) if blocks is not None else None
    if block is None:
        return {}
    plans = {}
    if block.epoch == STATE_EPOCH[0]:
        for layer_ref, plan_ref in block.plans:
            layer, lp = layer_ref(), plan_ref()
            if layer is None or lp is None:
                break
            plans[id(layer)] = (layer, lp)
        else:
            return plans
    del blocks[adapters]
    return {}


def clear_stacks(model: Optional[nn.Module] = None) -> None:
    """Free the cached per-layer stacks and plans (of one model, or all). Stacks copy the adapters' weights."""
    layers = list(_STACKS) + list(_PLANS) if model is None else [m for _, m in adapted_layers(model)]
    for layer in layers:
        _STACKS.pop(layer, None)
        _PLANS.pop(layer, None)
        _BLOCKS.pop(layer, None)
    if model is None:
        _BLOCKS.clear()
    GENERATION[0] += 1
