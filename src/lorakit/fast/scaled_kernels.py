"""The per-output stages of the fused linear's output-scaled term (Delta.scaled_linear_factors: a magnitude m over
a row norm, f = m / norm per output column), each in one Triton pass where a kernel may run (CUDA, or CPU tensors
under Triton's interpreter; lorakit.triton_gate), else today's torch math:

  row_norm        ‖W_i + s·(B·A)_i‖ float32 [out] in one launch: each program reads a block of W's rows once, forms
                  each tile of W + s·B·A (a rank-r tl.dot, 16-bit operands multiplying exactly into fp32) and sums
                  its squares in fp32. No fp32 copy of W, nothing of W's size written.
  scale_output    y = f ⊙ z (+ b),  z = x·Wᵀ + s·h·Bᵀ                 forward, [N, out]: given the base GEMM's
                  output, each tile adds the term's up-projection s·h·Bᵀ itself (a rank-r tl.dot, rounded to the
                  output dtype as addmm_ rounds) and scales it: one pass where LoRA has its addmm_ pass, so the
                  forward costs what LoRA's does; the base GEMM's output is what backward is given (takes_up)
  scale_grads     dZ = dY ⊙ f,  dm = Σ_rows dY ⊙ z / norm,  db = Σ_rows dY
                  backward: one pass reads dY and the saved output (z rebuilt tile by tile) and writes dZ; each
                  program sums a strip of rows in fp32 into per-strip partials, which one small kernel sums in a
                  fixed order (deterministic, no atomics), divides by the norm and casts to m's (and b's) dtype.
f is formed in every kernel from m and norm as the torch path forms it, m / norm.to(m.dtype) rounded to m's dtype,
so no f, cast of the norm or product of the output's size is ever stored. float64, LORAKIT_TRITON=0, CPU tensors
outside the interpreter, and torch.compile's tracing keep the torch math.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import triton_gate
from ..triton_gate import tl, triton, cdiv, next_power_of_2
from ..triton_launch import cached_launch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 keeps the torch path (exact tests)
# Tile sizes and warps from the sm_90 builds' register counts (cuobjdump): no spills, at least two programs per SM.
TILE = (32, 128)  # rows × columns of a forward tile (8 warps, bf16: 58 registers; 64 with an r=16 up-projection)
BACK_TILE = (16, 128)  # a backward row step (8 warps, bf16: 70 registers; 88 with the up-projection)
WARPS = 8
# row_norm: 16 rows of W per program, 256 columns a step, 8 warps, 3 stages: the fastest of 54 settings on the 1B
# and 8B Llama weights, r=16 bf16, 3.0-3.5x the former W·Aᵀ form (BENCHMARKS.md). Fewer columns where A's tile
# [r, columns] would pass NORM_A_TILE_BYTES a stage (a high rank, float32), so shared memory holds three stages.
NORM_ROWS, NORM_COLS, NORM_WARPS, NORM_STAGES, NORM_A_TILE_BYTES = 16, 256, 8, 3, 32768
NORM_SMEM_BYTES = 160 * 1024  # beyond this A's stages would not fit an H100/H200's shared memory: torch math
PROGRAMS_PER_SM = 4  # the backward splits rows into strips until there are this many programs per SM
MAX_UP_RANK = {torch.float32: 32}  # the largest r whose up-projection the scale kernels take (h and B tiles in
DEFAULT_MAX_UP_RANK = 64  # registers; float32 at r = 64 spills)
FINISH_BLOCK = (32, 128)  # strips × columns per step of the partial-sum kernel

if triton is not None:

    @triton.jit
    def _factor(m_ptr, norm_ptr, cols, col_ok):
        """f [BN] float32 holding m / norm.to(m.dtype) rounded to m's dtype (the torch path's f)."""
        m = tl.load(m_ptr + cols, mask=col_ok, other=0.0)  # [BN], m's dtype
        norm = tl.load(norm_ptr + cols, mask=col_ok, other=1.0).to(m.dtype)  # [BN]
        return (m.to(tl.float32) / norm.to(tl.float32)).to(m.dtype).to(tl.float32)

    @cached_launch
    @triton.jit
    def _row_norm(w_ptr, a_ptr, b_ptr, norm_ptr, n_out, K, stride_w0, stride_w1, stride_b0, stride_b1, s,
                  R: tl.constexpr, RP: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr, MIXED: tl.constexpr,
                  PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BO + tl.arange(0, BO)  # [BO] output rows of W
        offs_r = tl.arange(0, RP)  # [RP]
        offs_k = tl.arange(0, BK)  # [BK]
        row_ok = rows < n_out
        r_ok = offs_r < R
        rows64 = rows.to(tl.int64)
        bb = tl.load(b_ptr + rows64[:, None] * stride_b0 + offs_r[None, :] * stride_b1,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BO, RP], read once
        if MIXED:  # W, A and B not all of one dtype: the product in float32
            bb = bb.to(tl.float32)
        acc = tl.zeros((BO, BK), dtype=tl.float32)  # [BO, BK] Σ (W + s·B·A)² by column, summed at the end
        for k0 in range(0, K, BK):
            cols = k0 + offs_k
            k_ok = cols < K
            wb = tl.load(w_ptr + rows64[:, None] * stride_w0 + cols[None, :] * stride_w1,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BO, BK]
            ab = tl.load(a_ptr + offs_r[:, None] * K + cols[None, :], mask=r_ok[:, None] & k_ok[None, :],
                         other=0.0)  # [RP, BK]
            if MIXED:
                ab = ab.to(tl.float32)
            v = wb + s * tl.dot(bb, ab, input_precision=PRECISION)  # [BO, BK] W + s·B·A, this tile
            acc += v * v
        tl.store(norm_ptr + rows, tl.sqrt(tl.sum(acc, 1)), mask=row_ok)

    @triton.jit
    def _up_tile(u_ptr, cols, col_ok, stride_u0, stride_u1, R: tl.constexpr, RP: tl.constexpr):
        """Bᵀ [RP, BN] for these output columns (rows ≥ R zero)."""
        offs_r = tl.arange(0, RP)  # [RP]
        return tl.load(u_ptr + cols.to(tl.int64)[None, :] * stride_u0 + offs_r[:, None] * stride_u1,
                       mask=(offs_r < R)[:, None] & col_ok[None, :], other=0.0)

    @triton.jit
    def _z_tile(z_ptr, h_ptr, ub, rows64, cols, row_ok, col_ok, stride_z, stride_h0, stride_h1, s, R: tl.constexpr,
                RP: tl.constexpr, HAS_UP: tl.constexpr, PRECISION: tl.constexpr):
        """z [BM, BN] float32: the given output tile, plus s·h·Bᵀ (ub = Bᵀ [RP, BN]; rounded to z's dtype, as
        addmm_ rounds its output) where the term's up-projection is folded in."""
        z = tl.load(z_ptr + rows64[:, None] * stride_z + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0)  # [BM, BN]
        if HAS_UP:
            offs_r = tl.arange(0, RP)  # [RP]
            hb = tl.load(h_ptr + rows64[:, None] * stride_h0 + offs_r[None, :] * stride_h1,
                         mask=row_ok[:, None] & (offs_r < R)[None, :], other=0.0)  # [BM, RP]
            up = tl.dot(hb, ub, input_precision=PRECISION)  # [BM, BN] h·Bᵀ
            z = (z.to(tl.float32) + s * up).to(z_ptr.dtype.element_ty)
        return z.to(tl.float32)

    @cached_launch
    @triton.jit
    def _scale_fwd(z_ptr, y_ptr, m_ptr, norm_ptr, b_ptr, h_ptr, u_ptr, n_rows, n_cols, stride_z, stride_y, stride_h0,
                   stride_h1, stride_u0, stride_u1, s, R: tl.constexpr, RP: tl.constexpr, HAS_UP: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)  # [BM]
        cols = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN]
        row_ok = rows < n_rows
        col_ok = cols < n_cols
        rows64 = rows.to(tl.int64)
        f = _factor(m_ptr, norm_ptr, cols, col_ok)  # [BN]
        ub = _up_tile(u_ptr, cols, col_ok, stride_u0, stride_u1, R, RP) if HAS_UP else None  # [RP, BN]
        z = _z_tile(z_ptr, h_ptr, ub, rows64, cols, row_ok, col_ok, stride_z, stride_h0, stride_h1, s, R, RP, HAS_UP,
                    PRECISION)  # [BM, BN]
        y = z * f[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @cached_launch
    @triton.jit
    def _scale_back(g_ptr, z_ptr, dz_ptr, m_ptr, norm_ptr, part_ptr, h_ptr, u_ptr, n_rows, n_cols, strip_rows,
                    stride_g, stride_z, stride_dz, stride_h0, stride_h1, stride_u0, stride_u1, s, R: tl.constexpr,
                    RP: tl.constexpr, HAS_UP: tl.constexpr, NEED_DM: tl.constexpr, NEED_DB: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
        strip = tl.program_id(0)
        first = strip * strip_rows
        cols = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN]
        col_ok = cols < n_cols
        f = _factor(m_ptr, norm_ptr, cols, col_ok)  # [BN]
        ub = _up_tile(u_ptr, cols, col_ok, stride_u0, stride_u1, R, RP) if HAS_UP else None  # [RP, BN], read once
        acc_m = tl.zeros((BM, BN), dtype=tl.float32)  # Σ_rows dY ⊙ z, summed over its rows at the end
        acc_b = tl.zeros((BM, BN), dtype=tl.float32)  # Σ_rows dY (no cross-thread reduction inside the loop)
        for m0 in range(first, tl.minimum(first + strip_rows, n_rows), BM):
            rows = m0 + tl.arange(0, BM)  # [BM]
            rows64 = rows.to(tl.int64)
            row_ok = rows < n_rows
            tile_ok = row_ok[:, None] & col_ok[None, :]
            g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            tl.store(dz_ptr + rows64[:, None] * stride_dz + cols[None, :], (g * f[None, :]).to(dz_ptr.dtype.element_ty),
                     mask=tile_ok)
            if NEED_DM:
                z = _z_tile(z_ptr, h_ptr, ub, rows64, cols, row_ok, col_ok, stride_z, stride_h0, stride_h1, s, R, RP,
                            HAS_UP, PRECISION)  # [BM, BN]
                acc_m += g * z
            if NEED_DB:
                acc_b += g
        part = part_ptr + strip.to(tl.int64) * 2 * n_cols  # this strip's [2, out] partials: Σ dY ⊙ z, Σ dY
        if NEED_DM:
            tl.store(part + cols, tl.sum(acc_m, 0), mask=col_ok)
        if NEED_DB:
            tl.store(part + n_cols + cols, tl.sum(acc_b, 0), mask=col_ok)

    @cached_launch
    @triton.jit
    def _finish(part_ptr, norm_ptr, dm_ptr, db_ptr, n_strips, n_cols, NEED_DM: tl.constexpr, NEED_DB: tl.constexpr,
                SB: tl.constexpr, BN: tl.constexpr):
        cols = tl.program_id(0) * BN + tl.arange(0, BN)  # [BN]
        col_ok = cols < n_cols
        offs_s = tl.arange(0, SB)  # [SB]
        dm = tl.zeros((SB, BN), dtype=tl.float32)  # [SB, BN]: strips s0 + i summed into row i, then over rows
        db = tl.zeros((SB, BN), dtype=tl.float32)
        for s0 in range(0, n_strips, SB):  # a fixed order: the same sums on every run
            strips = s0 + offs_s
            ok = (strips < n_strips)[:, None] & col_ok[None, :]
            part = part_ptr + strips.to(tl.int64)[:, None] * 2 * n_cols + cols[None, :]  # [SB, BN]
            if NEED_DM:
                dm += tl.load(part, mask=ok, other=0.0)
            if NEED_DB:
                db += tl.load(part + n_cols, mask=ok, other=0.0)
        if NEED_DM:
            norm = tl.load(norm_ptr + cols, mask=col_ok, other=1.0)
            tl.store(dm_ptr + cols, (tl.sum(dm, 0) / norm).to(dm_ptr.dtype.element_ty), mask=col_ok)
        if NEED_DB:
            tl.store(db_ptr + cols, tl.sum(db, 0).to(db_ptr.dtype.element_ty), mask=col_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    if not torch.cuda.is_available():  # the Triton interpreter, on CPU tensors
        return 4
    return torch.cuda.get_device_properties(index).multi_processor_count


def _kernels_run(*tensors: torch.Tensor) -> bool:
    """Kernels for these tensors: Triton may run on them, their dtypes have kernels, and torch.compile is not
    tracing (it fuses the torch math itself)."""
    return (all(t.dtype in KERNEL_DTYPES for t in tensors) and triton_gate.use_triton(*tensors)
            and not torch.compiler.is_compiling())


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


def _padded(r: int) -> int:
    return max(16, next_power_of_2(r))


def row_norm(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> Optional[torch.Tensor]:
    """‖W + s·B·A‖ per output row, float32 [out], by one kernel; None where no kernel may run (the caller then
    computes it its own way). Offered to Delta.scaled_linear_factors as its `row_norm`.

    Args:
        w: the base weight [out, in], any strides (GPT-2's Conv1D gives a transposed view).
        a: A [r, in]; b: B [out, r]; s: the term's scaling.
    Returns:
        The row norms, float32 [out], or None (no kernel here, or a float32 rank too high for its stages).
    """
    if w.dim() != 2 or a.dim() != 2 or not _kernels_run(w, a, b):
        return None
    n_out, k = w.shape
    r = a.shape[0]
    a = a.detach().contiguous()
    norm = torch.empty(n_out, device=w.device, dtype=torch.float32)
    if n_out == 0:
        return norm
    mixed = not (w.dtype == a.dtype == b.dtype)  # then the product in float32
    precision = "ieee" if mixed else _precision(a.dtype)
    rp, size = _padded(r), 4 if mixed else a.element_size()
    cols = max(32, min(NORM_COLS, next_power_of_2(NORM_A_TILE_BYTES // (rp * size) + 1) // 2))
    if rp * size * cols * NORM_STAGES > NORM_SMEM_BYTES:  # a rank too high for the stages (float32, r ≥ 512)
        return None
    _row_norm[(cdiv(n_out, NORM_ROWS),)](
        w, a, b, norm, n_out, k, w.stride(0), w.stride(1), b.stride(0), b.stride(1), float(s), R=r, RP=rp,
        BO=NORM_ROWS, BK=cols, MIXED=mixed, PRECISION=precision, num_warps=NORM_WARPS, num_stages=NORM_STAGES)
    return norm


def takes_up(z: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether scale_output / scale_grads will add a term's up-projection s·h·Bᵀ to z themselves (kernels run on
    these tensors, one dtype, r ≤ MAX_UP_RANK's bound): the caller then leaves z without it and passes `up`.

    Args:
        z: the output [..., out] before the term; h: the term's h [N, r]; b: its B [out, r].
    Returns:
        True when the kernels take the term.
    """
    return (h.shape[1] <= MAX_UP_RANK.get(z.dtype, DEFAULT_MAX_UP_RANK) and z.dtype == h.dtype == b.dtype
            and _kernels_run(z, h, b))


def _up_args(up, n_rows: int) -> tuple:
    """The kernels' (h, B, strides, s, R, RP, HAS_UP) for `up` = (h [N, r], B [out, r], s) or None."""
    if up is None:
        return (None, None, 0, 0, 0, 0, 0.0), dict(R=1, RP=16, HAS_UP=False)
    h, b, s = up
    assert h.shape[0] == n_rows
    r = h.shape[1]
    return (h, b, h.stride(0), h.stride(1), b.stride(0), b.stride(1), float(s)), dict(R=r, RP=_padded(r), HAS_UP=True)


def _with_up(z, up):
    """z + s·h·Bᵀ (a new tensor) for the torch math, or z itself without `up`."""
    if up is None:
        return z
    h, b, s = up
    return torch.addmm(z.reshape(-1, z.shape[-1]), h, b.t(), alpha=s).view(z.shape)


def _torch_output(z, m, norm, bias) -> torch.Tensor:
    f = m / norm.to(m.dtype)
    return torch.addcmul(bias, z, f) if bias is not None else z * f


def scale_output(z: torch.Tensor, m: torch.Tensor, norm: torch.Tensor, bias: Optional[torch.Tensor],
                 up: Optional[tuple] = None) -> torch.Tensor:
    """y = f ⊙ z (+ bias), f = m / norm.to(m.dtype): the forward of an output-scaled term.

    Args:
        z: the unscaled output [..., out] (x·Wᵀ + s·h·Bᵀ; without s·h·Bᵀ when `up` is given); m: the magnitude
            [out]; norm: the row norm float32 [out].
        bias: the base bias [out] (added after the scale) or None.
        up: None, or the term's (h [N, r], B [out, r], s) when takes_up said yes: s·h·Bᵀ is added to z's tile in
            the kernel (z itself is left as it is and is what backward is given).
    Returns:
        y, a new tensor of z's shape and dtype.
    """
    if not _kernels_run(z, m):
        return _torch_output(_with_up(z, up), m, norm, bias)
    z2 = z.reshape(-1, z.shape[-1])
    z2 = z2 if z2.stride(-1) == 1 else z2.contiguous()
    y = torch.empty_like(z2)
    bm, bn = TILE
    n_rows, n_cols = z2.shape
    up_args, up_consts = _up_args(up, n_rows)
    if z2.numel():
        _scale_fwd[(cdiv(n_rows, bm), cdiv(n_cols, bn))](
            z2, y, m, norm, bias if bias is not None else m, *up_args[:2], n_rows, n_cols, z2.stride(0), y.stride(0),
            *up_args[2:], **up_consts, HAS_BIAS=bias is not None, BM=bm, BN=bn, PRECISION=_precision(z.dtype),
            num_warps=WARPS)
    return y.view(z.shape)


def _torch_grads(g, z, m, norm, need_dm: bool, need_db: bool) -> tuple:
    norm_m = norm.to(m.dtype)
    dm = (g * z).sum(0).div_(norm_m) if need_dm else None
    db = g.sum(0) if need_db else None
    return g * (m / norm_m), dm, db


def scale_grads(g: torch.Tensor, z: torch.Tensor, m: torch.Tensor, norm: torch.Tensor, need_dm: bool,
                bias: Optional[torch.Tensor] = None, up: Optional[tuple] = None) -> tuple:
    """The backward of scale_output in one pass over dY and z: (dZ, dm, db).

    Args:
        g: dY [N, out]; z: the saved unscaled output [N, out]; m: the magnitude [out]; norm: float32 [out].
        need_dm: whether to compute dm. bias: the base bias when its gradient is wanted (for its dtype), else None.
        up: as given to scale_output: s·h·Bᵀ is added to z's tiles again (for dm), never stored.
    Returns:
        dZ = dY ⊙ f [N, out] in g's dtype; dm = Σ_rows dY ⊙ z / norm in m's dtype (or None);
        db = Σ_rows dY in the bias's dtype (or None).
    """
    need_db = bias is not None
    if not _kernels_run(g, z, m):
        return _torch_grads(g, _with_up(z, up) if need_dm else z, m, norm, need_dm, need_db)
    g = g if g.stride(-1) == 1 else g.contiguous()  # one copy, still fewer passes than the torch math
    z = z if z.stride(-1) == 1 else z.contiguous()
    n_rows, n_cols = g.shape
    dz = torch.empty(n_rows, n_cols, device=g.device, dtype=g.dtype)
    if n_rows == 0:  # nothing summed: zero gradients
        return dz, m.new_zeros(m.shape) if need_dm else None, bias.new_zeros(bias.shape) if need_db else None
    bm, bn = BACK_TILE
    col_blocks, row_blocks = cdiv(n_cols, bn), cdiv(n_rows, bm)
    strips = max(1, min(row_blocks, cdiv(PROGRAMS_PER_SM * _sm_count(g.device.index or 0), col_blocks)))
    strip_rows = cdiv(row_blocks, strips) * bm
    strips = cdiv(n_rows, strip_rows)
    part = torch.empty(strips, 2, n_cols, device=g.device, dtype=torch.float32)  # the needed halves all written
    up_args, up_consts = _up_args(up, n_rows)
    _scale_back[(strips, col_blocks)](
        g, z, dz, m, norm, part, *up_args[:2], n_rows, n_cols, strip_rows, g.stride(0), z.stride(0), dz.stride(0),
        *up_args[2:], **up_consts, NEED_DM=need_dm, NEED_DB=need_db, BM=bm, BN=bn, PRECISION=_precision(z.dtype),
        num_warps=WARPS)
    dm = torch.empty_like(m) if need_dm else None
    db = torch.empty_like(bias) if need_db else None
    if need_dm or need_db:
        sb, fbn = FINISH_BLOCK
        _finish[(cdiv(n_cols, fbn),)](
            part, norm, dm if need_dm else part, db if need_db else part, strips, n_cols, NEED_DM=need_dm,
            NEED_DB=need_db, SB=sb, BN=fbn, num_warps=4)
    return dz, dm, db
