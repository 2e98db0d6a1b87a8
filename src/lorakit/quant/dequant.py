"""NF4 dequantization: the Triton kernel (triton_nf4.py) where lorakit.triton_gate allows it, else the
pure-torch reference (nf4.py). The two give equal tensors; this is the one place that chooses."""

from __future__ import annotations

import torch

from ..triton_gate import HAS_TRITON, use_triton
from .nf4 import NF4Tensor, dequantize_nf4_reference, dequantize_nf4_reference_into

if HAS_TRITON:
    from .triton_nf4 import dequantize_nf4_triton


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize q to a dense tensor of q.shape in `dtype`.

    Args:
        q: the quantized weight (on any device).
        dtype: the output dtype.

    Returns:
        The Triton kernel's output on CUDA (or under Triton's interpreter) unless LORAKIT_TRITON=0, else the
        torch reference's; both equal code value × block absmax computed in fp32, then cast.
    """
    if use_triton(q.packed):
        return dequantize_nf4_triton(q, dtype)
    return dequantize_nf4_reference(q, dtype)


def dequantize_nf4_into(q: NF4Tensor, out: torch.Tensor) -> torch.Tensor:
    """Dequantize q into `out` (contiguous, q.shape, any float dtype) without a dense temporary of q's size.

    Args:
        q: the quantized weight.
        out: the buffer written (a fused path's reused scratch).

    Returns:
        `out`, equal to dequantize_nf4(q, out.dtype).
    """
    if use_triton(q.packed):
        return dequantize_nf4_triton(q, out.dtype, out=out)
    return dequantize_nf4_reference_into(q, out)
