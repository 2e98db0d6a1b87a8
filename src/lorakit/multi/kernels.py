"""Mixed-adapter LoRA compute: stacked adapters, the vectorised torch path, and Triton GPU kernels.

Triton is optional: without it only the torch path exists (triton_lora is imported only when Triton is).
Whether a kernel runs is decided by lorakit.triton_gate (LORAKIT_TRITON=0 turns them off).
Exactness: fp32 kernels equal the torch reference within fp32 rounding (1e-5 relative in the tests);
bf16 kernels round h to bf16 once (the reference rounds it twice: after A·x and after the scaling).
"""

from __future__ import annotations

import os

from ..triton_gate import HAS_TRITON as HAVE_TRITON
from .stack import AdapterStack, build_stack, padded_rank, segment_tiles
from .torch_lora import lora_rows, token_reference

if HAVE_TRITON:
    from . import triton_lora

# False (or LORAKIT_SGMV=split): the two-kernel SGMV (shrink, then expand), for comparison
SGMV_FUSED = os.environ.get("LORAKIT_SGMV", "fused") != "split"


def sgmv_block_m(tokens_per_row: int, n_tokens: int) -> int:
    """SGMV tile rows for rows of tokens_per_row tokens, n_tokens in all (16/32/64: the fastest of a sweep on an
    H100 at Llama-1B widths, BENCHMARKS.md's mixed-batch diagnostics)."""
    return 16 if tokens_per_row <= 16 else 32 if n_tokens < 8192 else 64


def sgmv(x, y, stack: AdapterStack, slot_map, tiles, block_m: int) -> None:
    """In place: y [..., out] += each tile's LoRA (prefill); x [..., in] and y contiguous, tiles index their
    token rows in order. Needs Triton; see triton_lora."""
    if SGMV_FUSED:
        triton_lora.sgmv(x, y, stack.a, stack.bt, stack.scale, slot_map, tiles, block_m)
    else:
        triton_lora.sgmv_split(x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1]), stack.a, stack.bt, stack.scale,
                               slot_map, tiles, block_m)


def bgmv(x2, y2, stack: AdapterStack, slot_map, token_gid) -> None:
    """In place: y2 [N, out] += each row's LoRA, one token per row (decode). Needs Triton; see triton_lora."""
    triton_lora.bgmv(x2, y2, stack.a, stack.bt, stack.scale, slot_map, token_gid)


__all__ = ["AdapterStack", "build_stack", "padded_rank", "segment_tiles", "lora_rows", "token_reference",
           "HAVE_TRITON", "sgmv", "sgmv_block_m", "bgmv"]
