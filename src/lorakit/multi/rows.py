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
