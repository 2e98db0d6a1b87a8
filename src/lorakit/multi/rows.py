"""Which adapter each row of a mixed batch uses (per_row's rows), with the device tensors the routes read, cached
across blocks."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import MixedBatchError
from .stack import segment_tiles


class RowPlan:
    """Which adapter each row uses: gid (index into `adapters`) per row, -1 for none. Device tensors cached."""

    def __init__(self, names: Sequence[Optional[str]]):
        self.names = tuple(names)
        self.adapters: list[str] = list(dict.fromkeys(n for n in self.names if n is not None))
        self.key = tuple(self.adapters)
        self.row_gids = [-1 if n is None else self.adapters.index(n) for n in self.names]
        distinct = set(self.row_gids)
        self.uniform: Optional[int] = self.row_gids[0] if len(distinct) == 1 else None  # -1: all base rows
        self._cache: dict = {}

    def expanded(self, n_rows: int) -> list[int]:
        """Each of n_rows rows' gid: the batch's names repeated for HF generate's beams / returned sequences (a
        multiple k of the batch: row i covers rows i·k … i·k+k-1)."""
        batch = len(self.names)
        if n_rows % batch:
            raise MixedBatchError(f"per_row got {batch} names but an adapted layer saw {n_rows} rows in dimension 0 "
                                  "(not a multiple): the batch must be dimension 0, one name per row")
        repeat = n_rows // batch
        return [g for g in self.row_gids for _ in range(repeat)]

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def gids(self, n_rows: int, device) -> torch.Tensor:
        """[n_rows] long: each row's gid."""
        return self._cached(("gids", n_rows, device), lambda: torch.tensor(self.expanded(n_rows), device=device))

    def token_gids(self, n_rows: int, device) -> torch.Tensor:
        """gids as int32 [n_rows], for the kernels."""
        return self._cached(("gids32", n_rows, device), lambda: self.gids(n_rows, device).to(torch.int32))

    def rows(self, n_rows: int, device) -> dict[int, torch.Tensor]:
        """{gid: indices of its rows} (gid -1 included), built on the host: no device sync."""
        def make():
            groups: dict[int, list[int]] = {}
            for i, g in enumerate(self.expanded(n_rows)):
                groups.setdefault(g, []).append(i)
            return {g: torch.tensor(ix, device=device) for g, ix in groups.items()}
        return self._cached(("rows", n_rows, device), make)

    def tiles(self, n_rows: int, tokens_per_row: int, block_m: int, device) -> torch.Tensor:
        """The SGMV work list [T, 3] int32 (first token, count, gid) for n_rows rows of tokens_per_row tokens."""
        def make():
            tiles = segment_tiles(self.expanded(n_rows), tokens_per_row, block_m)
            return torch.tensor(tiles, dtype=torch.int32, device=device).view(-1, 3)
        return self._cached(("tiles", n_rows, tokens_per_row, block_m, device), make)


_ROW_PLANS: dict[tuple, "RowPlan"] = {}


def row_plan(names: Sequence[Optional[str]]) -> "RowPlan":
    """The RowPlan of these names, cached (with its device tensors) across per_row blocks."""
    key = tuple(names)
    if key not in _ROW_PLANS:
        if len(_ROW_PLANS) >= 256:
            _ROW_PLANS.clear()
        _ROW_PLANS[key] = RowPlan(key)
    return _ROW_PLANS[key]


class NotStatic(Exception):
    """A forward asked StaticRows for something whose size depends on the rows' names (rows grouped by adapter)."""


class StaticRows(RowPlan):
    """A RowPlan over a fixed, ordered adapter set whose device tensors are buffers, rewritten in place when the
    rows' names change (`assign`): a captured CUDA graph reads them, so one graph serves every assignment of rows to
    these adapters. SGMV's tile list is padded to its most tiles for the shape, n_rows·⌈tokens/block_m⌉, with
    empty tiles (count 0 writes nothing). Rows grouped per adapter (`rows`: sizes vary with the names) are refused
    with NotStatic; per_row's generic path for deltas without linear factors and modules_to_save ask for them."""

    def __init__(self, adapters: Sequence[str], names: Sequence[Optional[str]]):
        self.adapters = list(adapters)
        self.key = tuple(adapters)
        self.uniform = None  # always the stacked path, whatever the names: the graph must not depend on them
        self._gid = {n: g for g, n in enumerate(self.adapters)}
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.names = ()
        self.assign(names)

    def assign(self, names: Sequence[Optional[str]]) -> None:
        """Route the rows to `names` (each in the adapter set, or None): every buffer made so far is rewritten."""
        names = tuple(names)
        if names == self.names:
            return
        gids = [-1 if n is None else self._gid[n] for n in names]
        self.names, self.row_gids = names, gids
        try:
            for key, buf in self._buffers.items():
                values = torch.tensor(self._values(key), dtype=buf.dtype).view(buf.shape)
                # pinned: queued without a wait for the device; the host allocator keeps the block until the copy ran
                buf.copy_(values.pin_memory() if buf.is_cuda else values, non_blocking=buf.is_cuda)
        except BaseException:
            self.names = ()  # some buffers may hold the old rows: the next assign rewrites them all
            raise

    def _values(self, key: tuple) -> list:
        kind, n_rows, _, *shape = key
        gids = self.expanded(n_rows)
        if kind != "tiles":
            return gids
        tokens, block_m = shape
        tiles = segment_tiles(gids, tokens, block_m)
        return tiles + [(0, 0, 0)] * (n_rows * -(-tokens // block_m) - len(tiles))

    def _buffer(self, key: tuple, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None:  # made by the eager forwards before a capture, never inside one; a normal tensor even
            with torch.inference_mode(False):  # under inference_mode, so that any later call may rewrite it
                buf = self._buffers[key] = torch.tensor(self._values(key), dtype=dtype, device=key[2])
        return buf

    def gids(self, n_rows: int, device) -> torch.Tensor:
        return self._buffer(("gids", n_rows, torch.device(device)), torch.long)

    def token_gids(self, n_rows: int, device) -> torch.Tensor:
        return self._buffer(("gids32", n_rows, torch.device(device)), torch.int32)

    def tiles(self, n_rows: int, tokens_per_row: int, block_m: int, device) -> torch.Tensor:
        return self._buffer(("tiles", n_rows, torch.device(device), tokens_per_row, block_m), torch.int32).view(-1, 3)

    def rows(self, n_rows: int, device) -> dict[int, torch.Tensor]:
        raise NotStatic("rows grouped by adapter (a delta without linear factors, or modules_to_save)")
