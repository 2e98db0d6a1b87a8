"""The fused LoRA linear's pieces of backward (lora_linear.py): bias and magnitude gradients, the gradient of an
output-scaled output's z, gH and the plain form's dX, and the factor gradients dA (through an RMSNorm recipe) and
dB."""

from __future__ import annotations

import torch

from .scaled_kernels import scale_grads
from .scratch import base_weight


def output_grads(plan, gs: list, zs, params, needs, out: list, ups: dict) -> None:
    """Bias and magnitude gradients; then dY_j ← dY_j ⊙ f for output-scaled outputs (the gradient of z).
    dm = Σ_rows dY ⊙ z / norm, db = Σ_rows dY (the bias sits outside the scale). ups: output j → its term's
    (h, B, s) where the saved z lacks s·h·Bᵀ (the scale kernels add it again)."""
    k = 0
    for j, (_, bi, mi) in enumerate(plan.outs):
        g = gs[j]
        need_db = bi is not None and needs[bi] and g is not None
        if mi is None:
            if need_db:
                out[bi] = g.sum(0)
            continue
        z, k = zs[k], k + 1
        if g is None:
            continue
        gs[j], dm, db = scale_grads(g, z.view(-1, z.shape[-1]), params[mi], params[mi + 1], needs[mi],
                                    params[bi] if need_db else None, ups.get(j))  # one pass where kernels run
        if needs[mi]:
            out[mi] = dm
        if need_db:
            out[bi] = db


def grad_b(g: torch.Tensor, h: torch.Tensor, s: float, rank_major: bool) -> torch.Tensor:
    """s·dYᵀ·h [out, r] (computed as [r, out] and seen transposed when rank-major)."""
    if rank_major:
        return g.new_empty(h.shape[1], g.shape[1]).addmm_(h.t(), g, beta=0, alpha=s).t()
    return g.new_empty(g.shape[1], h.shape[1]).addmm_(g.t(), h, beta=0, alpha=s)


def grad_a(gh_t: torch.Tensor, x2: torch.Tensor, rstd, norm_w, offset: float, recipe_used: bool) -> torch.Tensor:
    """dA_all = gHᵀ·X. From an RMSNorm recipe X = x·rstd·(w + offset), so gHᵀ·X = ((gH·rstd)ᵀ·x)·(w + offset):
    X is never rebuilt; three launches on [R, N] / [R, in] factors. Scales gh_t in place (dX is done)."""
    if not recipe_used:
        return gh_t @ x2
    d_a = gh_t.mul_(rstd) @ x2  # rstd float32 [N]: the product is formed in float32, stored in gh's dtype
    return d_a.mul_(norm_w) if offset == 0 else torch.addcmul(d_a, d_a, norm_w)


def grad_h(gs: list, plan, params, h) -> torch.Tensor:
    """gH rank-major [R, N]: gH_t = s_t·(dY_j·B_t)ᵀ per term, written in place (zeros for unused outputs)."""
    n = h.shape[0] if h is not None else 0
    gh_t = h.new_empty(plan.rank, n) if plan.rank > 0 else None
    for j, _, bi, col, r, s, _ in plan.terms:
        if gs[j] is None:
            gh_t[col:col + r].zero_()
        else:
            gh_t[col:col + r].addmm_(params[bi].t(), gs[j].t(), beta=0, alpha=s)
    return gh_t


def plain_dx(ctx, gs: list, plan, params, gh_t, h, a_x, into=None):
    """dX [*x_shape] = Σ_j dY_j·W_j + gH·A_all as one beta=1 chain (None when not needed); written into `into`
    ([N, in], X's own memory in a recompute: lora_linear.py) when given."""
    kept, ctx.kept_dense = ctx.kept_dense, ()  # read once: a second backward dequantises again
    if not ctx.needs_input_grad[0]:
        return None
    dx = None
    for j, (g, (wi, _, _)) in enumerate(zip(gs, plan.outs)):
        if g is not None:
            w = base_weight(params, wi, ctx.sources, j, g.device, kept)  # a 4-bit base: kept, or dequantised again
            dx = (torch.mm(g, w, out=into) if into is not None else g @ w) if dx is None else dx.addmm_(g, w)
    if a_x is not None:
        gx = gh_t[:plan.x_rank].t()
        dx = (torch.mm(gx, a_x, out=into) if into is not None else gx @ a_x) if dx is None else dx.addmm_(gx, a_x)
    if dx is None and plan.kernel_runs:
        dx = h.new_zeros(h.shape[0], ctx.x_shape[-1])
    return dx.view(ctx.x_shape) if dx is not None else None
