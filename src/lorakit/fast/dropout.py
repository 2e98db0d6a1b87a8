"""The dropout of the fused linear's adapter input: xd = x ⊙ mask / (1 − p).

Where the mask comes from, per device type (MASK_SOURCE, read through mask_source):
- "philox" (CUDA): drawn inside the fused linear's Triton kernels (dropout_kernels.py) from a per-call seed and
  never stored; backward draws it again. The same distribution as the reference (keep probability 1 − p to
  2⁻¹⁶), from a different draw: a seeded run repeats itself but not the reference path's masks. Where Triton may
  not run (lorakit.triton_gate: LORAKIT_TRITON=0, no Triton), and under torch.compile (the per-call seed is a
  Python int that a compiled graph would guard on), it falls back to "native". While a CUDA graph is captured
  (optimize's cuda_graphs, block_graphs.py) the seed is a device tensor drawn by torch's graph-safe generator;
  the kernels read it from memory (a checkpointed block's recompute, captured as another graph, reads the
  forward's seed tensors again: seed_tape);
- "native": torch.native_dropout, nn.Dropout's own kernel: the same RNG draw as the reference path, so the same
  mask for the same RNG state (on CUDA it is one fused Philox kernel); xd is an autograd input of the fused call,
  its autograd keeping only the bool mask;
- "hash" (CPU): drawn inside the fused linear from the same per-call seed by a counter-based hash in torch's
  integer ops (dropout_hash.py) and drawn again in backward, never stored: keep probability 1 − p to 2⁻¹⁶, a
  seeded run repeats itself but not the reference path's masks. Under torch.compile it falls back to "native";
- "bits" (CPU, selectable): 32 random bits per element from torch's generator compared with p·2³² (keep when ≥),
  the dropped input then an autograd input like "native"'s: the same distribution to 2⁻³², several times
  slower than "hash" (mt19937 and bool-mask products are scalar loops on CPU).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional, Union

import torch

from .. import triton_gate

MASK_SOURCE = {"cpu": "hash", "cuda": "philox"}
_NATIVE_BACKWARD = torch.ops.aten.native_dropout_backward  # g ⊙ mask · scale, one kernel


def bits_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool mask of x's shape, each element True (kept) with probability 1 − p (to 2⁻³²)."""
    n = x.numel()
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 1) // 2,), dtype=torch.int64, device=x.device)
    threshold = min(-2**31 + round(p * 2**32), 2**31 - 1)  # uniform int32 ≥ threshold: probability 1 − p
    return bits.view(torch.int32)[:n].view(x.shape) >= threshold


def draw_seed(device: Optional[torch.device] = None) -> Union[int, torch.Tensor]:
    """One call's mask seed, in [2⁶², 2⁶³) (always a 64-bit kernel argument), from torch's default CPU generator:
    torch.manual_seed repeats it, and a checkpoint's recompute, which restores that generator, draws it again.
    While a CUDA graph is captured on `device`'s stream, a 1-element int64 tensor drawn by the device's
    generator instead (graph-safe: each replay of the graph draws a new seed into it; torch.cuda.manual_seed
    repeats a run); the kernels read it from memory. Inside seed_tape: recorded, or taken from the tape."""
    if device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        tape = getattr(_TAPE, "seeds", None)
        if tape is not None and _TAPE.replay:  # a recompute's capture: the forward graph's seeds again, in order
            _TAPE.at += 1
            if _TAPE.at <= len(tape):
                return tape[_TAPE.at - 1]
            # more draws than the forward's: the capture goes on (raising would leave it unfinished), and the
            # count it ends with makes checkpoint_graphs.py refuse these graphs
        seed = torch.randint(2**62, 2**63 - 1, (1,), device=device, dtype=torch.int64)
        if tape is not None and not _TAPE.replay:
            tape.append(seed)
        return seed
    return int(torch.randint(2**62, 2**63 - 1, ()))


_TAPE = threading.local()  # seed_tape's list while one is entered on this thread


@contextlib.contextmanager
def seed_tape(seeds: list, replay: bool):
    """While a checkpointed block's graphs are captured (checkpoint_graphs.py): the forward's capture appends each
    seed tensor it draws to `seeds` (replay=False); the recompute's capture takes them again in the same order
    (replay=True), so forward and recompute drop the same elements. Yields a function giving how many the
    recompute asked for (more than were recorded: fresh draws). A tape with a position, not thread_scope's plain
    flag: draw_seed, several calls down, needs both."""
    _TAPE.seeds, _TAPE.replay, _TAPE.at = seeds, replay, 0
    try:
        yield lambda: _TAPE.at
    finally:
        _TAPE.seeds = None


def mask_source(device: torch.device) -> str:
    """Where the fused linear's dropout masks come from on `device`: "philox", "hash", "native" or "bits" (see
    above).

    Args:
        device: the input's device.
    Returns:
        MASK_SOURCE's entry for the device type; "native" when none is set, when torch.compile is tracing and
        it says "philox" or "hash" (a per-call seed that a compiled graph would guard on), or when it says
        "philox" and Triton may not run there.
    """
    source = MASK_SOURCE.get(device.type, "native")
    if source in ("philox", "hash") and torch.compiler.is_compiling():
        return "native"
    if source == "philox" and not triton_gate.runs_on(device):
        return "native"
    return source


class _MaskedScale(torch.autograd.Function):
    """x ⊙ mask · scale; saves the bool mask only."""

    @staticmethod
    def forward(ctx, x, mask, scale):
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return _NATIVE_BACKWARD(x, mask, scale)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return _NATIVE_BACKWARD(g, mask, ctx.scale), None, None


def dropped(x: torch.Tensor, p: float) -> torch.Tensor:
    """nn.Dropout(p) of x in training (0 < p < 1) as a tensor: random bits where MASK_SOURCE says "bits" for x's
    device, else nn.Dropout's own kernel (the seeded "philox" and "hash" masks are drawn by the fused linear)."""
    if MASK_SOURCE.get(x.device.type, "native") != "bits":
        return torch.native_dropout(x, p, True)[0]
    return _MaskedScale.apply(x, bits_mask(x, p), 1.0 / (1.0 - p))
