"""The adapters a server holds: each in a fixed slot of per-layer stacks, loaded and unloaded at run time.

Every adapted layer keeps one stack of capacity `max_loras` (multi/stack.py's layout):
    a     [max_loras+1, R, in]   A of the adapter in each slot, rank zero-padded to R (`max_lora_rank`)
    bt    [max_loras+1, R, out]  B transposed
    scale [max_loras+1]          fp32
The last slot is all zeros (rows of the base model). Loading an adapter writes its factors into a free slot
in place: no tensor is reallocated, so a captured decode graph (cache.py) stays valid. Only an adapter that
adapts a layer no loaded adapter adapts, or whose rank exceeds R, rebuilds the stacks (`generation` changes
and the engine captures its graphs again).

Each row of a batch names a slot (`RowSlots`); `StackRouter`, put in every adapted layer's routing slot
through multi/routing.routed, adds each row's s·(x·Aᵀ)·Bᵀ from its slot: the Triton BGMV kernel for one token
per row on CUDA, the vectorised gather + bmm (multi/torch_lora) elsewhere. Adapters are read through the
low-rank protocol (`Delta.linear_factors`) only; one without that form on some layer is refused.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from ..core.adapted import AdaptedLayer
from ..core.api import adapted_layers, delete_adapter, get_config, list_adapters, saved_modules
from ..core.files import load_adapter
from ..errors import ServeError
from ..multi import kernels
from ..multi.routing import routed
from ..multi.stack import AdapterStack, padded_rank
from ..train.layout import adapter_dir
from .. import triton_gate


class RowSlots:
    """The adapter slot of each row of the batch being run: `index` long [B] (the zero slot for base rows), and
    `gid` int32 [B] (-1 for base rows, for the kernel). `active` is False when no row uses an adapter. A prefill
    also sets `tiles` (int32 [T, 3], SGMV's work list for rows of `tokens` tokens, tiles of `block_m`)."""

    def __init__(self):
        self.index: Optional[torch.Tensor] = None
        self.gid: Optional[torch.Tensor] = None
        self.active = False
        self.tiles: Optional[torch.Tensor] = None
        self.tokens = 1
        self.block_m = 16


class StackRouter:
    """The routing function of every adapted layer while the server runs: base output plus each row's adapter."""

    def __init__(self, stacks: dict[int, AdapterStack], rows: RowSlots):
        self.stacks = stacks  # id(layer) → its stack
        self.rows = rows
        self.slot_map: dict[torch.device, torch.Tensor] = {}
        self.use_kernels = triton_gate.enabled()

    def __call__(self, layer: AdaptedLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = layer.base_layer(x, *args, **kwargs)
        stack = self.stacks.get(id(layer))
        if stack is None or not self.rows.active:
            return y
        rows = self.rows
        if self.use_kernels and (x.is_cuda or triton_gate.INTERPRET):  # the interpreter: kernel tests on CPU
            x = x.contiguous()  # [B, tokens, in], or the tokens flattened: counted against the batch's rows
            y = y.contiguous()
            n_tokens, n_rows = x.numel() // x.shape[-1], rows.gid.shape[0]
            if n_tokens == n_rows:  # decode: one token per row
                kernels.bgmv(x.view(n_tokens, -1), y.view(n_tokens, -1), stack, self._slot_map(stack), rows.gid)
                return y
            if rows.tiles is not None and n_tokens == n_rows * rows.tokens:  # prefill
                kernels.sgmv(x, y, stack, self._slot_map(stack), rows.tiles, rows.block_m)
                return y
        return kernels.lora_rows(x, y, stack, rows.index)

    def _slot_map(self, stack: AdapterStack) -> torch.Tensor:
        """int32 [S]: gid → slot (the identity: a row's gid is its slot)."""
        device = stack.a.device
        if device not in self.slot_map:
            self.slot_map[device] = torch.arange(stack.a.shape[0] - 1, dtype=torch.int32, device=device)
        return self.slot_map[device]


class AdapterTable:
    """Name → slot for the served adapters, the per-layer stacks, and the routing context that uses them.

    Only the engine's thread calls load / unload / release (between steps); `slot_of` may be read anywhere."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int):
        if max_loras < 1 or max_rank < 1:
            raise ServeError(f"--max-loras and --max-lora-rank must be ≥ 1 (got {max_loras}, {max_rank})")
        self.model = model
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.slots: dict[str, int] = {}  # served name → slot
        self.users: dict[int, int] = {}  # slot → rows using it
        self.leaving: dict[int, str] = {}  # slot → name of an unloaded adapter whose rows still run
        self.rows = RowSlots()
        self.stacks: dict[int, AdapterStack] = {}
        self.generation = 0  # bumped whenever the stacks are reallocated (graphs must be captured again)
        self._routing = contextlib.ExitStack()
        self._rank = 0

    @property
    def none_slot(self) -> int:
        """The all-zero slot: base-model rows."""
        return self.max_loras

    def slot_of(self, name: str) -> Optional[int]:
        """The slot of a served adapter name, None if there is none."""
        return self.slots.get(name)

    # --- loading ---------------------------------------------------------------------------------------------
    def load(self, name: str, directory: str) -> None:
        """Load adapter `name` from `directory` into a free slot. Raises a LorakitError (nothing changed) when the
        name is taken, the directory is not an adapter that fits the model, or it cannot be stacked."""
        if name in self.slots or name in self.leaving.values():
            raise ServeError(f"an adapter named {name!r} is already loaded")
        free = [s for s in range(self.max_loras) if s not in self.slots.values() and s not in self.leaving]
        if not free:
            raise ServeError(f"all {self.max_loras} adapter slots are in use (--max-loras); unload one first")
        layers_before = {id(layer) for _, layer in adapted_layers(self.model)}
        load_adapter(self.model, adapter_dir(directory), name=name)
        try:
            rank = self._check_stackable(name)
        except ServeError:
            delete_adapter(self.model, name)
            raise
        layers_now = {id(layer) for _, layer in adapted_layers(self.model)}
        self.slots[name] = free[0]
        try:
            if layers_now != layers_before or rank > self._rank or not self.stacks:
                self._rebuild(max(rank, self._rank))
            else:
                self._write_slot(free[0], name)
        except BaseException:  # out of memory for the new stacks, ...: the table and model as they were
            del self.slots[name]
            self._zero_slot(free[0])
            delete_adapter(self.model, name)
            raise

    def _check_stackable(self, name: str) -> int:
        """The adapter's largest rank; ServeError where it has no low-rank linear form or touches the base."""
        config = get_config(self.model, name)
        if config.bias_mode != "none":
            raise ServeError(f"adapter {name!r} trains base biases (bias={config.bias_mode!r}); a server shares one "
                             "base among all requests, so it serves only adapters with bias 'none'")
        if any(name in holder.copies for _, holder in saved_modules(self.model)):
            raise ServeError(f"adapter {name!r} has modules_to_save (whole module copies); lorakit serve serves "
                             "low-rank adapters only")
        rank = 0
        for path, layer in adapted_layers(self.model):
            if name not in layer.deltas:
                continue
            factors = layer.deltas[name].linear_factors()
            if factors is None:
                raise ServeError(f"adapter {name!r} at {path}: {type(layer.deltas[name]).__name__} has no low-rank "
                                 "linear form (y + s·x·Aᵀ·Bᵀ); lorakit serve stacks such adapters only "
                                 "(lorakit.per_row serves any adapter offline)")
            rank = max(rank, factors[0].shape[0])
        return rank

    def unload(self, name: str) -> None:
        """Stop serving `name` (new requests for it get 404); its slot and weights go when its last row ends."""
        slot = self.slots.pop(name, None)
        if slot is None:
            raise ServeError(f"no adapter named {name!r} is loaded")
        self.leaving[slot] = name
        self.release(slot, 0)

    def acquire(self, slot: int) -> None:
        """A row starts using `slot` (the none slot is not counted)."""
        if slot != self.none_slot:
            self.users[slot] = self.users.get(slot, 0) + 1

    def release(self, slot: int, count: int = 1) -> None:
        """`count` rows stopped using `slot`; an unloaded adapter's last row frees its slot and weights."""
        if slot == self.none_slot:
            return
        left = self.users.get(slot, 0) - count
        self.users[slot] = max(left, 0)
        if left <= 0 and slot in self.leaving:
            name = self.leaving.pop(slot)
            self.users.pop(slot, None)
            layers_before = {id(layer) for _, layer in adapted_layers(self.model)}
            delete_adapter(self.model, name)
            if {id(layer) for _, layer in adapted_layers(self.model)} != layers_before:
                self._rebuild(self._rank)  # a layer only this adapter adapted is gone from the model
            else:
                self._zero_slot(slot)

    # --- the stacks ------------------------------------------------------------------------------------------
    def _rebuild(self, rank: int) -> None:
        """New stacks for every adapted layer (R = the padded max of rank and --max-lora-rank), every served
        adapter written into its slot, and the routing context re-entered for the current layers."""
        # The new stacks are built and filled aside; the running ones (and the routing) change only once that
        # succeeded, so a failure (out of memory) leaves the server serving as before.
        layers = [layer for _, layer in adapted_layers(self.model)]
        stacks = {}
        for layer in layers:
            weight = layer.base_weight()
            r = padded_rank(max(rank, self.max_rank), weight.device)
            n_out, n_in = _out_in(layer)
            shape = (self.max_loras + 1, r)
            stacks[id(layer)] = AdapterStack(
                torch.zeros(*shape, n_in, dtype=weight.dtype, device=weight.device),
                torch.zeros(*shape, n_out, dtype=weight.dtype, device=weight.device),
                torch.zeros(self.max_loras + 1, device=weight.device), torch.zeros(self.max_loras + 1), 0.0)
        for slot, name in [*((s, n) for n, s in self.slots.items()), *self.leaving.items()]:
            self._write_slot(slot, name, stacks)
        self._routing.close()
        self._rank = rank
        self.stacks = stacks
        self.generation += 1
        if layers:
            self._routing = contextlib.ExitStack()
            self._routing.enter_context(routed(layers, StackRouter(self.stacks, self.rows), "lorakit serve"))

    @torch.no_grad()
    def _write_slot(self, slot: int, name: str, stacks: Optional[dict[int, AdapterStack]] = None) -> None:
        for _, layer in adapted_layers(self.model):
            stack = (self.stacks if stacks is None else stacks)[id(layer)]
            stack.a[slot].zero_()
            stack.bt[slot].zero_()
            stack.scale[slot] = 0.0
            if name not in layer.deltas:
                continue
            a, b, s, _ = layer.deltas[name].linear_factors()  # A [r, in], B [out, r]; dropout is off at inference
            r = a.shape[0]
            stack.a[slot, :r].copy_(a)
            stack.bt[slot, :r].copy_(b.t())
            stack.scale[slot] = float(s)

    @torch.no_grad()
    def _zero_slot(self, slot: int) -> None:
        for stack in self.stacks.values():
            stack.a[slot].zero_()
            stack.bt[slot].zero_()
            stack.scale[slot] = 0.0

    def close(self) -> None:
        """Give every adapted layer its own forward back."""
        self._routing.close()

    def names(self) -> list[str]:
        """The served adapter names, in load order."""
        return [n for n in list_adapters(self.model) if n in self.slots]


def _out_in(layer: AdaptedLayer) -> tuple[int, int]:
    """(out, in) features of a linear-like base layer, read from any loaded delta's factors."""
    for delta in layer.deltas.values():
        factors = delta.linear_factors()
        if factors is not None:
            a, b, _, _ = factors
            return b.shape[0], a.shape[1]
    raise ServeError(f"{type(layer.base_layer).__name__} layer has no low-rank adapter to stack")
