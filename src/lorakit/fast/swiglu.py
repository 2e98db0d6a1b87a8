"""Gated MLP activation act(g)·u in one pass each way (SwiGLU: act = silu; GeGLU: act = gelu-tanh).

HF computes act(g) and the product as two ops and saves g, act(g) and u (three [N, I] tensors); this
saves g and u only and recomputes act(g) in the backward, where it is needed anyway for act'(g).
Inside a checkpointed block's recompute (thread_scope.SINGLE_BACKWARD), whose graph runs one backward, the
backward kernel writes dg and du over g and u when nothing else can read them (a copy made here, or the fresh
output of an op that keeps none of its outputs; families.py leaves the scope where a forward hook could keep
them): two [N, I] tensors less at the backward's peak (224 MiB at an 8B Llama's T2048).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..triton_gate import tl, triton, use_triton, cdiv
from ..triton_launch import cached_launch
from .thread_scope import SINGLE_BACKWARD

GELU_C = math.sqrt(2.0 / math.pi)
KINDS = ("silu", "gelu_tanh")
# Producers whose output no other node of the graph keeps: the fused linear, and the reference LoRA's sum.
_NOT_KEPT_BY = ("FusedLoraLinearsBackward", "AddBackward0")

if triton is not None:

    @triton.jit
    def _tanh(z):
        return 2.0 * tl.sigmoid(2.0 * z) - 1.0

    @triton.jit
    def _act_and_grad(g, KIND: tl.constexpr, NEED_GRAD: tl.constexpr):
        """act(g) and act'(g) (the latter only when NEED_GRAD), in float32."""
        if KIND == 0:  # silu
            sig = tl.sigmoid(g)
            a = g * sig
            da = sig * (1.0 + g * (1.0 - sig)) if NEED_GRAD else a
        else:  # gelu, tanh approximation
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            t = _tanh(inner)
            a = 0.5 * g * (1.0 + t)
            da = (0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3 * 0.044715 * g * g)
                  if NEED_GRAD else a)
        return a, da

    @cached_launch
    @triton.jit
    def _glu_fwd(G, U, OUT, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(g, KIND, False)
        tl.store(OUT + offs, (a * u).to(OUT.dtype.element_ty), mask=mask)

    @cached_launch
    @triton.jit
    def _glu_bwd(DOUT, G, U, DG, DU, n, KIND: tl.constexpr, IN_PLACE: tl.constexpr, BLOCK: tl.constexpr):
        """dg, du into DG, DU; with IN_PLACE over G, U themselves (DG, DU unused: no aliased arguments, which
        Triton's interpreter would copy apart)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, KIND, True)
        if IN_PLACE:
            tl.store(G + offs, (dout * u * da).to(G.dtype.element_ty), mask=mask)
            tl.store(U + offs, (dout * a).to(U.dtype.element_ty), mask=mask)
        else:
            tl.store(DG + offs, (dout * u * da).to(DG.dtype.element_ty), mask=mask)
            tl.store(DU + offs, (dout * a).to(DU.dtype.element_ty), mask=mask)


_BLOCK = 2048


def _act_torch(g: torch.Tensor, kind: str) -> torch.Tensor:
    return F.silu(g) if kind == "silu" else F.gelu(g, approximate="tanh")


def _act_grad_torch(gf: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """act(g), act'(g) in float32."""
    if kind == "silu":
        sig = torch.sigmoid(gf)
        return gf * sig, sig * (1 + gf * (1 - sig))
    t = torch.tanh(GELU_C * (gf + 0.044715 * gf.pow(3)))
    da = 0.5 * (1 + t) + 0.5 * gf * (1 - t * t) * GELU_C * (1 + 3 * 0.044715 * gf * gf)
    return 0.5 * gf * (1 + t), da


class GatedActFunction(torch.autograd.Function):
    """Autograd function of act(g)·u in one pass each way (Triton where the gate allows, torch elsewhere)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor, kind: str):
        given = (g, u)
        g, u = g.contiguous(), u.contiguous()
        ctx.overwrite = SINGLE_BACKWARD.active() and use_triton(g) and all(map(_free_after_use, given, (g, u)))
        if use_triton(g):
            out = torch.empty_like(g)
            n = g.numel()
            _glu_fwd[(cdiv(n, _BLOCK),)](g, u, out, n, KIND=KINDS.index(kind), BLOCK=_BLOCK, num_warps=8)
        else:
            out = _act_torch(g, kind) * u
        ctx.save_for_backward(g, u)
        ctx.kind = kind
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        g, u = ctx.saved_tensors
        dout = dout.contiguous()
        if use_triton(g):
            dg, du = (g, u) if ctx.overwrite else (torch.empty_like(g), torch.empty_like(u))
            n = g.numel()
            out_g, out_u = (dout, dout) if ctx.overwrite else (dg, du)
            _glu_bwd[(cdiv(n, _BLOCK),)](dout, g, u, out_g, out_u, n, KIND=KINDS.index(ctx.kind),
                                         IN_PLACE=ctx.overwrite, BLOCK=_BLOCK, num_warps=8)
        else:
            a, da = _act_grad_torch(g.float(), ctx.kind)
            doutf = dout.float()
            dg, du = (doutf * u.float() * da).to(g.dtype), (doutf * a).to(u.dtype)
        return dg, du, None


def _free_after_use(given: torch.Tensor, saved: torch.Tensor) -> bool:
    """Whether the saved tensor may take its own gradient in backward: a copy made here, or a fresh output (no view)
    of an op that keeps no output of its own for backward."""
    return saved is not given or (given._base is None and type(given.grad_fn).__name__ in _NOT_KEPT_BY)


def gated_act(g: torch.Tensor, u: torch.Tensor, kind: str) -> torch.Tensor:
    """act(g)·u; kind: "silu" or "gelu_tanh"."""
    return GatedActFunction.apply(g, u, kind)


def act_kind(act_fn) -> str | None:
    """The fused kind matching an HF activation module, or None when this file has no kernel for it."""
    name = type(act_fn).__name__
    if name in ("SiLUActivation", "SiLU"):
        return "silu"
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanh", "FastGELUActivation"):
        return "gelu_tanh"
    if isinstance(act_fn, torch.nn.GELU) and act_fn.approximate == "tanh":
        return "gelu_tanh"
    return None
