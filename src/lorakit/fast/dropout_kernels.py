"""Dropout terms of the fused linear with the mask never stored: drawn in-kernel with Philox and drawn again,
identically, in backward (on CUDA, or on CPU tensors under Triton's interpreter; lorakit.triton_gate decides).

A dropout term t reads xd_t = x ⊙ m_t / (1 − p). Its mask bit for element (row, col) is a function of
(seed, stream, row, col) alone: one Philox4x32 call with the 64-bit key `seed` and the counter
(col // 8, row, stream, 0) gives 4×32 random bits, i.e. eight 16-bit values, one per column of the group of 8
(in a fixed order: tl.interleave of the words, then of each word's halves);
an element is kept when its value ≥ round(p·2¹⁶) (keep probability 1 − p to 2⁻¹⁶). Row and column sit in
separate 32-bit counter words, so there is no flat offset to overflow at N·in ≥ 2³¹, and any tile whose
columns start at a multiple of 8 draws the same bits. `seed` is drawn once per fused call from torch's
default CPU generator (torch.manual_seed repeats a run; checkpoint recomputation replays it); `stream` is
the term's index among the call's dropout terms.

Kernels, for a run of n terms of one rank r and one p whose A's are stacked as A_run [n·r, in]:
  drop_down  forward  h_t = (x ⊙ m_t)·A_tᵀ / (1 − p)                 [N, r] per term; no [N, in] write
  drop_back  backward dA_t = gh_t·(x ⊙ m_t) / (1 − p)                 [r, in]: each program sums a strip of
                                                                    rows in registers (fp32), strips summed
                                                                    after (deterministic, no atomics)
                      dx += Σ_t ((gh_tᵀ·A_t) ⊙ m_t) / (1 − p)         in place (read-modify-write), in the
                      same pass: each x tile read and each mask drawn once for both products
tl.dot needs every dimension ≥ 16: ranks are padded to RP = max(16, next power of two) with zero rows.
`dropout_mask` writes a kernel's mask, for tests that build the reference math with the same mask.
"""

from __future__ import annotations

import functools

import torch

from ..triton_gate import tl, triton, cdiv, next_power_of_2
from ..triton_launch import cached_launch

# Philox rounds: 7 is the fewest that Salmon et al. (SC'11) found Crush-resistant (BigCrush clean); 10 (Triton's
# and cuRAND's default) adds margin. The mask draw is the kernels' main ALU cost, and dropout needs no more.
PHILOX_ROUNDS = 7
# Tile settings (rows, columns, pipeline stages), in order of preference. The first is the fastest single setting
# of a sweep over the 1B step's four dropout groups (N = 8192 rows; in = 2048 with 3, 1 and 2 terms, in = 8192 with
# 1) on an H200, bf16 rank 16: 427 µs a layer in backward against 476 at (64, 64, 3), 138 in forward against 189 at
# 16 × 64 (BENCHMARKS.md, dropout kernels). Its shared memory grows with the rank, the terms and the element size
# (compiled for sm_90: backward fp32 rank 128 with 4 terms 352 KB, forward fp32 rank 256 ~300 KB, against 227 KB),
# so a launch that does not fit the GPU takes the next setting (_fitting). The forward's first setting takes
# 16 rows where 32 would leave SMs without a program.
BACK_TILES = ((32, 128, 2), (32, 64, 2), (16, 64, 2), (16, 32, 1))
DOWN_TILES = ((32, 128, 3), (16, 64, 3), (16, 32, 2))
PROGRAMS_PER_SM = 8  # the backward splits rows into strips until there are this many programs per SM
MAX_TERMS = 4  # dropout terms per backward launch (each keeps its dA accumulator in registers)

if triton is not None:

    @triton.jit
    def _keep(seed, stream, rows, k0, BM: tl.constexpr, BK: tl.constexpr, threshold, ROUNDS: tl.constexpr):
        """Bool [BM, BK]: which elements of rows `rows` [BM] and columns k0 … k0+BK (k0 % 8 == 0) are kept."""
        group = (k0 // 8 + tl.arange(0, BK // 8)).to(tl.uint32)  # [BK/8] column group
        c0 = tl.broadcast_to(group[None, :], (BM, BK // 8))  # [BM, BK/8]
        c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (BM, BK // 8))  # [BM, BK/8]
        c2 = c1 * 0 + stream.to(tl.uint32)  # [BM, BK/8]
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c1 * 0, ROUNDS)  # 4 × [BM, BK/8] uint32
        words = tl.interleave(tl.interleave(r0, r1), tl.interleave(r2, r3))  # [BM, BK/2]: 4 words per group
        halves = tl.interleave(words & 0xFFFF, words >> 16)  # [BM, BK]: 16-bit values, 8 per group
        return halves >= threshold  # [BM, BK]

    @cached_launch
    @triton.jit(do_not_specialize=["seed", "stream0", "threshold"])
    def _drop_down(x_ptr, a_ptr, h_ptr, seed, stream0, n_terms, n_rows, K, stride_xm, stride_hm, stride_hc, scale,
                   threshold, R: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                   ROUNDS: tl.constexpr, PRECISION: tl.constexpr, SEED_IN_MEMORY: tl.constexpr):
        if SEED_IN_MEMORY:  # a 1-element int64 tensor (drawn on the device: a CUDA graph's replay draws anew)
            key = tl.load(seed)
        else:
            key = seed
        t = tl.program_id(0) % n_terms  # the run's term: a row block's terms run side by side (x from L2)
        rows = (tl.program_id(0) // n_terms) * BM + tl.arange(0, BM)  # [BM]
        offs_r = tl.arange(0, RP)  # [RP]
        offs_k = tl.arange(0, BK)  # [BK]
        row_ok = rows < n_rows
        r_ok = offs_r < R
        x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
        a_ptrs = a_ptr + (t * R + offs_r).to(tl.int64)[None, :] * K + offs_k[:, None]  # [BK, RP]: A_tᵀ tile
        acc = tl.zeros((BM, RP), dtype=tl.float32)  # [BM, RP]
        for k0 in range(0, K, BK):
            k_ok = offs_k < K - k0
            xb = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
            keep = _keep(key, stream0 + t, rows, k0, BM, BK, threshold, ROUNDS)  # [BM, BK]
            ab = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # [BK, RP]
            xd = tl.where(keep, xb, tl.zeros_like(xb))  # [BM, BK], x's dtype
            acc = tl.dot(xd, ab, acc, input_precision=PRECISION)  # [BM, RP] += xd·A_tᵀ
            x_ptrs += BK
            a_ptrs += BK
        cols = (t * R + offs_r).to(tl.int64)  # [RP]: the term's columns of h_run
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :] * stride_hc  # [BM, RP]
        tl.store(h_ptrs, (acc * scale).to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _x_tile(x_ptr, rstd_ptr, w_ptr, rows64, cols, row_ok, col_ok, stride_xm, offset, RECIPE: tl.constexpr):
        """The linear's input tile [BM, BK]: x itself, or x·rstd·(w + offset) rebuilt (float32) from a norm's
        input."""
        xb = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0)  # [BM, BK]
        if RECIPE:
            rstd = tl.load(rstd_ptr + rows64, mask=row_ok, other=0.0)  # [BM] float32
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset  # [BK]
            xb = xb.to(tl.float32) * rstd[:, None] * w[None, :]  # [BM, BK]
        return xb

    @triton.jit
    def _store_da(da_ptr, da, t: tl.constexpr, R: tl.constexpr, offs_r, cols, r_ok, col_ok, K, scale):
        """The strip's partial dA_t [RP, BK] into its [n·r, in] slice of the partials."""
        ranks = (t * R + offs_r).to(tl.int64)  # [RP]
        tl.store(da_ptr + ranks[:, None] * K + cols[None, :], da * scale, mask=r_ok[:, None] & col_ok[None, :])

    @cached_launch
    @triton.jit(do_not_specialize=["seed", "stream0", "threshold"])
    def _drop_back(x_ptr, rstd_ptr, w_ptr, a_ptr, gh_ptr, dx_ptr, da_ptr, seed, stream0, n_rows, K, strip_rows,
                   stride_xm, stride_dxm, stride_ghr, stride_das, offset, scale, threshold, TERMS: tl.constexpr,
                   R: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, NEED_DX: tl.constexpr,
                   NEED_DA: tl.constexpr, RECIPE: tl.constexpr, ROUNDS: tl.constexpr, PRECISION: tl.constexpr,
                   SEED_IN_MEMORY: tl.constexpr):
        # One program: a strip of rows × BK columns, row blocks in turn; dA_t summed in registers over the strip
        # (TERMS ≤ 4 accumulators), dx's tile read-modified-written once per row block.
        if SEED_IN_MEMORY:  # as in _drop_down
            key = tl.load(seed)
        else:
            key = seed
        first = tl.program_id(0) * strip_rows
        k0 = tl.program_id(1) * BK
        cols = k0 + tl.arange(0, BK)  # [BK]
        offs_r = tl.arange(0, RP)  # [RP]
        col_ok = cols < K
        r_ok = offs_r < R
        da0 = tl.zeros((RP, BK), dtype=tl.float32)  # [RP, BK] per term: Σ_rows gh_t·(x ⊙ m_t)
        da1 = tl.zeros((RP, BK), dtype=tl.float32)
        da2 = tl.zeros((RP, BK), dtype=tl.float32)
        da3 = tl.zeros((RP, BK), dtype=tl.float32)
        for m0 in range(first, tl.minimum(first + strip_rows, n_rows), BM):
            rows = m0 + tl.arange(0, BM)  # [BM]
            row_ok = rows < n_rows
            rows64 = rows.to(tl.int64)
            if NEED_DA:
                xb = _x_tile(x_ptr, rstd_ptr, w_ptr, rows64, cols, row_ok, col_ok, stride_xm, offset,
                             RECIPE).to(a_ptr.dtype.element_ty)  # [BM, BK] in the factors' dtype
            dx_acc = tl.zeros((BM, BK), dtype=tl.float32)  # [BM, BK]: Σ_t (gh_tᵀ·A_t) ⊙ m_t
            for t in tl.static_range(TERMS):
                keep = _keep(key, stream0 + t, rows, k0, BM, BK, threshold, ROUNDS)  # [BM, BK]
                ranks = (t * R + offs_r).to(tl.int64)  # [RP]: the term's rows of A_run and of gh
                gh = tl.load(gh_ptr + ranks[None, :] * stride_ghr + rows64[:, None],
                             mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, RP] (gh is rank-major)
                if NEED_DX:
                    ab = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=r_ok[:, None] & col_ok[None, :],
                                 other=0.0)  # [RP, BK]
                    gx = tl.dot(gh, ab, input_precision=PRECISION)  # [BM, BK] = gh_tᵀ·A_t
                    dx_acc += tl.where(keep, gx, 0.0)
                if NEED_DA:
                    xd = tl.where(keep, xb, tl.zeros_like(xb))  # [BM, BK], x's dtype
                    if t == 0:
                        da0 = tl.dot(tl.trans(gh), xd, da0, input_precision=PRECISION)  # [RP, BK] += gh_t·xd
                    if t == 1:
                        da1 = tl.dot(tl.trans(gh), xd, da1, input_precision=PRECISION)
                    if t == 2:
                        da2 = tl.dot(tl.trans(gh), xd, da2, input_precision=PRECISION)
                    if t == 3:
                        da3 = tl.dot(tl.trans(gh), xd, da3, input_precision=PRECISION)
            if NEED_DX:
                dx_ptrs = dx_ptr + rows64[:, None] * stride_dxm + cols[None, :]  # [BM, BK]
                tile_ok = row_ok[:, None] & col_ok[None, :]
                dx = tl.load(dx_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
                tl.store(dx_ptrs, (dx + dx_acc * scale).to(dx_ptr.dtype.element_ty), mask=tile_ok)
        if NEED_DA:
            da_ptr += tl.program_id(0).to(tl.int64) * stride_das  # this strip's partials [n·r, in]
            _store_da(da_ptr, da0, 0, R, offs_r, cols, r_ok, col_ok, K, scale)
            if TERMS > 1:
                _store_da(da_ptr, da1, 1, R, offs_r, cols, r_ok, col_ok, K, scale)
            if TERMS > 2:
                _store_da(da_ptr, da2, 2, R, offs_r, cols, r_ok, col_ok, K, scale)
            if TERMS > 3:
                _store_da(da_ptr, da3, 3, R, offs_r, cols, r_ok, col_ok, K, scale)

    @cached_launch
    @triton.jit(do_not_specialize=["seed", "stream", "threshold"])
    def _mask_kernel(out_ptr, seed, stream, n_rows, K, threshold, BM: tl.constexpr, BK: tl.constexpr,
                     ROUNDS: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)  # [BM]
        k0 = tl.program_id(1) * BK
        cols = k0 + tl.arange(0, BK)  # [BK]
        keep = _keep(seed, stream, rows, k0, BM, BK, threshold, ROUNDS)  # [BM, BK]
        mask = (rows < n_rows)[:, None] & (cols < K)[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], keep.to(tl.int8), mask=mask)


def _threshold(p: float) -> int:
    """16-bit values ≥ this are kept: probability 1 − p (to 2⁻¹⁶)."""
    return min(round(p * 65536), 65536)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


def _padded(r: int) -> int:
    return max(16, next_power_of_2(r))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    if not torch.cuda.is_available():  # the Triton interpreter, on CPU tensors
        return 4
    return torch.cuda.get_device_properties(index).multi_processor_count


def _down_rows(n_rows: int, n_terms: int, device: torch.device) -> int:
    """Rows per forward program at the first setting: 32 (the sweep's best at every group of the 1B step, 1 to 3
    terms), or 16 where 32 would leave SMs without a program."""
    return 32 if cdiv(n_rows, 32) * n_terms >= _sm_count(device.index or 0) else 16


_FITS: dict = {}  # (kernel, what sizes its shared memory, device) → index of the first tile setting that launched


def _fitting(key: tuple, tiles: tuple, launch):
    """launch(tile setting) with the first of `tiles` that fits the GPU's shared memory (Triton raises
    OutOfResources at a specialisation's first launch), remembered per key. Returns what the launch returns."""
    i = _FITS.get(key, 0)
    while True:
        try:
            out = launch(tiles[i])
            break
        except triton.runtime.errors.OutOfResources:
            if i + 1 == len(tiles):
                raise
            i += 1
    _FITS[key] = i
    return out


def drop_down(x2: torch.Tensor, a_run: torch.Tensor, h_run: torch.Tensor, seed: int, stream0: int, rank: int,
              p: float) -> None:
    """Forward of a run of dropout terms: h_run[:, t·r:(t+1)·r] = (x ⊙ m_t)·A_tᵀ / (1 − p), written in place.

    Args:
        x2: the input [N, in] (rows contiguous).
        a_run: the run's A's stacked [n·r, in], contiguous, in x2's dtype.
        h_run: [N, n·r] output, any strides (a slice of h, or a transposed view of a rank-major buffer).
        seed: the call's Philox key: an int, or a 1-element int64 tensor on x2's device holding it (drawn there
            while a CUDA graph is captured: dropout.draw_seed); stream0: the first term's stream (term t draws
            stream0 + t).
        rank: r of every term in the run; p: their dropout probability.
    """
    n_rows, k = x2.shape
    n_terms = a_run.shape[0] // rank
    if n_rows == 0:
        return
    first = (_down_rows(n_rows, n_terms, x2.device), *DOWN_TILES[0][1:])

    def launch(tile):
        bm, bk, stages = tile
        _drop_down[(cdiv(n_rows, bm) * n_terms,)](
            x2, a_run, h_run, seed, stream0, n_terms, n_rows, k, x2.stride(0), h_run.stride(0), h_run.stride(1),
            1.0 / (1.0 - p), _threshold(p), R=rank, RP=_padded(rank), BM=bm, BK=bk, ROUNDS=PHILOX_ROUNDS,
            PRECISION=_precision(x2.dtype), SEED_IN_MEMORY=type(seed) is not int, num_warps=4, num_stages=stages)
    _fitting(("down", x2.dtype, _padded(rank), first[0], x2.device), (first, *DOWN_TILES[1:]), launch)


def drop_back(x2: torch.Tensor, a_run: torch.Tensor, gh_run: torch.Tensor, dx2, need_da: bool, seed: int,
              stream0: int, rank: int, p: float, norm=None):
    """Backward of a run of at most MAX_TERMS dropout terms, masks drawn again as drop_down drew them:
    dx2 += Σ_t ((gh_tᵀ·A_t) ⊙ m_t) / (1 − p) in place, and dA = [gh_t·(x ⊙ m_t) / (1 − p)]_t.

    Args:
        x2: the input [N, in]; a_run: the stacked A's [n·r, in].
        gh_run: the gradient of the run's h columns, rank-major [n·r, N] (rows contiguous).
        dx2: the input's gradient [N, in] to add into, or None when not needed.
        need_da: whether to compute dA.
        seed, stream0, rank, p: as given to drop_down.
        norm: None, or (rstd float32 [N], w [in], offset) when x2 is an RMSNorm's input and the linear's input
            was x2·rstd·(w + offset) (fast/recipes.py): rebuilt tile by tile, never stored.
    Returns:
        dA float32 [n·r, in] (row strips summed in a fixed order: deterministic), or None without need_da.
    """
    n_rows, k = x2.shape
    n_terms = a_run.shape[0] // rank
    assert n_terms <= MAX_TERMS
    if n_rows == 0:
        return x2.new_zeros(a_run.shape, dtype=torch.float32) if need_da else None
    if dx2 is None and not need_da:
        return None
    rstd, w, offset = norm if norm is not None else (x2, x2, 0.0)  # placeholders, never read

    def launch(tile):
        bm, bk, stages = tile
        k_blocks, m_blocks = cdiv(k, bk), cdiv(n_rows, bm)
        strips = max(1, min(m_blocks, cdiv(PROGRAMS_PER_SM * _sm_count(x2.device.index or 0), k_blocks)))
        strip_rows = cdiv(m_blocks, strips) * bm
        strips = cdiv(n_rows, strip_rows)
        da = x2.new_empty(strips, n_terms * rank, k, dtype=torch.float32) if need_da else None  # all written
        _drop_back[(strips, k_blocks)](
            x2, rstd, w, a_run, gh_run, dx2 if dx2 is not None else x2, da if da is not None else gh_run, seed,
            stream0, n_rows, k, strip_rows, x2.stride(0), dx2.stride(0) if dx2 is not None else 0, gh_run.stride(0),
            da.stride(0) if da is not None else 0, float(offset), 1.0 / (1.0 - p), _threshold(p), TERMS=n_terms,
            R=rank, RP=_padded(rank), BM=bm, BK=bk, NEED_DX=dx2 is not None, NEED_DA=need_da, RECIPE=norm is not None,
            ROUNDS=PHILOX_ROUNDS, PRECISION=_precision(a_run.dtype), SEED_IN_MEMORY=type(seed) is not int,
            num_warps=4, num_stages=stages)
        return None if da is None else da[0] if strips == 1 else da.sum(0)
    key = ("back", a_run.dtype, _padded(rank), n_terms, dx2 is not None, need_da, norm is not None, x2.device)
    return _fitting(key, BACK_TILES, launch)


def _a_run(params, a_idx) -> torch.Tensor:
    """A run's A's stacked [n·r, in] (the parameter itself for one term)."""
    return params[a_idx[0]].contiguous() if len(a_idx) == 1 else torch.cat([params[i] for i in a_idx])


def runs_down(x2: torch.Tensor, h: torch.Tensor, runs, params, seed: int) -> tuple:
    """The fused linear's forward for its runs of in-kernel dropout terms: each run's columns of h, by drop_down.

    Args:
        x2: the input [N, in]; h: the fused call's h [N, R] (any strides), written in place.
        runs: (first column of h, r, p, indices of the terms' A in params, first stream) per run.
        params: the fused call's parameters; seed: the call's Philox key.
    Returns:
        () — nothing to keep for backward: the masks are drawn again there.
    """
    for col, r, p, a_idx, stream in runs:
        drop_down(x2, _a_run(params, a_idx), h[:, col:col + r * len(a_idx)], seed, stream, r, p)
    return ()


def runs_back(x2: torch.Tensor, norm, gh_t: torch.Tensor, dx2, runs, params, needs, seed: int, out: list,
              kept: tuple = ()) -> None:
    """The fused linear's backward for its runs of in-kernel dropout terms, masks drawn again:
    dx2 += Σ_t ((gH_t·A_t) ⊙ m_t) / (1 − p) in place, and out[A_t] = gH_t·(x ⊙ m_t) / (1 − p) where needed.

    Args:
        x2: the saved input [N, in] (an RMSNorm's input when norm is given); norm: None or (rstd, w, offset).
        gh_t: the gradient of h, rank-major [R, N]; dx2: the input's gradient [N, in], or None.
        runs, params, seed: as given to runs_down; needs: per parameter, whether its gradient is needed.
        out: the gradients per parameter, filled in for the terms' A.
        kept: what runs_down returned (nothing).
    """
    for col, r, p, a_idx, stream in runs:
        for first in range(0, len(a_idx), MAX_TERMS):  # at most MAX_TERMS terms per launch (dA in registers)
            part = a_idx[first:first + MAX_TERMS]
            c = col + first * r
            need_da = any(needs[i] for i in part)
            da = drop_back(x2, _a_run(params, part), gh_t[c:c + r * len(part)], dx2, need_da, seed, stream + first,
                           r, p, norm)
            if da is not None:
                da = da.to(params[part[0]].dtype)  # [n·r, in]
                for i, ai in enumerate(part):
                    if needs[ai]:
                        out[ai] = da[i * r:(i + 1) * r]


def dropout_mask(seed: int, stream: int, shape: tuple, p: float, device) -> torch.Tensor:
    """The keep mask the kernels draw for (seed, stream) over an [N, in] input (for tests and debugging).

    Args:
        seed: the Philox key (as the fused call drew it); stream: the term's index among the call's dropout terms.
        shape: (N, in); p: the dropout probability; device: where to run the kernel.
    Returns:
        A bool tensor [N, in], True where the element is kept.
    """
    n_rows, k = shape
    out = torch.empty(n_rows, k, dtype=torch.int8, device=device)
    if out.numel():
        _mask_kernel[(cdiv(n_rows, 64), cdiv(k, 128))](
            out, seed, stream, n_rows, k, _threshold(p), BM=64, BK=128, ROUNDS=PHILOX_ROUNDS)
    return out.bool()
