"""Dropout terms of the fused linear on CPU: masks from a counter-based hash in torch's integer ops, drawn from the
call's seed in forward and drawn again in backward, never stored (the CPU twin of dropout_kernels.py).

A dropout term t reads xd_t = x ⊙ m_t / (1 − p). Its mask is a function of (seed, stream, element) alone: the
term's two 32-bit keys (k1, k2) come from (seed, stream) by SplitMix64; word w = 0, 1, … over the flattened
[N, in] input gives
    h_w = lowbias32(w + k1, with k2 xor'ed in after the first multiply)   (all mod 2³²)
and its two 16-bit halves (as torch's int16 view lays them out) are the values of elements 2w and 2w + 1. An
element is kept when its value ≥ round(p·2¹⁶): keep probability 1 − p to 2⁻¹⁶, the quantisation of the CUDA
kernels. lowbias32 is C. Wellons' xorshift-multiply integer hash (github.com/skeeto/hash-prospector: the best
two-multiply 32-bit hash his avalanche search found). `seed` is drawn once per fused call from torch's default
CPU generator, so torch.manual_seed repeats a run and checkpoint recomputation (which restores the RNG) replays
it; `stream` is the term's index among the call's dropout terms, so every adapted layer of a q/k/v group draws
its own mask.

Why a hash: on CPU, torch's Bernoulli sampling and its mt19937 random bits are scalar loops (measured on one
thread, 2048×384 fp32: bernoulli_ 9.2 ms, 64 random bits per 4 elements 1.8 ms), while the hash is 12 whole-tensor
int32 ops over half as many words (~0.5 ms). The mask comes out as 0/1 in x's dtype (a comparison written
straight into a float tensor): multiplying by a bool mask costs ~30× more on CPU (an unvectorised cast).

Per term, forward: mask (in x's dtype) → xd = mask ⊙ x in place → h_t = (A_t·xdᵀ)/(1 − p) (a GEMM alpha); nothing
of x's size saved. Backward: the mask again, dx += ((gH_tᵀ·A_t) ⊙ mask)/(1 − p) (one addcmul_), then
dA_t = gH_t·(mask ⊙ x)/(1 − p) through lora_grads.grad_a (an RMSNorm recipe's x is its input, rescaled as there).
"""

from __future__ import annotations

import threading

import torch

from typing import Optional

from .lora_grads import grad_a

_M32, _M64 = 2**32 - 1, 2**64 - 1
# Words hashed per chunk: the chunk's int32 words and their shifted copy stay in cache (2 × 512 KiB) while its 12
# ops run; far smaller chunks pay torch's per-op overhead (~5-10 µs) too often. Measured (one thread, 2048×1536):
# 2¹⁵ words 13.6 ms, 2¹⁷ 7.1 ms, the whole 2²⁰·1.5 at once 9.6 ms.
CHUNK_WORDS = 2**18
BLOCK_WORDS = 2**16  # words under one pair of keys (part of the masks' definition; CHUNK_WORDS is a multiple)
_COUNTERS: dict = {}  # device → int32 arange, the word counters of a chunk (read-only; grown on demand)
_CONSTANTS: dict = {}  # device → the hash's constants as 0-dim int32 tensors (read-only)
# Keep each term's mask from forward to backward as int8 (1 byte per element; nn.Dropout keeps a bool mask and
# the dropped input, 5 bytes in fp32) rather than drawing it again: the hash is the path's main cost.
KEEP_MASKS = True
_LOCAL = threading.local()  # per thread: reused buffers (fresh multi-MiB tensors pay page faults on every call)


def _signed32(v: int) -> int:
    """v mod 2³² as a signed 32-bit Python int (what an int32 tensor op takes)."""
    v &= _M32
    return v - 2**32 if v >= 2**31 else v


_MUL1, _MUL2 = _signed32(0x7FEB352D), _signed32(0x846CA68B)  # lowbias32's multipliers


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def block_keys(seed: int, stream: int, block: int) -> tuple[int, int]:
    """The two signed 32-bit keys (k1, k2) of one block of one term's mask.

    Args:
        seed: the fused call's seed (any Python int); stream: the term's index among the call's dropout terms;
        block: the block's index (word // BLOCK_WORDS).
    Returns:
        (k1, k2): k1 is added to the block's mixed counters, k2 xor'ed in after the first multiply.
    """
    z = _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ stream) ^ block)
    return _signed32(z), _signed32(z >> 32)


def _mixed_counters(device) -> torch.Tensor:
    """C_j = lowbias32(j) for j < BLOCK_WORDS: int32 [BLOCK_WORDS], computed once per device (read-only)."""
    device = torch.device(device)
    have = _COUNTERS.get(device)
    if have is None:
        with torch.inference_mode(False):
            h = torch.arange(BLOCK_WORDS, dtype=torch.int64, device=device)
            for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):  # lowbias32, in int64 mod 2³²
                h ^= h >> shift
                if mul is not None:
                    h = (h * mul) & _M32
            have = _COUNTERS[device] = torch.where(h >= 2**31, h - 2**32, h).to(torch.int32)  # the same bits
    return have


def _constants(device) -> tuple:
    """lowbias32's shifts, logical-shift masks and multipliers as 0-dim int32 tensors (a Python scalar operand
    costs torch a tensor conversion per op: ~4 µs against ~1.5 µs)."""
    device = torch.device(device)
    have = _CONSTANTS.get(device)
    if have is None:
        values = (16, 15, 0xFFFF, 0x1FFFF, _signed32(0x7FEB352D), _signed32(0x846CA68B))  # lowbias32's
        with torch.inference_mode(False):
            have = _CONSTANTS[device] = tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in values)
    return have


def buffer(slot: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """This thread's reused flat buffer `slot` of at least `numel` elements (valid until the slot is asked again).

    Args:
        slot: the buffer's name; numel: elements needed; dtype, device: the buffer's.
    Returns:
        A flat view of exactly `numel` elements.
    """
    bufs = _LOCAL.__dict__.setdefault("buffers", {})
    key = (slot, dtype, torch.device(device))
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):
            buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release() -> None:
    """Free this thread's reused buffers (they are allocated again on the next use)."""
    _LOCAL.__dict__.pop("buffers", None)


def _block_keys(seed: int, streams, first_block: int, n_blocks: int, device) -> tuple:
    """The (k1, k2) keys of blocks first_block … + n_blocks − 1 of each stream: two int32 [T, n_blocks, 1]."""
    keys = [[block_keys(seed, s, b) for b in range(first_block, first_block + n_blocks)] for s in streams]
    k1 = torch.tensor([[[k] for k, _ in row] for row in keys], dtype=torch.int32, device=device)
    k2 = torch.tensor([[[k] for _, k in row] for row in keys], dtype=torch.int32, device=device)
    return k1, k2


def _hash_blocks(seed: int, streams, first_block: int, n_blocks: int, device) -> torch.Tensor:
    """The words of blocks first_block … + n_blocks − 1 of each stream: int32 [T, n_blocks·BLOCK_WORDS], a view
    of a reused buffer. Word j of a block: h = ((C_j + k1)·M1 ⊕ k2), then h ^= h >>> 15, h *= M2, h ^= h >>> 16
    (logical shifts: the arithmetic one with its sign copies masked off), C_j the cached lowbias32(j)."""
    s16, s15, low16, low17, mul1, mul2 = _constants(device)
    t = len(streams)
    shape = (t, n_blocks, BLOCK_WORDS)
    h = buffer("words", t * n_blocks * BLOCK_WORDS, torch.int32, device).view(shape)
    tmp = buffer("shifted", h.numel(), torch.int32, device).view(shape)
    k1, k2 = _block_keys(seed, streams, first_block, n_blocks, device)
    torch.add(_mixed_counters(device), k1, out=h)  # int32 arithmetic wraps (mod 2³²)
    h.mul_(mul1).bitwise_xor_(k2)
    h.bitwise_xor_(torch.bitwise_right_shift(h, s15, out=tmp).bitwise_and_(low17))
    h.mul_(mul2)
    h.bitwise_xor_(torch.bitwise_right_shift(h, s16, out=tmp).bitwise_and_(low16))
    return h.view(t, n_blocks * BLOCK_WORDS)


def _threshold(p: float) -> int:
    """16-bit values ≥ this are kept: probability 1 − p (to 2⁻¹⁶)."""
    return min(round(p * 65536), 65536)


def keep_masks(seed: int, streams, shape: tuple, p: float, dtype: torch.dtype, device,
               out: Optional[torch.Tensor] = None, times: Optional[torch.Tensor] = None,
               kept: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The keep masks of dropout terms on one input: 1 where an element is kept, 0 where dropped (optionally ⊙ x).

    Args:
        seed: the fused call's seed; streams: the terms' indices among the call's dropout terms (T of them).
        shape: the input's shape (any; elements in row-major order); p: the dropout probability.
        dtype: the masks' dtype (x's to multiply by them, or int8 to keep them: either stays vectorised, unlike
            bool); device: where to build them.
        out: a contiguous tensor [T, *shape] of `dtype` to write into, or None for a new one.
        times: None, or a contiguous tensor x of `shape`: `out` then holds mask_t ⊙ x, multiplied chunk by chunk
            while the chunk's masks are still in cache.
        kept: None, or a contiguous int8 tensor [T, *shape] that also receives the masks.
    Returns:
        `out` (or a new contiguous tensor [T, *shape] of `dtype`): the masks, or mask_t ⊙ x.
    """
    n = 1
    for d in shape:
        n *= d
    streams = list(streams)
    t = len(streams)
    out = torch.empty((t, *shape), dtype=dtype, device=device) if out is None else out
    flat, x_flat = out.view(t, n), times.reshape(n) if times is not None else None
    cut = _threshold(p) - 32768  # compare the halves as signed int16: u ≥ t ⇔ u − 2¹⁵ ≥ t − 2¹⁵
    if cut > 32767:  # p rounds to 1: nothing kept
        if kept is not None:
            kept.zero_()
        return out.zero_()
    cut = torch.tensor(cut, dtype=torch.int16, device=device)
    n_blocks = -(-n // (2 * BLOCK_WORDS))
    step = max(CHUNK_WORDS // (t * BLOCK_WORDS), 1)  # blocks per chunk
    for b0 in range(0, n_blocks, step):
        nb = min(step, n_blocks - b0)
        lo, hi = 2 * BLOCK_WORDS * b0, min(2 * BLOCK_WORDS * (b0 + nb), n)
        halves = _hash_blocks(seed, streams, b0, nb, device).view(torch.int16)[:, :hi - lo]  # [T, ≤ 2·nb·BLOCK]
        if kept is not None:
            torch.ge(halves, cut, out=kept.view(t, n)[:, lo:hi])
            flat[:, lo:hi].copy_(kept.view(t, n)[:, lo:hi])
        else:
            torch.ge(halves, cut, out=flat[:, lo:hi])
        if x_flat is not None:
            flat[:, lo:hi].mul_(x_flat[lo:hi])
    return out


def _a_rows(h: torch.Tensor, xd: torch.Tensor, a: torch.Tensor, scale: float) -> None:
    """h [N, r] (any strides; a rank-major buffer's transposed rows) = scale·xd·Aᵀ, in place."""
    if h.stride(0) == 1:  # a transposed view of contiguous [r, N] rows: the rank-major GEMM form
        h.t().addmm_(a, xd.t(), beta=0, alpha=scale)
    else:
        h.addmm_(xd, a.t(), beta=0, alpha=scale)


def runs_down(x2: torch.Tensor, h: torch.Tensor, runs, params, seed: int) -> tuple:
    """The fused linear's forward for its dropout terms: each term's columns of h = (x ⊙ m_t)·A_tᵀ / (1 − p).
    A run's terms (q/k/v's, one rank and one p) draw their masks together: one op per hash step for all of them.

    Args:
        x2: the input [N, in]; h: the fused call's h [N, R] (any strides), written in place.
        runs: (first column of h, r, p, indices of the terms' A in params, first stream) per run of terms.
        params: the fused call's parameters; seed: the call's seed.
    Returns:
        Each run's int8 masks [n_terms, N, in] in order when KEEP_MASKS, else ().
    """
    kept = []
    for col, r, p, a_idx, stream in runs:
        t = len(a_idx)
        xd = buffer("mask", t * x2.numel(), x2.dtype, x2.device).view(t, *x2.shape)  # [T, N, in]
        masks = torch.empty((t, *x2.shape), dtype=torch.int8, device=x2.device) if KEEP_MASKS else None
        keep_masks(seed, range(stream, stream + t), x2.shape, p, x2.dtype, x2.device, out=xd, times=x2, kept=masks)
        for i, ai in enumerate(a_idx):  # (x ⊙ m_t)·A_tᵀ / (1 − p)
            _a_rows(h[:, col + i * r:col + (i + 1) * r], xd[i], params[ai], 1.0 / (1.0 - p))
        if masks is not None:
            kept.append(masks)
    return tuple(kept)


def runs_back(x2: torch.Tensor, norm, gh_t: torch.Tensor, dx2, runs, params, needs, seed: int, out: list,
              kept: tuple = ()) -> None:
    """The fused linear's backward for its dropout terms, masks as forward drew them:
    dx2 += Σ_t ((gH_tᵀ·A_t) ⊙ m_t) / (1 − p) in place, and out[A_t] = gH_t·(x ⊙ m_t) / (1 − p) where needed.

    Args:
        x2: the saved input [N, in] (an RMSNorm's input when norm is given); norm: None or (rstd, w, offset).
        gh_t: the gradient of h, rank-major [R, N] (the terms' rows are scaled in place for dA).
        dx2: the input's gradient [N, in], or None.
        runs, params, seed: as given to runs_down; needs: per parameter, whether its gradient is needed.
        out: the gradients per parameter, filled in for the terms' A.
        kept: what runs_down returned: the int8 masks per run, or () to draw them again from the seed.
    """
    rstd, norm_w, offset = norm if norm is not None else (None, None, 0.0)
    gx = buffer("gx", x2.numel(), x2.dtype, x2.device).view(x2.shape) if dx2 is not None else None  # [N, in]
    for j, (col, r, p, a_idx, stream) in enumerate(runs):
        t, scale = len(a_idx), 1.0 / (1.0 - p)
        mask = buffer("mask", t * x2.numel(), x2.dtype, x2.device).view(t, *x2.shape)  # [T, N, in]
        if kept:
            mask.copy_(kept[j])  # int8 → x's dtype (a vectorised cast)
        else:
            keep_masks(seed, range(stream, stream + t), x2.shape, p, x2.dtype, x2.device, out=mask)
        if dx2 is not None:
            for i, ai in enumerate(a_idx):
                torch.mm(gh_t[col + i * r:col + (i + 1) * r].t(), params[ai], out=gx)  # gH_tᵀ·A_t
                dx2.addcmul_(gx, mask[i], value=scale)
        if any(needs[ai] for ai in a_idx):
            xd = mask.mul_(x2)  # [T, N, in]: x ⊙ m_t
            for i, ai in enumerate(a_idx):
                if needs[ai]:
                    g = gh_t[col + i * r:col + (i + 1) * r]  # [r, N]
                    out[ai] = grad_a(g, xd[i], rstd, norm_w, offset, norm is not None).mul_(scale)  # [r, in]
