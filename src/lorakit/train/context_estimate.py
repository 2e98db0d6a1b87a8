"""The longest context one sequence can train at (`lorakit estimate --max-context`): an analytic account of
GPU memory on the long-context path, optimize(checkpoint="offload") with its sequence-tiled MLPs, batch 1.

    GPU = fixed bytes (frozen weights, adapter states, one loss chunk, MLP tiles, scratch, a reserve)
        + T · bytes per token

On that path each block's input lives in pinned host memory (L · 2·hidden bytes per token, on the host), and
the device holds, per token, what one block's recompute and backward hold at their peak: the attention
backward (flash: the fp32 dq accumulator and, with grouped KV heads, dk/dv per query head before their sum),
the q/k/v and output it saved, the gradients around the two residuals, RoPE's cos/sin and the ids. The MLP's
[T, intermediate] tensors exist one tile at a time (a fixed term), the loss one chunk of logits at a time.
Every term is listed with its reason by `context_terms`; `lorakit estimate --max-context` prints them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..fast.checkpoint import PREFETCH_BYTES
from ..fast.cross_entropy import CHUNK_BYTES
from ..fast.tiling import TILE_BYTES
from .estimate import BYTES_PER_WEIGHT, TRAINABLE_BYTES, Shape, lora_targets, shape_of

GIB = 2**30
RESERVE_BYTES = 2 * GIB  # allocator fragmentation, cuBLAS workspaces, the dequantisation scratch
MLP_TILE_TENSORS = 8  # tile-sized tensors alive in a tile's backward: g, u, act·u, and their gradients


@dataclass
class Term:
    """One line of the account: bytes (fixed) or bytes per token, and why they are there."""

    name: str
    size: float
    why: str


@dataclass
class ContextEstimate:
    """The account and its answer."""

    shape: Shape
    fixed: list[Term]
    per_token: list[Term]
    gpu_bytes: float
    host_bytes_per_token: float

    @property
    def fixed_bytes(self) -> float:
        """The sum of the fixed terms."""
        return sum(t.size for t in self.fixed)

    @property
    def bytes_per_token(self) -> float:
        """The sum of the per-token terms."""
        return sum(t.size for t in self.per_token)

    @property
    def max_tokens(self) -> int:
        """The longest sequence whose step fits in gpu_bytes."""
        return max(0, int((self.gpu_bytes - self.fixed_bytes) // self.bytes_per_token))

    def peak_bytes(self, tokens: int) -> float:
        """Predicted peak GPU memory of a step at `tokens` tokens."""
        return self.fixed_bytes + tokens * self.bytes_per_token


def weight_bytes(shape: Shape, bits: int) -> float:
    """Frozen weights as lorakit.quantize leaves them: the blocks' linears at `bits` (NF4 with its absmax
    codes for 4), the embeddings, norms and output head in bf16 (fp32 for bits 32)."""
    if bits not in BYTES_PER_WEIGHT:
        raise ConfigError(f"--bits must be one of {sorted(BYTES_PER_WEIGHT)}, got {bits}")
    quantized = sum(fan_in * fan_out for fan_in, fan_out in lora_targets(shape, ["all-linear"]).values())
    other_bytes = 4.0 if bits == 32 else 2.0
    return quantized * BYTES_PER_WEIGHT[bits] + (shape.params - quantized) * other_bytes


def context_terms(shape: Shape, r: int, modules_per_layer: int, act_bytes: int) -> list[Term]:
    """Per-token bytes at the peak of one block's backward (see the module docstring)."""
    h, kv = shape.hidden, shape.kv_dim
    head_dim = h // max(1, shape.heads)
    q = shape.heads * head_dim
    b = act_bytes
    gqa = q if kv < q else 0
    return [
        Term("block input, back from the host", b * h, "kept for the block's first norm and residual"),
        Term("gradient at the block output", b * h, "held by autograd through the block's backward"),
        Term("gradient at the attention residual", b * h, "the MLP half's input gradient plus the residual's"),
        Term("q, k, v (after RoPE)", b * (q + 2 * kv), "saved by attention for its backward"),
        Term("attention output", b * q, "saved by attention and read by o_proj's backward"),
        Term("gradient of the attention output", b * q, "o_proj's input gradient"),
        Term("dq, dk, dv", b * (q + 2 * kv), "attention's input gradients"),
        Term("flash backward: fp32 dq accumulator", 4 * q, "allocated by the flash kernel's backward"),
        Term("flash backward: dk, dv per query head", 2 * b * gqa, "grouped KV heads: summed per KV head after"),
        Term("RoPE cos and sin", 2 * b * head_dim, "made once per step, read by every block"),
        Term("LoRA x·Aᵀ", b * r * modules_per_layer, "saved by each adapted linear of the block"),
        Term("ids, labels, positions, loss", 8 * 4 + 4, "int64 ids, labels, shifted labels, positions; fp32 loss"),
    ]


def fixed_terms(shape: Shape, bits: int, trainable: int) -> list[Term]:
    """Bytes that do not grow with the sequence."""
    return [
        Term("frozen weights", weight_bytes(shape, bits), f"block linears at {bits} bits, the rest in bf16"),
        Term("adapter: weights, grads, AdamW", trainable * TRAINABLE_BYTES, f"{trainable:,} trainable × 16 B"),
        Term("loss: one chunk of logits", CHUNK_BYTES, "chunked cross-entropy; full logits never exist"),
        Term("MLP tiles", MLP_TILE_TENSORS * TILE_BYTES, f"{MLP_TILE_TENSORS} tile-wide tensors of the tiled MLP"),
        Term("reserve", RESERVE_BYTES, "fragmentation, cuBLAS workspaces, dequantisation scratch"),
    ]


def estimate_max_context(model: str, r: int = 16, targets=None, bits: int = 4, gpu_memory_gib: float = 80.0
                         ) -> ContextEstimate:
    """The memory account of the long-context path and the longest sequence it fits.

    Args:
        model: a known shape name, a model directory or a config.json (as `estimate`).
        r: LoRA rank.
        targets: adapted modules, or ['all-linear'] (the default).
        bits: bits per frozen weight of the blocks' linears: 32, 16, 8 or 4 (NF4).
        gpu_memory_gib: the device's memory in GiB (2**30 bytes).

    Returns:
        A ContextEstimate (max_tokens, its terms, peak_bytes(T)).
    """
    if not (gpu_memory_gib > 0 and math.isfinite(gpu_memory_gib)):  # inf would make max_tokens NaN
        raise ConfigError(f"--gpu-memory must be a positive number of GiB, got {gpu_memory_gib}")
    if r < 1:
        raise ConfigError(f"--r must be at least 1, got {r}")
    shape = shape_of(model)
    targets = targets or ["all-linear"]
    hits = lora_targets(shape, targets)
    if not hits:
        raise ConfigError(f"--targets {targets} match no linear layer of {shape.name}")
    trainable = sum(r * (fan_in + fan_out) for fan_in, fan_out in hits.values())
    act_bytes = 4 if bits == 32 else 2
    per_token = context_terms(shape, r, round(len(hits) / max(1, shape.layers)), act_bytes)
    return ContextEstimate(shape, fixed_terms(shape, bits, trainable), per_token,
                           gpu_memory_gib * GIB, shape.layers * act_bytes * shape.hidden)


def prefetch_tokens(shape: Shape, act_bytes: int = 2) -> int:
    """Sequences up to this many tokens also hold the next block's prefetched input (one more hidden state
    per token); the account is for the longer ones."""
    return PREFETCH_BYTES // (act_bytes * shape.hidden)
