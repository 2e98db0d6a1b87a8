"""Mixed-adapter batches: each row of a batch uses its own adapter, or none.

    with lorakit.per_row(model, ["a", "b", None, "a"]):
        logits = model(input_ids).logits                 # rows 0 and 3 use "a", row 1 "b", row 2 the base
        out = model.generate(input_ids, num_beams=4)      # each row's adapter repeats for its beams

`per_row` fills every AdaptedLayer's `routing` slot (and the forward of every modules_to_save holder) for
the block and restores them afterwards, also on errors. A row behaves exactly as the model would with
`set_active(model, name)` (None: the base model). The model is called with one row per name (a call with
another batch size is refused), except inside its `generate`, which repeats each row k times for beams /
returned sequences. Dimension 0 of every adapted layer's input is the batch, or a multiple k of it (generate's
copies; a layer fed flattened [B·T, in] tokens works the same way), so row i's name covers rows i·k .. i·k+k-1.

Per layer, the low-rank deltas (those answering `Delta.linear_factors`: y + s·(drop(x)·Aᵀ)·Bᵀ on a linear)
run together from a per-layer stack of all of them (stack.py, cached in layer_plans.py): Triton SGMV/BGMV
kernels on CUDA at inference, a vectorised gather + bmm elsewhere (and whenever gradients are needed, so
one optimizer step trains each adapter from its own rows only). Any other delta (another form, an
embedding or a convolution) runs its own forward on its rows.
`impl="reference"` is the slow oracle the tests hold the fast paths to: each adapter's reference math on
the whole batch, rows picked with torch.where (bit-identical to running set_active per adapter).
Inference forwards of a fixed shape repeat without this module's host work through lorakit.PerRowGraphs
(graphs.py: each call signature captured once as a CUDA graph, then replayed).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from . import kernels
from ..core.adapted import AdaptedLayer
from ..core.api import require_adapters
from ..core.config import shown
from ..core.patching import is_patched, patch_forward, unpatch_forward
from ..core.saved import SavedModule
from ..errors import MixedBatchError
from .. import triton_gate
from .kernels import AdapterStack, build_stack
from .layer_plans import (GENERATION, LayerPlan, clear_stacks, layer_plan, plan_is_current, recall_block,
                          remember_block)
from .rows import RowPlan, row_plan

IMPLS = ("auto", "torch", "reference")


# --- the routing function ------------------------------------------------------------------------------
class Router:
    """The callable put into each AdaptedLayer.routing slot: (layer, x, *args, **kwargs) → y."""

    def __init__(self, plan: RowPlan, impl: str = "auto", block_m: Optional[int] = None,
                 anchor: Optional[AdaptedLayer] = None):
        self.plan = plan
        self.impl = impl
        self.block_m = block_m
        self.anchor = anchor  # the model's first adapted layer: its last block's plans are recalled by it
        self._generation = GENERATION[0]
        # the last block's plans (id(layer) → (layer, LayerPlan)), each checked at its layer's first call
        self._recalled = recall_block(anchor, plan.key) if anchor is not None else {}
        self.used: dict[int, tuple[AdaptedLayer, LayerPlan]] = {}  # the plans this block used, by layer
        self._layers: dict[int, LayerPlan] = {}  # id(layer) → its plan in this block
        self._planned = False  # a layer was planned in this block (not recalled): remember the block
        self._work: dict = {}  # (input shape, device) → what the kernels need for it (Router._work_for)
        # Triton SGMV/BGMV where the gate allows; the environment is read once per block, not per layer call
        self.use_kernels = impl == "auto" and triton_gate.enabled()

    def __call__(self, layer: AdaptedLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if layer.merged:
            raise MixedBatchError(f"adapters {layer.merged} were merged inside a per_row block; unmerge them first")
        y = layer.base_output(x, *args, **kwargs)
        if layer.disabled:
            return y
        if self.impl == "reference":
            return self._reference(layer, x, y)
        if self.plan.uniform is not None:  # one adapter (or none) for the whole batch: its own math
            name = self.plan.adapters[self.plan.uniform] if self.plan.uniform >= 0 else None
            return layer.deltas[name](x, y, layer) if name in layer.deltas else y
        if self._generation != GENERATION[0]:
            self._layers, self.used, self._recalled, self._generation = {}, {}, {}, GENERATION[0]
        lp = self._layers.get(id(layer))
        if lp is None:
            lp = self._layers[id(layer)] = self._layer_plan(layer, x.device)
        if lp.fast:
            y = self._fast(layer, lp, x, y)
        for gid, delta in lp.slow:
            rows = self.plan.rows(x.shape[0], x.device)[gid]
            y = y.index_copy(0, rows, delta(x.index_select(0, rows), y.index_select(0, rows), layer))
        return y

    def _layer_plan(self, layer: AdaptedLayer, device) -> LayerPlan:
        """The layer's plan for this block, at its first call: the last block's if it still holds (checked here,
        while the device runs the layers before this one), else the cached or a new one (layer_plan)."""
        held = self._recalled.get(id(layer))
        if held is not None and held[0] is layer and plan_is_current(layer, held[1]):
            lp = held[1]
        else:
            lp, self._planned = layer_plan(layer, self.plan.key, device), True
        self.used[id(layer)] = (layer, lp)
        return lp

    def remember(self) -> None:
        """After a block that ended normally: keep its plans for the next block over the same adapters (when
        every plan came from the last block, what is remembered already says so)."""
        if self.anchor is not None and self._planned and self._generation == GENERATION[0]:
            remember_block(self.anchor, self.plan.key, self.used)

    def _fast(self, layer: AdaptedLayer, lp: LayerPlan, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n_rows = x.shape[0]
        grad = torch.is_grad_enabled()
        live = [d.linear_factors() for _, d in lp.fast] if layer.training or grad else ()
        needs_grad = grad and (x.requires_grad or y.requires_grad or any(a.requires_grad or b.requires_grad
                                                                         for a, b, _, _ in live))
        if needs_grad or layer.training and any(p > 0 for _, _, _, p in live):
            # a differentiable stack of the batch's adapters only: the others get no gradient at all (dropout in
            # training mode builds one too: the cached stacks serve inference, their p is not re-checked)
            stack = build_stack([d for _, d in lp.fast])
            local = torch.full((len(self.plan.adapters) + 1,), len(lp.fast), dtype=torch.long)
            for slot, (gid, _) in enumerate(lp.fast):
                local[gid + 1] = slot
            slot = local.to(x.device)[self.plan.gids(n_rows, x.device) + 1]
            return kernels.lora_rows(x, y, stack, slot, dropout=layer.training and stack.max_p > 0)
        stack = lp.entry.stack
        if self.use_kernels and (x.is_cuda or triton_gate.INTERPRET):
            return self._kernel(lp, stack, x, y)
        slot = lp.slot_of_gid[self.plan.gids(n_rows, x.device) + 1]
        return kernels.lora_rows(x, y, stack, slot, dropout=False)

    def _kernel(self, lp: LayerPlan, stack: AdapterStack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()  # [..., in]: flattened, row i's tokens are N/n_rows consecutive token rows
        y = y.contiguous()
        work = self._work.get((x.shape, x.device))
        if work is None:
            work = self._work[(x.shape, x.device)] = self._work_for(x)
        n_tokens, block_m, rows = work
        if block_m == 0:
            kernels.bgmv(x.view(n_tokens, -1), y.view(n_tokens, -1), stack, lp.slot_map, rows)
        else:  # the kernel reads contiguous token rows of any rank: no flattening views (host time, small batches)
            kernels.sgmv(x, y, stack, lp.slot_map, rows, block_m)
        return y

    def _work_for(self, x: torch.Tensor) -> tuple:
        """(tokens, SGMV tile rows or 0 for BGMV, the SGMV tiles or BGMV's token gids) for inputs of x's shape."""
        n_rows = x.shape[0]
        n_tokens = x.numel() // x.shape[-1]
        tokens = n_tokens // n_rows
        if tokens == 1:
            return n_tokens, 0, self.plan.token_gids(n_rows, x.device)
        block_m = self.block_m or kernels.sgmv_block_m(tokens, n_tokens)
        return n_tokens, block_m, self.plan.tiles(n_rows, tokens, block_m, x.device)

    def _reference(self, layer: AdaptedLayer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each adapter's own forward on the whole batch; each row keeps its adapter's result."""
        gids = self.plan.gids(x.shape[0], x.device)
        out = y
        for gid, name in enumerate(self.plan.adapters):
            if name in layer.deltas:
                mine = (gids == gid).view(-1, *([1] * (y.dim() - 1)))
                out = torch.where(mine, layer.deltas[name](x, y, layer), out)
        return out


def _saved_forward(plan: RowPlan, impl: str, holder: nn.Module, x: torch.Tensor, *args, **kwargs):
    """modules_to_save per row: each row runs its adapter's copy (or the original) on its rows
    (impl "reference": every module on the whole batch, rows picked afterwards)."""
    groups: dict[int, list[int]] = {}
    for gid, name in enumerate(plan.adapters):
        use_copy = not holder.disabled and name in holder.copies
        groups.setdefault(id(holder.copies[name]) if use_copy else 0, []).append(gid)
    modules = {id(m): m for m in holder.copies.values()} | {0: holder.original_module}
    groups.setdefault(0, []).append(-1)
    if impl == "reference":
        gids = plan.gids(x.shape[0], x.device)
        out = None
        for module_id, members in groups.items():
            y = modules[module_id](x, *args, **kwargs)
            mine = torch.isin(gids, torch.tensor(members, device=gids.device)).view(-1, *([1] * (y.dim() - 1)))
            out = y if out is None else torch.where(mine, y, out)
        return out
    by_gid = plan.rows(x.shape[0], x.device)
    parts, order = [], []
    for module_id, gids in groups.items():
        rows = [by_gid[g] for g in gids if g in by_gid]
        if not rows:
            continue
        rows = torch.cat(rows)
        pick = functools.partial(_take_rows, rows=rows, n=x.shape[0])
        picked_kwargs = {k: pick(v) for k, v in kwargs.items()}
        parts.append(modules[module_id](x.index_select(0, rows), *map(pick, args), **picked_kwargs))
        order.append(rows)
    if not all(isinstance(p, torch.Tensor) for p in parts):
        raise MixedBatchError(f"per_row: a modules_to_save module ({type(holder.original_module).__name__}) must "
                              "return a tensor to be split by rows")
    inverse = torch.empty_like(torch.cat(order))
    inverse[torch.cat(order)] = torch.arange(inverse.numel(), device=inverse.device)
    return torch.cat(parts).index_select(0, inverse)


def _take_rows(value, rows: torch.Tensor, n: int):
    """A tensor argument with the batch in dimension 0 is cut to the rows; anything else passes as is."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
        return value.index_select(0, rows)
    return value


# --- the context manager -------------------------------------------------------------------------------
def _wrappers(model: nn.Module) -> tuple[list[AdaptedLayer], list[SavedModule]]:
    """Adapted layers and modules_to_save holders, without walking into them (they hold every delta)."""
    layers, holders, todo = [], [], [model]
    while todo:
        module = todo.pop()
        if isinstance(module, AdaptedLayer):
            layers.append(module)
        elif isinstance(module, SavedModule):
            holders.append(module)
        else:
            todo.extend(module._modules.values())
    return layers, holders


def check_names(model: nn.Module, names) -> list[Optional[str]]:
    """`names` as a list of adapter names or None, one per row; MixedBatchError / AdapterNameError otherwise."""
    if isinstance(names, str):
        names = [names]  # one name: a batch of one row
    if not isinstance(names, Sequence) or not len(names):
        raise MixedBatchError(f"per_row needs a non-empty list with one adapter name (or None) per row, got "
                              f"{shown(names)}")
    for n in names:
        if n is not None and not isinstance(n, str):
            raise MixedBatchError(f"per_row names are adapter names or None, got {shown(n)}")
    require_adapters(model, [n for n in names if n is not None])
    return list(names)


ROUTING_SLOT = "routing"  # the core.patching slot of the modules_to_save forward patch


@contextlib.contextmanager
def routed(layers: Sequence[AdaptedLayer], route: Callable, who: str, holders: Sequence[SavedModule] = (),
           saved_forward: Optional[Callable] = None) -> Iterator[None]:
    """The one routing context of per_row and weighted: every layer's `routing` slot holds `route` for the
    block (and each holder's forward is patched with saved_forward(holder, original, x, ...)); all are
    restored on exit, also on errors.

    Args:
        layers: the adapted layers to route; route(layer, x, *args, **kwargs) → y replaces their forward.
        who: the caller's name, for the error messages.
        holders, saved_forward: modules_to_save holders and their per-row forward (None: left alone).
    Raises MixedBatchError if adapters are merged or another routing is active (blocks do not nest)."""
    weight_side = [m for m in layers if not m.ops.output_side]
    if weight_side:
        raise MixedBatchError(f"{who} cannot route rows through adapters of parameters (target_parameters): their "
                              "update is to the weight, shared by every row of the batch (PEFT refuses it too)")
    merged = sorted({n for m in layers for n in m.merged})
    if merged:
        raise MixedBatchError(f"{who} needs unmerged adapters, but {merged} are merged: call lorakit.unmerge(model)")
    if any(m.routing is not None for m in layers) or any(is_patched(h, ROUTING_SLOT) for h in holders):
        raise MixedBatchError("another routing is active on this model (a nested per_row or weighted block)")
    patched: list[SavedModule] = []
    try:
        for m in layers:  # a plain instance attribute: set in __dict__ (nn.Module.__setattr__ walks its parameter,
            # buffer and module dicts first, ~2 µs a layer, paid twice per block on every adapted layer)
            m.__dict__["routing"] = route
        if saved_forward is not None:
            for h in holders:
                patch_forward(h, saved_forward, slot=ROUTING_SLOT)
                patched.append(h)
        yield
    finally:
        for m in layers:
            m.__dict__["routing"] = None
        for h in reversed(patched):
            unpatch_forward(h, ROUTING_SLOT)


@contextlib.contextmanager
def per_row(model: nn.Module, names: Sequence[Optional[str]], impl: str = "auto",
            block_m: Optional[int] = None) -> Iterator[nn.Module]:
    """Within the block, row i of every batch uses adapter names[i] (None: the base model).

    impl: "auto" (Triton kernels on CUDA at inference, else vectorised torch), "torch" (always the
    vectorised torch path), "reference" (slow, exact per-adapter math; for tests). block_m: SGMV tile rows.
    The stacked copies of the adapters are kept between blocks and follow in-place writes to the factors and
    assignments to the deltas; after a write through `param.data`, call `lorakit.multi.routing.clear_stacks(model)`.
    Raises MixedBatchError if adapters are merged (lorakit.unmerge first) or another routing is active."""
    if impl not in IMPLS:
        raise MixedBatchError(f"impl must be one of {IMPLS}, got {impl!r}")
    names = check_names(model, names)
    with rows_block(model, row_plan(names), impl, block_m):
        yield model


@contextlib.contextmanager
def rows_block(model: nn.Module, plan: RowPlan, impl: str = "auto", block_m: Optional[int] = None) -> Iterator[Router]:
    """per_row's block for a checked RowPlan (graphs.py passes one whose device tensors are static buffers).
    Yields the Router, whose `used` plans say what the block's forwards read."""
    layers, holders = _wrappers(model)

    def saved(holder: SavedModule, original: Callable, x: torch.Tensor, *args, **kwargs):
        return _saved_forward(plan, impl, holder, x, *args, **kwargs)  # the holder's own forward is not used

    recall = layers and impl != "reference" and plan.uniform is None
    router = Router(plan, impl, block_m, layers[0] if recall else None)
    with routed(layers, router, "per_row", holders, saved), _rows_checked(model, len(plan.names)):
        yield router
    router.remember()


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _model_rows(args: tuple, kwargs: dict) -> Optional[int]:
    """The batch size of a model call: dimension 0 of its first tensor argument, or of input_ids / inputs_embeds."""
    for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    return None


@contextlib.contextmanager
def _rows_checked(model: nn.Module, n_names: int) -> Iterator[None]:
    """Each call of the model must have exactly one row per name: MixedBatchError before anything runs otherwise.
    Only HF `generate` repeats each row for its beams / returned sequences (layers then see a multiple of the
    batch): while the model's generate runs, the rows are left to the layers' own check (RowPlan.expanded)."""
    generating = [False]

    def check(module, args, kwargs):
        rows = None if generating[0] else _model_rows(args, kwargs)
        if rows is not None and rows != n_names:
            raise MixedBatchError(f"per_row has names for {_rows(n_names)} but the model was called with "
                                  f"{_rows(rows)}: give one adapter name (or None) per row")

    hook = model.register_forward_pre_hook(check, with_kwargs=True)
    generate = getattr(model, "generate", None)
    prior = model.__dict__.get("generate")
    if callable(generate):
        @functools.wraps(generate)
        def expanding_generate(*args, **kwargs):
            generating[0] = True
            try:
                return generate(*args, **kwargs)
            finally:
                generating[0] = False
        model.__dict__["generate"] = expanding_generate  # this instance only, for the block
    try:
        yield
    finally:
        hook.remove()
        if callable(generate):
            model.__dict__.pop("generate", None)
            if prior is not None:
                model.__dict__["generate"] = prior


__all__ = ["per_row", "rows_block", "routed", "MixedBatchError", "clear_stacks", "RowPlan", "Router"]
