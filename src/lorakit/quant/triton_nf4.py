"""NF4 → bf16/fp16/fp32 dequantization in one Triton kernel (held to nf4.dequantize_nf4_reference).

One program handles BLOCK packed bytes = 2·BLOCK output values: it reads the bytes, the block scales
(double-quantized: code2[absmax code] · absmax2 + offset, as the reference computes it, with fp-fusion off so
that no FMA changes the rounding) and writes the values contiguously. Bytes read ≈ n/2, written n·2 (bf16):
memory-bound, one pass; cuBLAS then multiplies with the written matrix. Which dequantizer runs is decided
in dequant.py (through lorakit.triton_gate); without Triton this module defines no kernel.
"""

from __future__ import annotations

import torch

from ..triton_gate import tl, triton, cdiv
from ..triton_launch import cached_launch
from .nf4 import ABSMAX_BLOCK, NF4Tensor, _tables

if triton is not None:

    @cached_launch
    @triton.jit
    def _nf4_dequant_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr,
                            n_bytes, n_out, QBLOCK: tl.constexpr, ABLOCK: tl.constexpr, DOUBLE: tl.constexpr,
                            BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # byte index
        mask = offs < n_bytes
        byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        blk = offs // (QBLOCK // 2)  # both values of a byte lie in one block (QBLOCK is even)
        if DOUBLE:
            acode = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + acode) * tl.load(absmax2_ptr + blk // ABLOCK, mask=mask, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        hi = tl.load(code_ptr + (byte >> 4)) * scale
        lo = tl.load(code_ptr + (byte & 15)) * scale
        vals = tl.reshape(tl.join(hi, lo), (2 * BLOCK,))  # [BLOCK, 2] → interleaved, element 2i = high nibble
        out_offs = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + out_offs, vals.to(out_ptr.dtype.element_ty), mask=out_offs < n_out)


BLOCK = 1024  # packed bytes per program (2048 output values)


def dequantize_nf4_triton(q: NF4Tensor, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """q on a CUDA device (or on CPU under Triton's interpreter) → dense tensor of q.shape in `dtype`
    (optionally written into `out`, contiguous)."""
    if q.launch is None:  # built once per weight: a layer's forward calls this every step
        t = _tables(q.packed.device)
        double = q.double_quant
        absmax2 = q.absmax2 if double else q.absmax  # placeholders when not double-quantized (never read)
        code2 = q.code2 if double else t["code"]
        offset = q.offset.reshape(1) if double else q.absmax
        meta = dict(QBLOCK=q.block_size, ABLOCK=ABSMAX_BLOCK, DOUBLE=double, BLOCK=BLOCK, enable_fp_fusion=False)
        q.launch = ((cdiv(q.packed.numel(), BLOCK),), (q.packed, q.absmax, absmax2, code2, offset, t["code"]),
                    (q.packed.numel(), q.numel), meta)
    grid, pointers, sizes, meta = q.launch
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.packed.device)
    _nf4_dequant_kernel[grid](*pointers, out, *sizes, **meta)
    return out
