"""The fused LoRA linear's per-output pieces of backward (lora_linear.py): bias and magnitude gradients, where
an output-scaled delta's row factor goes, and the factor gradients dA (through an RMSNorm recipe) and dB."""

from __future__ import annotations

import torch


def row_factors(plan, params) -> list:
    """Per output: f = m / norm [out] (in m's dtype) for an output-scaled output, else None."""
    return [None if mi is None else params[mi] / params[mi + 1].to(params[mi].dtype) for _, _, mi in plan.outs]


def output_grads(plan, gs: list, ys, params, needs, out: list, on_weights: bool) -> list:
    """Bias and magnitude gradients of every output; then, for output-scaled ones, where f goes: dY_j ← dY_j ⊙ f
    (an [N, out] pass) or, when `on_weights` (cheaper: the caller's choice), left on dY and returned per
    output for W, B and dB.
    dm = Σ_rows dY ⊙ (y − b) / m (= Σ dY ⊙ z / norm), db = Σ_rows dY (the bias sits outside the scale).

    Returns:
        Per output: f [out] where the caller scales W, B and dB with it, else None.
    """
    fs, on_w, k = row_factors(plan, params), [None] * len(plan.outs), 0
    for j, (_, bi, mi) in enumerate(plan.outs):
        g = gs[j]
        if bi is not None and needs[bi] and g is not None:
            out[bi] = g.sum(0)
        if mi is None:
            continue
        y, k = ys[k], k + 1
        if g is None:
            continue
        m = params[mi]
        if needs[mi]:
            y = y.view(-1, y.shape[-1])
            y = y - params[bi] if bi is not None else y
            dm = (g * y).sum(0)
            out[mi] = torch.where(m != 0, dm / m, torch.zeros_like(dm))
        if on_weights:
            on_w[j] = fs[j]
        else:
            gs[j] = g * fs[j]
    return on_w


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
