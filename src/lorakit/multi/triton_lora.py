"""Triton kernels for mixed-adapter LoRA on stacked adapters (Punica's SGMV and BGMV, in Triton).

All adapters of a layer live in one stack (see stack.py): A [S+1, R, in], Bᵀ [S+1, R, out]. One launch
serves every adapter of the batch; no Python loop over adapters or rows.

- SGMV (prefill): the batch is cut into tiles of ≤ BLOCK_M tokens that share an adapter (segment_tiles).
  One fused kernel: each program computes its tile's h = scale·x[tile]·A_slotᵀ ([BLOCK_M, R], in registers)
  and adds h·Bᵀ_slot to a range of output columns of y in place (fp32 accumulate). Programs that share a
  tile are launched next to each other, so the repeated x reads come from L2. (`sgmv_split` is the
  two-kernel form: shrink to h in memory, then expand.)
- BGMV (decode, one token per row): a split-K shrink (each program sums one chunk of a row's input columns into
  R fp32 partials) and an expand (each program adds h·Bᵀ to one block of a row's output columns, h summed from
  the partials in a fixed order, so results are deterministic).
A tile or row whose adapter has no stacked low-rank delta on this layer (slot_map[gid] < 0) does nothing.
Importing this module needs Triton (through lorakit.triton_gate); lorakit.multi.kernels imports it only
when Triton is installed.
"""

from __future__ import annotations

import functools

import torch

from ..triton_gate import tl, triton, cdiv
from ..triton_launch import cached_launch

BGMV_CHUNK = 512  # input columns per BGMV shrink program (4 iterations of 128)
BGMV_EXPAND = (512, 512, 2)  # BGMV expand: output columns per program, columns per step, warps (fastest of 96
# settings timed on an H200 at Llama-1B decode shapes, 64 rows: 5.4–8.7 µs per call for shrink + expand)


@triton.jit
def _tile(tiles_ptr, slot_map_ptr, t):
    """Decode tile t: (first token, number of tokens, slot); the count is 0 when the adapter has no slot here."""
    start = tl.load(tiles_ptr + 3 * t)
    count = tl.load(tiles_ptr + 3 * t + 1)
    slot = tl.load(slot_map_ptr + tl.load(tiles_ptr + 3 * t + 2))
    count = tl.where(slot >= 0, count, 0)
    return start.to(tl.int64), count, tl.maximum(slot, 0).to(tl.int64)


@triton.jit
def _shrink_tile(x_ptr, a_ptr, start, count, slot, K, stride_xm, stride_as,
                 R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """x[tile] · A_slotᵀ in fp32, unscaled: [BLOCK_M, R]; rows at or past `count` are 0."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < count
    x_ptrs = x_ptr + (start + offs_m)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    a_ptrs = a_ptr + slot * stride_as + offs_r[None, :] * K + offs_k[:, None]  # [BK, R] (A is [R, K] per slot)
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        xb = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        ab = tl.load(a_ptrs, mask=k_mask[:, None] & (count > 0), other=0.0)
        acc = tl.dot(xb.to(ab.dtype), ab, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    return acc


@cached_launch
@triton.jit
def _sgmv(x_ptr, a_ptr, bt_ptr, y_ptr, tiles_ptr, slot_map_ptr, scale_ptr, K, N, cols_per_program,
          stride_xm, stride_as, stride_bs, stride_ym,
          R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
          PRECISION: tl.constexpr):
    start, count, slot = _tile(tiles_ptr, slot_map_ptr, tl.program_id(1))
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    m_mask = offs_m < count
    acc = _shrink_tile(x_ptr, a_ptr, start, count, slot, K, stride_xm, stride_as, R, BLOCK_M, BLOCK_K, PRECISION)
    h = (acc * tl.load(scale_ptr + slot)).to(a_ptr.dtype.element_ty)  # [BM, R], rounded as the reference's h
    first = tl.program_id(0) * cols_per_program
    last = tl.minimum(first + cols_per_program, N)
    for n0 in range(first, last, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < last
        bb = tl.load(bt_ptr + slot * stride_bs + offs_r[:, None] * N + offs_n[None, :],
                     mask=n_mask[None, :] & (count > 0), other=0.0)  # [R, BN]
        out = tl.dot(h, bb, input_precision=PRECISION)
        mask = m_mask[:, None] & n_mask[None, :]
        y_ptrs = y_ptr + (start + offs_m)[:, None] * stride_ym + offs_n[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + out).to(y_ptr.dtype.element_ty), mask=mask)


@cached_launch
@triton.jit
def _sgmv_shrink(x_ptr, a_ptr, h_ptr, tiles_ptr, slot_map_ptr, scale_ptr, K, stride_xm, stride_as, stride_hm,
                 R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    start, count, slot = _tile(tiles_ptr, slot_map_ptr, tl.program_id(0))
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    m_mask = offs_m < count
    acc = _shrink_tile(x_ptr, a_ptr, start, count, slot, K, stride_xm, stride_as, R, BLOCK_M, BLOCK_K, PRECISION)
    acc = acc * tl.load(scale_ptr + slot)
    h_ptrs = h_ptr + (start + offs_m)[:, None] * stride_hm + offs_r[None, :]
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=m_mask[:, None])


@cached_launch
@triton.jit
def _sgmv_expand(h_ptr, bt_ptr, y_ptr, tiles_ptr, slot_map_ptr, N, stride_hm, stride_bs, stride_ym,
                 R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    start, count, slot = _tile(tiles_ptr, slot_map_ptr, tl.program_id(0))
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < count
    n_mask = offs_n < N
    hb = tl.load(h_ptr + (start + offs_m)[:, None] * stride_hm + offs_r[None, :], mask=m_mask[:, None], other=0.0)
    bb = tl.load(bt_ptr + slot * stride_bs + offs_r[:, None] * N + offs_n[None, :],
                 mask=n_mask[None, :] & (count > 0), other=0.0)  # [R, BN]
    acc = tl.dot(hb.to(bb.dtype), bb, input_precision=PRECISION)
    mask = m_mask[:, None] & n_mask[None, :]
    y_ptrs = y_ptr + (start + offs_m)[:, None] * stride_ym + offs_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


@cached_launch
@triton.jit
def _bgmv_shrink(x_ptr, a_ptr, part_ptr, gid_ptr, slot_map_ptr, K, stride_xm, stride_as,
                 R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row, part): the partial sums Σ_k A[slot, :, k]·x[row, k] over one CHUNK of the input columns,
    written to part[row, part, :] (fp32; summed in a fixed order by the expand kernel)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    gid = tl.load(gid_ptr + row)
    slot = tl.load(slot_map_ptr + tl.maximum(gid, 0))
    valid = (gid >= 0) & (slot >= 0)
    slot = tl.maximum(slot, 0).to(tl.int64)
    offs_r = tl.arange(0, R)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((R, BLOCK_K), dtype=tl.float32)
    for k0 in range(part * CHUNK, part * CHUNK + CHUNK, BLOCK_K):
        k_mask = (k0 + offs_k < K) & valid
        xv = tl.load(x_ptr + row * stride_xm + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + slot * stride_as + offs_r[:, None] * K + k0 + offs_k[None, :],
                     mask=k_mask[None, :], other=0.0).to(tl.float32)
        acc += av * xv[None, :]
    tl.store(part_ptr + (row * tl.num_programs(1) + part) * R + offs_r, tl.sum(acc, axis=1))


@cached_launch
@triton.jit
def _bgmv_expand(part_ptr, a_ptr, bt_ptr, y_ptr, gid_ptr, slot_map_ptr, scale_ptr, N, stride_bs, stride_ym,
                 R: tl.constexpr, PARTS: tl.constexpr, COLS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row, column range of COLS): h = scale·Σ_parts part[row] (rounded to the factors' dtype, as the
    reference rounds its h), then y[row, range] += h·Bᵀ[slot, :, range], BLOCK_N columns at a time."""
    row = tl.program_id(0).to(tl.int64)
    gid = tl.load(gid_ptr + row)
    slot = tl.load(slot_map_ptr + tl.maximum(gid, 0))
    valid = (gid >= 0) & (slot >= 0)
    slot = tl.maximum(slot, 0).to(tl.int64)
    offs_r = tl.arange(0, R)
    h = tl.zeros((R,), dtype=tl.float32)
    for p in tl.static_range(PARTS):
        h += tl.load(part_ptr + (row * PARTS + p) * R + offs_r, mask=(offs_r < R) & valid, other=0.0)
    h = (h * tl.load(scale_ptr + slot)).to(a_ptr.dtype.element_ty).to(tl.float32)
    for n0 in tl.static_range(0, COLS, BLOCK_N):
        offs_n = tl.program_id(1) * COLS + n0 + tl.arange(0, BLOCK_N)
        n_mask = (offs_n < N) & valid
        bv = tl.load(bt_ptr + slot * stride_bs + offs_r[:, None] * N + offs_n[None, :],
                     mask=n_mask[None, :], other=0.0).to(tl.float32)  # [R, BLOCK_N]
        y_ptrs = y_ptr + row * stride_ym + offs_n
        y = tl.load(y_ptrs, mask=n_mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + tl.sum(bv * h[:, None], axis=0)).to(y_ptr.dtype.element_ty),
                 mask=n_mask)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    if not torch.cuda.is_available():  # the Triton interpreter, on CPU tensors
        return 4
    return torch.cuda.get_device_properties(index).multi_processor_count


def sgmv(x2, y2, a, bt, scale, slot_map, tiles, block_m: int) -> None:
    """y2 [..., out] += per-tile LoRA of x2 [..., in]; tiles int32 [T, 3] (start, count, gid); slot_map int32 [G].
    x2 and y2 are contiguous, whatever their rank (no flattening view per call): token rows are `in` and `out`
    elements apart. Not stride(-2): torch calls a tensor contiguous whatever the stride of a size-1 dimension."""
    n_tiles = tiles.shape[0]
    if n_tiles == 0:
        return
    k_in, n_out = a.shape[2], bt.shape[2]
    key = (n_tiles, a.shape[1], k_in, n_out, block_m, a.dtype, x2.device.index)
    launch = _SGMV_LAUNCHES.get(key)
    if launch is None:
        if len(_SGMV_LAUNCHES) >= 4096:  # n_tiles varies with the batch's mix of adapters
            _SGMV_LAUNCHES.clear()
        launch = _SGMV_LAUNCHES[key] = _sgmv_launch(*key)
    grid, cols, meta = launch
    _sgmv[grid](x2, a, bt, y2, tiles, slot_map, scale, k_in, n_out, cols, k_in, a.stride(0), bt.stride(0), n_out,
                **meta)


_SGMV_LAUNCHES: dict = {}  # (tiles, rank, in, out, block_m, dtype, device) → (grid, columns per program, meta)


def _sgmv_launch(n_tiles, rank, k_in, n_out, block_m, dtype, device_index) -> tuple:
    """SGMV's grid and meta-parameters for one shape (cached: host time per launch, one launch per layer)."""
    block_n = 128
    blocks = cdiv(n_out, block_n)
    split = max(1, min(blocks, cdiv(4 * _sm_count(device_index or 0), n_tiles)))
    cols = cdiv(blocks, split) * block_n
    meta = dict(R=rank, BLOCK_M=block_m, BLOCK_K=64 if dtype == torch.float32 else 128, BLOCK_N=block_n,
                PRECISION=_precision(dtype), num_warps=4, num_stages=3)
    return (cdiv(n_out, cols), n_tiles), cols, meta


def sgmv_split(x2, y2, a, bt, scale, slot_map, tiles, block_m: int) -> None:
    """The two-kernel SGMV (shrink to h in memory, then expand); same arguments and result as sgmv."""
    n_tiles = tiles.shape[0]
    if n_tiles == 0:
        return
    rank, k_in, n_out = a.shape[1], a.shape[2], bt.shape[2]
    h = torch.empty(x2.shape[0], rank, device=x2.device, dtype=a.dtype)
    prec = _precision(a.dtype)
    block_k = 64 if a.dtype == torch.float32 else 128
    _sgmv_shrink[(n_tiles,)](x2, a, h, tiles, slot_map, scale, k_in, x2.stride(0), a.stride(0), h.stride(0),
                             R=rank, BLOCK_M=block_m, BLOCK_K=block_k, PRECISION=prec, num_warps=4, num_stages=3)
    block_n = 128
    _sgmv_expand[(n_tiles, cdiv(n_out, block_n))](
        h, bt, y2, tiles, slot_map, n_out, h.stride(0), bt.stride(0), y2.stride(0),
        R=rank, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=prec, num_warps=4, num_stages=2)


def bgmv(x2, y2, a, bt, scale, slot_map, token_gid) -> None:
    """y2 [N, out] += LoRA of x2 [N, in], one token per row; token_gid int32 [N] (-1: no adapter).

    Two launches: a split-K shrink (rows × input chunks of BGMV_CHUNK columns: enough programs to fill the GPU at
    decode batch sizes, each A element read once) and an expand over (rows × column blocks). One fused program
    per row computing h and then its columns (the previous form) read A once per column range and ran its
    K loop serially: ~29 µs per call for 64 rows on an H200, most of a 32-adapter decode step's LoRA time."""
    n_rows = x2.shape[0]
    if n_rows == 0:
        return
    rank, k_in, n_out = a.shape[1], a.shape[2], bt.shape[2]
    parts = cdiv(k_in, BGMV_CHUNK)
    partial = torch.empty(n_rows, parts, rank, device=x2.device, dtype=torch.float32)  # [N, parts, R]
    _bgmv_shrink[(n_rows, parts)](x2, a, partial, token_gid, slot_map, k_in, x2.stride(0), a.stride(0),
                                  R=rank, CHUNK=BGMV_CHUNK, BLOCK_K=128, num_warps=4)
    cols, block_n, warps = BGMV_EXPAND
    _bgmv_expand[(n_rows, cdiv(n_out, cols))](
        partial, a, bt, y2, token_gid, slot_map, scale, n_out, bt.stride(0), y2.stride(0),
        R=rank, PARTS=parts, COLS=cols, BLOCK_N=block_n, num_warps=warps)

