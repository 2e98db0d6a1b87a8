"""Adapters stacked per layer: the layout every mixed-batch path computes from.

For the low-rank deltas of one layer that a batch uses (S of them, each answering `Delta.linear_factors`
with (A [r, in], B [out, r], s, p)), in slot order:
    a     [S+1, R, in]   A, rank zero-padded to R
    bt    [S+1, R, out]  B transposed, zero-padded
    scale [S+1]          fp32 scaling per slot
    p     [S+1]          dropout probability per slot (training only)
Slot S is all zeros: rows without an adapter (or whose adapter does not touch this layer) gather it and
add exactly 0. Zero-padded ranks add exact zeros as well, so adapters of different ranks share a stack.
Where the Triton kernels may run (CUDA, or the interpreter), R is padded to a power of two ≥ 16 (padded_rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..triton_gate import runs_on


@dataclass
class AdapterStack:
    """The stacked factors of one layer's low-rank adapters (layout in the module docstring)."""

    a: torch.Tensor  # [S+1, R, in]
    bt: torch.Tensor  # [S+1, R, out]
    scale: torch.Tensor  # [S+1] fp32
    p: torch.Tensor  # [S+1] fp32 dropout probabilities
    max_p: float = 0.0  # the largest of p, known on the host (no device sync to decide on dropout)

    @property
    def none_slot(self) -> int:
        """The all-zero slot S: rows without an adapter on this layer."""
        return self.a.shape[0] - 1

    @property
    def rank(self) -> int:
        """R, the (padded) rank of the stack."""
        return self.a.shape[1]


def padded_rank(r: int, device: torch.device) -> int:
    """The stack's rank R: r where only the torch path runs; where the Triton kernels may run, a power of two
    ≥ 16 (the Triton dot needs it; the padding adds exact zeros)."""
    if not runs_on(device):
        return r
    return max(16, 1 << (r - 1).bit_length())


def build_stack(deltas: Sequence[nn.Module]) -> AdapterStack:
    """Stack the deltas of one linear layer, each read through `Delta.linear_factors()` (not None).
    Differentiable: gradients reach each delta's own parameters."""
    factors = [d.linear_factors() for d in deltas]  # (A [r, in], B [out, r], s, p) each
    first = factors[0][0]
    rank = padded_rank(max(a.shape[0] for a, _, _, _ in factors), first.device)
    a = [F.pad(a_, (0, 0, 0, rank - a_.shape[0])) for a_, _, _, _ in factors]  # [R, in]
    bt = [F.pad(b_, (0, rank - b_.shape[1])).t() for _, b_, _, _ in factors]  # [R, out]
    a.append(torch.zeros_like(a[0]))
    bt.append(torch.zeros_like(bt[0]))
    scale = torch.tensor([float(s) for _, _, s, _ in factors] + [0.0], device=first.device)
    probs = [float(p_) for _, _, _, p_ in factors] + [0.0]
    p = torch.tensor(probs, device=first.device)
    return AdapterStack(torch.stack(a), torch.stack(bt).contiguous(), scale, p, max(probs))


def segment_tiles(row_gids: Sequence[int], tokens_per_row: int, block_m: int) -> list[tuple[int, int, int]]:
    """SGMV work list: (first token, token count ≤ block_m, adapter id) for each tile of rows sharing an adapter.

    Row i owns tokens [i·M, (i+1)·M) of the flattened batch. Neighbouring rows with the same adapter merge
    into one segment; rows without one (-1) get no tile (their output is the base output)."""
    tiles: list[tuple[int, int, int]] = []
    i, n = 0, len(row_gids)
    while i < n:
        j = i
        while j + 1 < n and row_gids[j + 1] == row_gids[i]:
            j += 1
        if row_gids[i] >= 0:
            start, end = i * tokens_per_row, (j + 1) * tokens_per_row
            tiles.extend((s, min(block_m, end - s), row_gids[i]) for s in range(start, end, block_m))
        i = j + 1
    return tiles
