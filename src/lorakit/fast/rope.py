"""Rotary position embedding for q and k in one pass each way.

HF's apply_rotary_pos_emb makes ~5 passes per tensor (q·cos, the halves' cat, ·sin, the sum); this reads
q (any strides, e.g. the [B, T, H, D] projection seen as [B, H, T, D]) and cos/sin once and writes the
result once, in [B, T, H, D] memory returned as the same [B, H, T, D] view HF's code expects. The
backward is the same rotation with the sine's sign flipped.

With rotate_half: out[:D/2] = x1·cos1 − x2·sin1, out[D/2:] = x2·cos2 + x1·sin2.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from ..triton_gate import tl, triton, use_triton, next_power_of_2
from ..triton_launch import cached_launch

if triton is not None:

    @cached_launch
    @triton.jit
    def _rope_kernel(X, COS, SIN, OUT, n_heads, seq_len, sx_b, sx_h, sx_t, sx_d, sc_b, sc_t, sc_d,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # one program per (b, t), all heads
        b = pid // seq_len
        t = pid % seq_len
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < n_heads) & (d < HALF)
        c_base = b * sc_b + t * sc_t
        c1 = tl.load(COS + c_base + d * sc_d, mask=d < HALF, other=0.0).to(tl.float32)
        c2 = tl.load(COS + c_base + (d + HALF) * sc_d, mask=d < HALF, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + c_base + d * sc_d, mask=d < HALF, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + c_base + (d + HALF) * sc_d, mask=d < HALF, other=0.0).to(tl.float32)
        x_base = X + b * sx_b + t * sx_t + h * sx_h
        x1 = tl.load(x_base + d * sx_d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + (d + HALF) * sx_d, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        o_base = OUT + ((b * seq_len + t) * n_heads + h) * (2 * HALF)  # [B, T, H, D] memory
        tl.store(o_base + d, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_base + d + HALF, o2.to(OUT.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x [B, H, T, D] (any strides), cos/sin [B or 1, T, D] → [B, H, T, D] view of [B, T, H, D] memory."""
    bsz, heads, seq, dim = x.shape
    if use_triton(x):
        out = torch.empty(bsz, seq, heads, dim, device=x.device, dtype=x.dtype)
        sc_b = cos.stride(0) if cos.shape[0] > 1 else 0
        half = dim // 2
        _rope_kernel[(bsz * seq,)](x, cos, sin, out, heads, seq, *x.stride(), sc_b, cos.stride(1), cos.stride(2),
                                   HALF=half, BLOCK_H=next_power_of_2(heads),
                                   BLOCK_D=next_power_of_2(half), BACKWARD=backward, num_warps=4)
        return out.transpose(1, 2)
    c, s = cos.float()[:, None], sin.float()[:, None]  # [B, 1, T, D]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    c1, c2 = c.chunk(2, dim=-1)
    s1, s2 = s.chunk(2, dim=-1)
    if backward:
        out = torch.cat((x1 * c1 + x2 * s2, x2 * c2 - x1 * s1), dim=-1)
    else:
        out = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)
    return out.to(x.dtype)


class RopeFunction(torch.autograd.Function):
    """(q, k, cos, sin) → (q, k) rotated by RoPE; the backward pass rotates the gradients back (the transpose)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = _rotate(dq, cos, sin, True) if dq is not None else None
        dk = _rotate(dk, cos, sin, True) if dk is not None else None
        return dq, dk, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, H, T, D], k [B, Hkv, T, D], cos/sin [B or 1, T, D] → rotated (q, k)."""
    return RopeFunction.apply(q, k, cos, sin)


def _supported(q, k, cos, sin, unsqueeze_dim) -> bool:
    return (unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape
            and q.shape[-1] == k.shape[-1] == cos.shape[-1] and q.shape[-1] % 2 == 0
            and q.shape[2] == k.shape[2] == cos.shape[1] and cos.shape[0] in (1, q.shape[0])
            and q.dtype == k.dtype and use_triton(q, k, cos))


# --- the HF hook: the family module's apply_rotary_pos_emb, fused only inside optimized attention -------
_STATE = threading.local()


def set_fused_rope(on: bool) -> bool:
    """Switch the hook for this thread; returns the previous setting (optimized attention restores it)."""
    prev = getattr(_STATE, "on", False)
    _STATE.on = on
    return prev


@contextlib.contextmanager
def fused_rope_enabled():
    """A context manager: the fused RoPE hook is on in this thread inside it, restored to its previous setting after."""
    prev = set_fused_rope(True)
    try:
        yield
    finally:
        set_fused_rope(prev)


def make_fused_apply(original):
    """A drop-in for an HF module's apply_rotary_pos_emb: fused on GPU inside optimize()d attention,
    HF's own function everywhere else (other models in the process keep their exact numerics)."""

    def apply_rotary_pos_emb(*args, **kwargs):  # HF's own call, whatever its arguments, unless fused
        if getattr(_STATE, "on", False) and not kwargs and len(args) in (4, 5):
            q, k, cos, sin, unsqueeze_dim = (*args, 1)[:5]
            if _supported(q, k, cos, sin, unsqueeze_dim):
                return rope(q, k, cos, sin)
        return original(*args, **kwargs)

    apply_rotary_pos_emb.lorakit_original = original
    return apply_rotary_pos_emb
