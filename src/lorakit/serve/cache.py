"""The server's KV cache and its two model steps: prefill of new rows, decode of every running row.

The cache has one slot per running request: per layer, keys and values [slots, kv_heads, max_len, head_dim]
(allocated once). Each row writes its new tokens at its own positions (columns), so rows of different lengths
share a batch; a query at position p attends to columns 0..p of its own slot and nothing else:
    mask[b, 0, q, j] = 0 if j ≤ position[b, q] else -inf          (an additive float mask, as eager/SDPA take)
Columns past a row's position hold stale values of an earlier request; the mask hides them. The last column
is a sink: padding and idle rows write there, and no position reaches it.

Prefill takes new rows left-padded to one width, so every row's last prompt token is the last column and the
model computes logits for that column only (`logits_to_keep=1`, whatever its head). Decode runs rows
0..n-1 of the slots with one token each (idle slots below n run a dummy token into the sink). On CUDA the
decode step is captured as a CUDA graph per (rows, attended columns) bucket and replayed: the adapter
stacks, row slots, tokens and positions are static buffers rewritten in place between replays.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import Cache

from ..errors import ServeError
from ..multi import kernels
from .. import triton_gate
from .adapters import AdapterTable


# Prefill batches change shape with every admission (rows × longest prompt); cuDNN's attention builds an
# execution plan per new shape (milliseconds of host time each), the memory-efficient kernel takes any shape.
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class SlotCache(Cache):
    """Per-slot KV store with per-row write positions (see the module docstring). The step that runs sets
    `rows` (each batch row's slot, None: rows 0..B-1), `write_cols` [B, q] and `kv_len`."""

    is_compileable = False

    def __init__(self, n_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__(layers=[])
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.rows: Optional[torch.Tensor] = None
        self.write_cols: Optional[torch.Tensor] = None
        self.kv_len = 0

    @property
    def sink(self) -> int:
        """The column padding and idle rows write to; never attended."""
        return self.max_len - 1

    def __len__(self) -> int:
        return len(self.keys)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write key/value states [B, H, q, D] at each row's columns; return the attended [B, H, kv_len, D]."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        n = key_states.shape[0]
        rows = torch.arange(n, device=keys.device) if self.rows is None else self.rows
        # advanced indices rows [B, 1] and columns [B, q] around a slice: the target is [B, q, H, D]
        keys[rows[:, None], :, self.write_cols] = key_states.transpose(1, 2)
        values[rows[:, None], :, self.write_cols] = value_states.transpose(1, 2)
        if self.rows is None:
            return keys[:n, :, : self.kv_len], values[:n, :, : self.kv_len]
        return (keys[:, :, : self.kv_len].index_select(0, self.rows),
                values[:, :, : self.kv_len].index_select(0, self.rows))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns attended by the running step (the model asks only when no positions are given)."""
        return self.kv_len


def attention_mask(positions: torch.Tensor, kv_len: int, dtype) -> torch.Tensor:
    """[B, 1, q, kv_len] additive mask: query at position p sees columns 0..p."""
    cols = torch.arange(kv_len, device=positions.device)
    seen = cols[None, None, None, :] <= positions[:, None, :, None]
    return torch.zeros(seen.shape, dtype=dtype, device=positions.device).masked_fill_(~seen, torch.finfo(dtype).min)


def cache_for(model: nn.Module, slots: int, max_len: int) -> SlotCache:
    """A SlotCache shaped for a decoder-only HF model (its text config); ServeError for attention it cannot batch."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or (window is not None and getattr(config, "use_sliding_window", True)
                                       and window < max_len):
        raise ServeError(f"{config.model_type}: layers {sorted(kinds)} with sliding window {window}; lorakit serve "
                         "batches full-attention decoders only (or pass --max-len ≤ the window)")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    weight = next(model.parameters())
    return SlotCache(config.num_hidden_layers, slots, max_len, kv_heads, head_dim, weight.dtype, weight.device)


class Steps:
    """The model calls of a server: `prefill` (new rows) and `decode` (one token for rows 0..n-1)."""

    def __init__(self, model: nn.Module, cache: SlotCache, table: AdapterTable, pad_id: int, graphs: bool):
        self.model = model
        self.cache = cache
        self.table = table
        self.pad_id = pad_id
        self.device = cache.keys[0].device
        self.dtype = cache.keys[0].dtype
        self.graphs = graphs and self.device.type == "cuda"
        self._captured: dict[tuple[int, int], tuple] = {}
        self._generation = -1
        slots = cache.keys[0].shape[0]
        # Each cache row's latest token, on the device: samples are written here and the next decode step reads
        # them, so a step can be launched before the host has seen the previous step's tokens.
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        # The decode step's other inputs, one static buffer (one host→device copy per step), rows:
        # 0 position, 1 cache column written, 2 adapter slot (long), 3 adapter gid (-1: none)
        self._inputs = torch.zeros(4, slots, dtype=torch.long, device=self.device)

    def _route(self, slots: Sequence[int], index: torch.Tensor, gid: torch.Tensor, tokens: int) -> None:
        """Rows of `tokens` tokens (a prefill) use these adapter slots: their SGMV tiles are built on the host."""
        none = self.table.none_slot
        rows = self.table.rows
        rows.index, rows.gid = index, gid
        rows.active = any(s != none for s in slots)
        rows.tokens, rows.block_m, rows.tiles = tokens, kernels.sgmv_block_m(tokens, tokens * len(slots)), None
        if rows.active and tokens > 1 and triton_gate.runs_on(self.device):
            tiles = kernels.segment_tiles([s if s != none else -1 for s in slots], tokens, rows.block_m)
            rows.tiles = on_device(tiles, self.device, torch.int32).view(-1, 3)

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], cache_rows: Sequence[int], adapter_slots: Sequence[int]):
        """Run new rows' prompts into their cache slots; returns the logits [B, V] (fp32) of each last token."""
        width = max(len(p) for p in prompts)
        if width >= self.cache.max_len:
            raise ServeError(f"a prompt of {width} tokens does not fit --max-len {self.cache.max_len}")
        ids = on_device([[self.pad_id] * (width - len(p)) + list(p) for p in prompts], self.device)  # [B, T]
        pads = on_device([width - len(p) for p in prompts], self.device)  # [B]
        positions = (torch.arange(width, device=self.device)[None, :] - pads[:, None]).clamp_(min=0)  # [B, T]
        real = torch.arange(width, device=self.device)[None, :] >= pads[:, None]
        cache = self.cache
        cache.rows = on_device(list(cache_rows), self.device)
        cache.write_cols = torch.where(real, positions, torch.full_like(positions, cache.sink))
        cache.kv_len = width
        index = on_device(list(adapter_slots), self.device)
        gid = torch.where(index == self.table.none_slot, -1, index).to(torch.int32)
        self._route(adapter_slots, index, gid, width)
        with sdpa_kernel(PREFILL_BACKENDS):
            out = self.model(input_ids=ids, position_ids=positions, attention_mask=attention_mask(positions, width,
                             self.dtype), past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def write_samples(self, chosen: torch.Tensor, cache_rows: Optional[Sequence[int]] = None) -> None:
        """Make `chosen` [k] (device) the latest token of cache rows `cache_rows` (None: rows 0..k-1), for the
        next decode step to read; no host sync."""
        if cache_rows is None:
            self.tokens[: chosen.shape[0]].copy_(chosen)
        else:
            self.tokens.index_copy_(0, on_device(list(cache_rows), self.device), chosen)

    @torch.no_grad()
    def decode(self, tokens: Optional[Sequence[int]], positions: Sequence[int],
               adapter_slots: Sequence[int]) -> torch.Tensor:
        """One token for each of rows 0..n-1 (position -1: an idle row); returns logits [n, V] (fp32). tokens
        None: each row's token is its latest sample in `self.tokens` (written on the device by the caller)."""
        n = len(positions)
        kv_len = _bucket(max(positions) + 1, self.cache.max_len - 1) if self.graphs else max(positions) + 1
        rows = _bucket(n, self._inputs.shape[1]) if self.graphs else n
        pad = rows - n
        if tokens is not None:
            self.tokens[:n].copy_(host_tensor(list(tokens), self.device), non_blocking=True)
        cols = [p if p >= 0 else self.cache.sink for p in positions] + [self.cache.sink] * pad
        none = self.table.none_slot
        slots = list(adapter_slots) + [none] * pad
        host = host_tensor([[max(p, 0) for p in positions] + [0] * pad, cols, slots,
                            [s if s != none else -1 for s in slots]], self.device)
        self._inputs[:, :rows].copy_(host, non_blocking=True)
        if self.graphs:
            try:
                return self._replay(rows, kv_len)[:n]
            except RuntimeError as e:  # a model or kernel that cannot be captured: decode eagerly from now on
                self._no_graphs(e)
        self.table.rows.active = any(s != none for s in slots)
        return self._decode_eager(rows, kv_len)[:n]

    def _decode_eager(self, rows: int, kv_len: int) -> torch.Tensor:
        """The decode step on rows 0..rows-1 from the static inputs (what a graph captures)."""
        inputs = self._inputs[:, :rows]
        table_rows = self.table.rows
        table_rows.index, table_rows.gid, table_rows.tiles = inputs[2], inputs[3].to(torch.int32), None
        cache = self.cache
        cache.rows, cache.write_cols, cache.kv_len = None, inputs[1, :, None], kv_len
        positions = inputs[0, :, None]
        out = self.model(input_ids=self.tokens[:rows, None], position_ids=positions,
                         attention_mask=attention_mask(positions, kv_len, self.dtype), past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def capture_all(self) -> int:
        """Capture the decode graph of every (rows, columns) bucket now, before any request (a capture takes tens
        of milliseconds, and captured on first use it stalls every running row). The inputs point every row at
        the cache's sink column and no adapter, so the captures write nothing a request reads. Returns the number
        of graphs (0 without CUDA graphs, or when a capture fails: decode then runs eagerly)."""
        if not self.graphs:
            return 0
        none = self.table.none_slot
        self._inputs[0].zero_()
        self._inputs[1].fill_(self.cache.sink)
        self._inputs[2].fill_(none)
        self._inputs[3].fill_(-1)
        self._generation = self.table.generation
        try:
            for rows in _buckets(self._inputs.shape[1]):
                for kv_len in _buckets(self.cache.max_len - 1):
                    if (rows, kv_len) not in self._captured:
                        self._captured[(rows, kv_len)] = self._capture(rows, kv_len)
        except RuntimeError as e:  # as in decode: the server still serves, eagerly
            self._no_graphs(e)
        return len(self._captured)

    def _no_graphs(self, error: Exception) -> None:
        print(f"lorakit serve: CUDA graph capture failed ({error}); decoding without graphs", file=sys.stderr)
        self.graphs = False
        self._captured.clear()

    def _replay(self, rows: int, kv_len: int) -> torch.Tensor:
        if self._generation != self.table.generation:  # the adapter stacks were reallocated
            self._captured.clear()
            self.__dict__.pop("_graph_pool", None)  # new graphs in a new pool, never in the old graphs' memory
            self._generation = self.table.generation
        key = (rows, kv_len)
        if key not in self._captured:
            self._captured[key] = self._capture(rows, kv_len)
        graph, logits = self._captured[key]
        graph.replay()
        return logits

    def _capture(self, rows: int, kv_len: int):
        """A CUDA graph of the decode step for `rows` rows attending `kv_len` columns (LoRA always on: rows
        without an adapter have gid -1, which the kernel skips). On the model's GPU, whichever is current here
        (Triton launches on the current one)."""
        self.table.rows.active = bool(self.table.stacks)
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up outside the graph: kernels compiled, workspaces allocated
                for _ in range(2):
                    self._decode_eager(rows, kv_len)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # captured on a stream of the model's GPU (torch's own capture stream is made once, on the GPU current
            # at the process's first capture)
            with torch.cuda.graph(graph, pool=self._pool(), stream=stream):
                logits = self._decode_eager(rows, kv_len)
        return graph, logits

    def _pool(self):
        if not hasattr(self, "_graph_pool"):
            self._graph_pool = torch.cuda.graph_pool_handle()
        return self._graph_pool


def host_tensor(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """values (a list, or a list of equal lists) as a host tensor a non-blocking copy to `device` reads
    asynchronously: pinned memory for CUDA (the caching host allocator keeps it until the copies that read it have
    run). A copy from pageable memory would wait for the device's queue, and the server's next step for the one
    running."""
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory() if device.type == "cuda" else host


def on_device(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """values as a tensor on `device`, copied from pinned memory without waiting for the device (host_tensor)."""
    return host_tensor(values, device, dtype).to(device, non_blocking=True)


def _buckets(limit: int) -> list[int]:
    """Every size _bucket returns for n in 1..limit."""
    return sorted({_bucket(n, limit) for n in [1] + [2 ** k for k in range(3, limit.bit_length() + 1)] + [limit]})


def _bucket(n: int, limit: int) -> int:
    """The captured size for n: the next power of two ≥ 8, at most `limit`."""
    size = 8
    while size < n:
        size *= 2
    return min(size, limit)
