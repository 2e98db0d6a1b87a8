"""Dropout terms of the fused linear on CPU: masks from a counter-based hash in torch's integer ops, drawn from the
call's seed inside the fused function (the CPU twin of dropout_kernels.py; dropout.MASK_SOURCE "hash").

A dropout term t reads xd_t = x ⊙ m_t / (1 − p). Its mask is a function of (seed, stream, element) alone. The
flattened input's elements pair into 32-bit words (elements 2w and 2w + 1 take word w's two 16-bit halves, as
torch's int16 view lays them out); words group into blocks of BLOCK_WORDS = 2¹⁶, and each (seed, stream, block)
gets two 32-bit keys (k1, k2) by SplitMix64. Word j of a block is
    C_j = lowbias32(j)                                      (cached once: the block's counters, well mixed)
    h = (C_j + k1)·M1 ⊕ k2;  h ^= h >>> 15;  h *= M2;  h ^= h >>> 16                   (all mod 2³²)
(lowbias32: C. Wellons' two-multiply xorshift hash, github.com/skeeto/hash-prospector, whose multipliers M1, M2 and
shifts the keyed rounds reuse). Every step is a bijection of the word, so for one key the 2¹⁶ words of a block give
2¹⁶ distinct 32-bit values. An element is kept when its 16-bit value ≥ round(p·2¹⁶): keep probability 1 − p to
2⁻¹⁶, the quantisation of the CUDA kernels. `seed` is drawn once per fused call from torch's default CPU
generator, so torch.manual_seed repeats a run and checkpoint recomputation (which restores the RNG) replays it;
`stream` is the term's index among the call's dropout terms, so each adapted layer of a q/k/v group draws its own
mask. tests/test_fast_dropout_hash.py checks the keep rate per lane and the independence of neighbouring
elements, words, rows, terms and seeds.

Why a hash: on CPU, torch's Bernoulli sampling and its mt19937 random bits are scalar loops (one thread,
2048×384: bernoulli_ 9.2 ms; 16 random bits per element from randint 1.8 ms), while the keyed rounds are 9
vectorised int32 ops over half as many words, chunk by chunk in cache (the whole mask ⊙ x, comparison included,
~1.3 ms). Masks are 0/1 in int8 or in x's dtype (a comparison written straight into them): a product with a bool
mask costs ~30× more on CPU (an unvectorised cast).

Per run of terms (q/k/v's: one rank, one p), forward: the masks of all its terms at once, kept as int8 (1 byte per
element; nn.Dropout's autograd keeps a bool mask and the dropped input), xd_t = m_t ⊙ x formed chunk by chunk in a
reused buffer, h_t = (A_t·xd_tᵀ)/(1 − p) (a GEMM alpha). Backward: the masks in x's dtype again (a vectorised
int8 cast), dx += ((gH_tᵀ·A_t) ⊙ m_t)/(1 − p) (one addcmul_), dA_t = gH_t·(m_t ⊙ x)/(1 − p) through
lora_grads.grad_a (an RMSNorm recipe's x is its input, rescaled as there). With KEEP_MASKS off nothing of x's
size is kept and backward draws the masks again from the seed (slower: the hash is the path's main cost).

Where fp32 tensors meet a built C kernel (dropout_native.py: Linux with a C compiler, an AVX2 CPU), both
directions run there instead: the same masks bit for bit, drawn again in backward (nothing of x's size kept;
KEEP_MASKS concerns the torch ops alone); on the 2-core box forward 3-4.4x and backward 1.7-2.3x faster than these
ops (BENCHMARKS.md). LORAKIT_NATIVE=0 keeps the torch ops.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from . import dropout_native

_M32, _M64 = 2**32 - 1, 2**64 - 1
# Words hashed per chunk (all of a run's terms together): the chunk's words and their shifted copy stay in cache
# while its ops run; far smaller chunks pay torch's per-op overhead (~5-10 µs) too often. Measured on one thread,
# one MiniLM layer's masks ⊙ x (q/k/v, o, fc1 at 2048×384, fc2 at 2048×1536): 2¹⁶ words 13.8 ms, 2¹⁷ 12.1,
# 2¹⁸ 11.5, 2¹⁹ 10.8, 2²⁰ 12.0 (a busy box: ±5%).
CHUNK_WORDS = 2**18
BLOCK_WORDS = 2**16  # words under one pair of keys (part of the masks' definition; CHUNK_WORDS is a multiple)
_COUNTERS: dict = {}  # device → a block's counters C_j·M1, C_j = lowbias32(j): int32 [BLOCK_WORDS] (read-only)
_CONSTANTS: dict = {}  # device → the hash's constants as 0-dim int32 tensors (read-only)
# Keep each term's mask from forward to backward as int8 (1 byte per element; nn.Dropout keeps a bool mask and
# the dropped input, 5 bytes in fp32) rather than drawing it again: the hash is the path's main cost.
KEEP_MASKS = True
_LOCAL = threading.local()  # per thread: reused buffers (fresh multi-MiB tensors pay page faults on every call)


def _signed32(v: int) -> int:
    """v mod 2³² as a signed 32-bit Python int (what an int32 tensor op takes)."""
    v &= _M32
    return v - 2**32 if v >= 2**31 else v


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
    """C_j·M1 with C_j = lowbias32(j), for j < BLOCK_WORDS: int32 [BLOCK_WORDS], computed once per device
    (read-only). (C_j + k1)·M1 = C_j·M1 + k1·M1: the keyed round's first multiply is paid here, once."""
    device = torch.device(device)
    have = _COUNTERS.get(device)
    if have is None:
        with torch.inference_mode(False):
            h = torch.arange(BLOCK_WORDS, dtype=torch.int64, device=device)
            for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):  # lowbias32, in int64 mod 2³²
                h ^= h >> shift
                if mul is not None:
                    h = (h * mul) & _M32
            h = (h * 0x7FEB352D) & _M32  # · M1
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
    """The keys (k1·M1, k2) of blocks first_block … + n_blocks − 1 of each stream: two int32 [T, n_blocks, 1]."""
    keys = [[block_keys(seed, s, b) for b in range(first_block, first_block + n_blocks)] for s in streams]
    k1 = torch.tensor([[[_signed32(k * 0x7FEB352D)] for k, _ in row] for row in keys], dtype=torch.int32,
                      device=device)  # k1·M1
    k2 = torch.tensor([[[k] for _, k in row] for row in keys], dtype=torch.int32, device=device)
    return k1, k2


def _hash_blocks(k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """The words of the blocks whose keys are k1, k2 (int32 [T, blocks, 1], from _block_keys): int32
    [T, blocks·BLOCK_WORDS], a view of a reused buffer. Word j of a block: h = ((C_j + k1)·M1 ⊕ k2), then
    h ^= h >>> 15, h *= M2, h ^= h >>> 16
    (logical shifts: the arithmetic one with its sign copies masked off), C_j the cached lowbias32(j)."""
    device = k1.device
    s16, s15, low16, low17, _, mul2 = _constants(device)
    t, n_blocks = k1.shape[0], k1.shape[1]
    shape = (t, n_blocks, BLOCK_WORDS)
    h = buffer("words", t * n_blocks * BLOCK_WORDS, torch.int32, device).view(shape)
    tmp = buffer("shifted", h.numel(), torch.int32, device).view(shape)
    torch.add(_mixed_counters(device), k1, out=h).bitwise_xor_(k2)  # (C_j + k1)·M1 ⊕ k2; int32 ops wrap mod 2³²
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
    streams = list(streams)
    out = torch.empty((len(streams), *shape), dtype=dtype, device=device) if out is None else out
    for _ in _fill(seed, streams, p, out, times, kept):
        pass
    return out


def _fill(seed: int, streams: list, p: float, out: torch.Tensor, times, kept):
    """keep_masks chunk by chunk: after each chunk, yields how many leading elements of the input it has filled."""
    t, n = out.shape[0], out[0].numel()
    flat, x_flat = out.view(t, n), times.reshape(n) if times is not None else None
    cut = _threshold(p) - 32768  # compare the halves as signed int16: u ≥ t ⇔ u − 2¹⁵ ≥ t − 2¹⁵
    if cut > 32767:  # p rounds to 1: nothing kept
        if kept is not None:
            kept.zero_()
        out.zero_()
        yield n
        return
    cut = torch.tensor(cut, dtype=torch.int16, device=out.device)
    n_blocks = -(-n // (2 * BLOCK_WORDS))
    k1, k2 = _block_keys(seed, streams, 0, n_blocks, out.device)  # [T, blocks, 1] each
    step = max(CHUNK_WORDS // (t * BLOCK_WORDS), 1)  # blocks per chunk
    for b0 in range(0, n_blocks, step):
        nb = min(step, n_blocks - b0)
        lo, hi = 2 * BLOCK_WORDS * b0, min(2 * BLOCK_WORDS * (b0 + nb), n)
        words = _hash_blocks(k1[:, b0:b0 + nb], k2[:, b0:b0 + nb])  # [T, nb·BLOCK]
        halves = words.view(torch.int16)[:, :hi - lo]  # [T, ≤ 2·nb·BLOCK]
        if kept is not None:
            torch.ge(halves, cut, out=kept.view(t, n)[:, lo:hi])
            flat[:, lo:hi].copy_(kept.view(t, n)[:, lo:hi])
        else:
            torch.ge(halves, cut, out=flat[:, lo:hi])
        if x_flat is not None:
            flat[:, lo:hi].mul_(x_flat[lo:hi])
        yield hi


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
    if dropout_native.takes(x2, params, runs) and h.dtype == torch.float32:  # compiled: nothing of x's size kept
        for col, r, p, a_idx, stream in runs:
            dropout_native.run_down(x2, h, col, r, p, a_idx, stream, params, seed, _threshold(p) - 32768)
        return ()
    kept = []
    for col, r, p, a_idx, stream in runs:
        t = len(a_idx)
        xd = buffer("mask", t * x2.numel(), x2.dtype, x2.device).view(t, *x2.shape)  # [T, N, in]
        masks = torch.empty((t, *x2.shape), dtype=torch.int8, device=x2.device) if KEEP_MASKS else None
        done = 0  # rows of h written: each chunk's complete rows go through the GEMMs while still in cache
        for filled in _fill(seed, list(range(stream, stream + t)), p, xd, x2, masks):
            rows = slice(done, filled // x2.shape[1])
            for i, ai in enumerate(a_idx if rows.stop > done else ()):  # (x ⊙ m_t)·A_tᵀ / (1 − p)
                _a_rows(h[rows, col + i * r:col + (i + 1) * r], xd[i, rows], params[ai], 1.0 / (1.0 - p))
            done = rows.stop
        if masks is not None:
            kept.append(masks)
    return tuple(kept)


def runs_back(x2: torch.Tensor, norm, gh_t: torch.Tensor, dx2, runs, params, needs, seed: int, out: list,
              kept: tuple = ()) -> None:
    """The fused linear's backward for its dropout terms, masks as forward drew them:
    dx2 += Σ_t ((gH_tᵀ·A_t) ⊙ m_t) / (1 − p) in place, and out[A_t] = gH_t·(x ⊙ m_t) / (1 − p) where needed,
    row block by row block (a block's masks, x and dx stay in cache across its products).

    Args:
        x2: the saved input [N, in] (an RMSNorm's input when norm is given); norm: None or (rstd, w, offset).
        gh_t: the gradient of h, rank-major [R, N].
        dx2: the input's gradient [N, in], or None.
        runs, params, seed: as given to runs_down; needs: per parameter, whether its gradient is needed.
        out: the gradients per parameter, filled in for the terms' A.
        kept: what runs_down returned: the int8 masks per run, or () to draw them again from the seed.
    """
    n_rows, k = x2.shape
    for j, (col, r, p, a_idx, stream) in enumerate(runs):
        t, scale = len(a_idx), 1.0 / (1.0 - p)
        need_a = [needs[ai] for ai in a_idx]
        if dx2 is None and not any(need_a):
            continue
        if not kept and _native_back(x2, norm, gh_t, dx2, params, runs[j], need_a, seed, out):
            continue
        g = gh_t[col:col + t * r].view(t, r, n_rows)  # [T, r, N]
        d_a = torch.zeros(t, r, k, dtype=_accumulator(x2.dtype), device=x2.device) if any(need_a) else None
        if kept:
            block = max(1, min(n_rows, 2 * CHUNK_WORDS // (t * k)))  # rows per block: ~CHUNK_WORDS words of mask
            masks = buffer("mask", t * block * k, x2.dtype, x2.device).view(t, block, k)  # [T, rows, in]
        else:  # drawn again, whole (the hash's blocks run along the flattened input)
            whole = buffer("mask", t * x2.numel(), x2.dtype, x2.device).view(t, n_rows, k)
            block, masks = n_rows, keep_masks(seed, range(stream, stream + t), x2.shape, p, x2.dtype, x2.device,
                                              out=whole)
        gx = buffer("gx", block * k, x2.dtype, x2.device).view(block, k) if dx2 is not None else None  # [rows, in]
        for r0 in range(0, n_rows, block):
            rows = slice(r0, min(r0 + block, n_rows))
            m = masks[:, :rows.stop - r0]  # [T, rows, in]
            if kept:
                m.copy_(kept[j][:, rows])  # int8 → x's dtype (a vectorised cast)
            _back_block(x2[rows], g[:, :, rows], m, dx2[rows] if dx2 is not None else None, gx, d_a,
                        None if norm is None else norm[0][rows], [params[ai] for ai in a_idx], need_a, scale)
        for i, ai in enumerate(a_idx):
            if need_a[i]:
                da = d_a[i] if norm is None else _norm_columns(d_a[i], norm[1], norm[2])
                out[ai] = da.mul_(scale).to(x2.dtype)  # [r, in]


def _native_back(x2, norm, gh_t, dx2, params, run, need_a, seed: int, out: list) -> bool:
    """runs_back's work for one run by the compiled kernel where it takes it (fp32 throughout, dx2 contiguous);
    False where it does not (the torch ops then draw the masks again)."""
    col, r, p, a_idx, stream = run
    rstd = None if norm is None else norm[0]
    if (gh_t.dtype != torch.float32 or (dx2 is not None and (dx2.dtype != torch.float32 or not dx2.is_contiguous()))
            or (rstd is not None and rstd.numel() != x2.shape[0])
            or not dropout_native.takes(x2, params, [run])):
        return False
    d_a = dropout_native.run_back(x2, rstd, gh_t[col:col + len(a_idx) * r], dx2, r, p, a_idx, stream, params,
                                  need_a, seed, _threshold(p) - 32768)
    for i, ai in enumerate(a_idx):
        if need_a[i]:
            da = d_a[i] if norm is None else _norm_columns(d_a[i], norm[1], norm[2])
            out[ai] = da.mul_(1.0 / (1.0 - p)).to(x2.dtype)  # [r, in]
    return True


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _norm_columns(d_a: torch.Tensor, norm_w: torch.Tensor, offset: float) -> torch.Tensor:
    """dA·diag(w + offset): an RMSNorm recipe's column scale (lora_grads.grad_a)."""
    return d_a.mul_(norm_w) if offset == 0 else torch.addcmul(d_a, d_a, norm_w)


def _back_block(x_rows, g, m, dx_rows, gx, d_a, rstd_rows, a_list, need_a, scale: float) -> None:
    """One row block of runs_back: dx_rows += Σ_t ((g_tᵀ·A_t) ⊙ m_t)·scale; d_a_t += g_t·(m_t ⊙ x_rows) (the rows
    of gH scaled by rstd first under an RMSNorm recipe). g [T, r, rows]; m [T, rows, in] (overwritten)."""
    n = m.shape[1]
    if dx_rows is not None:
        for i, a in enumerate(a_list):
            torch.mm(g[i].t(), a, out=gx[:n])  # gH_tᵀ·A_t [rows, in]
            dx_rows.addcmul_(gx[:n], m[i], value=scale)
    if d_a is None:
        return
    xd = m.mul_(x_rows)  # [T, rows, in]: x ⊙ m_t
    for i, need in enumerate(need_a):
        if need:
            gi = g[i] if rstd_rows is None else (g[i] * rstd_rows).to(xd.dtype)  # [r, rows]
            if d_a.dtype == xd.dtype:
                d_a[i].addmm_(gi, xd[i])
            else:
                d_a[i].add_(gi @ xd[i])
