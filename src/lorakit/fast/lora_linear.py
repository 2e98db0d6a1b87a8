"""Fused autograd for adapted linears: y_j = x·W_jᵀ + b_j + Σ_t s_t·(x·A_tᵀ)·B_tᵀ, for one or several
outputs j that read the same input x (q/k/v, gate/up), each with one or several LoRA terms t.

Forward (x [N, in], R = total rank of all terms of all outputs):
  h = x·A_allᵀ                 one GEMM reads x once for every output   [N, R]
  y_j = x·W_jᵀ (+ b_j)         the base GEMM, bias in its epilogue      [N, out_j]
  y_j += s_t·h_t·B_tᵀ           addmm_ with beta=1, alpha=s: the LoRA term in the GEMM epilogue,
                                no elementwise pass over y
Backward, every product through the rank-r bottleneck, scalings as GEMM alphas (no extra passes):
  gH_t = s_t·dY_j·B_t           written straight into one [R, N] buffer
  dX = Σ_j dY_j·W_j + gH·A_all  a beta=1 chain: no separate sum of the per-output dX
  dA_all = gHᵀ·X                one GEMM for all terms
  dB_t = s_t·dY_jᵀ·h_t
Saved: X (shared by all outputs; when X is an RMSNorm output carrying a recipe, the norm's own saved
input and 1/rms instead, so X itself is never kept) and h ([N, R], R/in of X's size: cheaper to keep
than to recompute with another read of X). The per-call Python is kept lean (plain dict lookups, no
nn.Module.__getattr__): at 1B scale a LoRA step is bound by launch overhead, not by the GPU.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapted import AdaptedLayer, DenseWeight
from . import recipes

# Rank-r products in "rank-major" form (r as the GEMM's row count) where the BLAS runs the skinny forms
# badly. Measured on CPU (MKL, one thread, N=2048, out=1536, r=8): x·Aᵀ 0.37 ms vs (A·xᵀ)ᵀ 0.21, and
# dYᵀ·h as [out, r] 33 ms vs as [r, out] 1.4. On an H100 both forms cost the same (benchmarks/lora_gemm_forms.py).
RANK_MAJOR = {"cpu": True, "cuda": False}


# --- which layers the fast path serves: cheap checks, made at every call -----------------------------
def layer_spec(layer: nn.Module):
    """(W [out, in], bias, [(A, B, s), ...]) of a frozen dense linear (plain, GPT-2 Conv1D or adapted with
    deltas whose forward is y + s·(x·Aᵀ)·Bᵀ: `Delta.linear_factors` with no dropout), or None when it must
    take the reference path: merged, disabled, routed, a delta of another form, dropout, adapters in another
    dtype than the base, or a trained base weight."""
    d = layer.__dict__
    if type(layer) is nn.Linear:
        p = d["_parameters"]
        w = p["weight"]
        return (w, p["bias"], ()) if not w.requires_grad else None
    if not isinstance(layer, AdaptedLayer):
        return None
    if d["disabled"] or d["merged"] or d.get("routing") is not None or d["ops"].kind != "linear":
        return None
    if type(d["weight_source"]) is not DenseWeight:
        return None
    mods = d["_modules"]
    base_p = mods["base_layer"]._parameters
    w = base_p["weight"]
    if w.requires_grad:  # a trained base weight needs dW: the reference path computes it
        return None
    deltas = mods["deltas"]._modules
    terms = []
    for name in d["active"]:
        delta = deltas.get(name)
        if delta is None:
            continue
        factors = delta.linear_factors()  # (A [r, in], B [out, r], s, dropout p), live Parameters
        if factors is None or factors[3] != 0.0:
            return None
        a, b, s, _ = factors
        if a.dtype != w.dtype or b.dtype != w.dtype:
            return None
        terms.append((a, b, s))
    return (w.t() if d["ops"].transposed else w), base_p.get("bias"), terms


# --- the autograd function -------------------------------------------------------------------------------
class _Plan:
    """Index bookkeeping for one layout (cached): where each output's W, bias and terms sit in `params`."""

    def __init__(self, layout):
        self.w_idx, self.bias_idx, self.terms, k, col = [], [], [], 0, 0  # terms: (j, a_idx, b_idx, col, r, s)
        for j, (has_bias, ranks, scalings) in enumerate(layout):
            self.w_idx.append(k)
            self.bias_idx.append(k + 1 if has_bias else None)
            k += 2 if has_bias else 1
            for r, s in zip(ranks, scalings):
                self.terms.append((j, k, k + 1, col, r, s))
                k, col = k + 2, col + r
        self.n_params, self.rank = k, col


_PLANS: dict = {}


def _plan(layout) -> _Plan:
    plan = _PLANS.get(layout)
    if plan is None:
        plan = _PLANS[layout] = _Plan(layout)
    return plan


class FusedLoraLinears(torch.autograd.Function):
    """layout: per output (has_bias, ranks, scalings); params: per output W, [bias], then A, B per term."""

    @staticmethod
    def forward(ctx, x, norm_x, norm_rstd, norm_w, norm_offset, layout, *params):
        plan = _plan(layout)
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)
        terms = plan.terms
        a_all = None
        if len(terms) > 0:
            a_all = torch.cat([params[t[1]] for t in terms]) if len(terms) > 1 else params[terms[0][1]]
        rank_major = RANK_MAJOR.get(x.device.type, False)
        h = None
        if a_all is not None:  # [N, R] (a view of [R, N] when rank-major)
            h = (a_all @ x2.t()).t() if rank_major else x2 @ a_all.t()
        outs = [F.linear(x, params[wi], None if bi is None else params[bi])  # bias in the GEMM epilogue
                for wi, bi in zip(plan.w_idx, plan.bias_idx)]
        bts = []
        for j, _, bi, col, r, s in terms:
            bt = params[bi].t()
            bts.append(bt)
            y = outs[j]
            y.view(-1, y.shape[-1]).addmm_(h[:, col:col + r], bt, alpha=s)  # LoRA term in the epilogue (beta=1)
        ctx.plan, ctx.norm_offset, ctx.x_shape, ctx.rank_major = plan, norm_offset, x.shape, rank_major
        ctx.recipe_used = norm_x is not None
        if ctx.recipe_used:
            saved_x = (norm_x.reshape(-1, in_features), norm_rstd.reshape(-1), norm_w)
        else:
            saved_x = (x2, None, None)
        ctx.save_for_backward(*saved_x, h, a_all, *[params[wi] for wi in plan.w_idx], *bts)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        plan: _Plan = ctx.plan
        n_out = len(plan.w_idx)
        x2, rstd, norm_w, h, a_all, *rest = ctx.saved_tensors
        weights, bts = rest[:n_out], rest[n_out:]
        needs = ctx.needs_input_grad[6:]  # after (x, norm_x, norm_rstd, norm_w, norm_offset, layout)
        gs = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        out: list[Optional[torch.Tensor]] = [None] * plan.n_params  # W_j: frozen (checked before the call)

        # gH (rank-major [R, N]) = s_t·(dY_j·B_t)ᵀ per term, written in place; zeros for unused outputs.
        gh_t = x2.new_empty(plan.rank, x2.shape[0]) if plan.rank > 0 else None
        for (j, _, _, col, r, s), bt in zip(plan.terms, bts):
            if gs[j] is None:
                gh_t[col:col + r].zero_()
            else:
                gh_t[col:col + r].addmm_(bt, gs[j].t(), beta=0, alpha=s)

        dx = None
        if ctx.needs_input_grad[0]:
            for g, w in zip(gs, weights):
                if g is not None:
                    dx = g @ w if dx is None else dx.addmm_(g, w)
            if gh_t is not None:
                dx = gh_t.t() @ a_all if dx is None else dx.addmm_(gh_t.t(), a_all)
            dx = dx.view(ctx.x_shape) if dx is not None else None

        for j, bi in enumerate(plan.bias_idx):
            if bi is not None and needs[bi] and gs[j] is not None:
                out[bi] = gs[j].sum(0)
        if gh_t is not None and any(needs[t[1]] for t in plan.terms):
            d_a_all = _grad_a(gh_t, x2, rstd, norm_w, ctx.norm_offset, ctx.recipe_used)  # [R, in]
            for _, ai, _, col, r, _ in plan.terms:
                if needs[ai]:
                    out[ai] = d_a_all[col:col + r]
        for j, _, bi, col, r, s in plan.terms:
            if needs[bi] and gs[j] is not None:
                out[bi] = _grad_b(gs[j], h[:, col:col + r], s, ctx.rank_major)
        return (dx, None, None, None, None, None, *out)


def _grad_b(g: torch.Tensor, h: torch.Tensor, s: float, rank_major: bool) -> torch.Tensor:
    """s·dYᵀ·h [out, r] (computed as [r, out] and seen transposed when rank-major)."""
    if rank_major:
        return g.new_empty(h.shape[1], g.shape[1]).addmm_(h.t(), g, beta=0, alpha=s).t()
    return g.new_empty(g.shape[1], h.shape[1]).addmm_(g.t(), h, beta=0, alpha=s)


def _grad_a(gh_t: torch.Tensor, x2: torch.Tensor, rstd, norm_w, offset: float, recipe_used: bool) -> torch.Tensor:
    """dA_all = gHᵀ·X. From an RMSNorm recipe X = x·rstd·(w + offset), so gHᵀ·X = ((gH·rstd)ᵀ·x)·(w + offset):
    X is never rebuilt; three launches on [R, N] / [R, in] factors. Scales gh_t in place (dX is done)."""
    if not recipe_used:
        return gh_t @ x2
    d_a = gh_t.mul_(rstd) @ x2  # rstd float32 [N]: the product is formed in float32, stored in gh's dtype
    return d_a.mul_(norm_w) if offset == 0 else torch.addcmul(d_a, d_a, norm_w)


# --- entry points ------------------------------------------------------------------------------------------
def fused_linears(x: torch.Tensor, layers: Sequence[nn.Module]) -> Optional[tuple[torch.Tensor, ...]]:
    """The outputs of `layers` (adapted or plain frozen linears) on the same input x, through one fused
    function; None when any of them (or x) needs the reference path, or none has a LoRA term."""
    if torch.is_autocast_enabled(x.device.type):
        return None
    layout, params, any_term = [], [], False
    for layer in layers:
        spec = layer_spec(layer)
        if spec is None:
            return None
        w, b, terms = spec
        if x.dtype != w.dtype or x.device != w.device or x.shape[-1] != w.shape[1]:
            return None
        layout.append((b is not None, tuple(a.shape[0] for a, _, _ in terms), tuple(s for _, _, s in terms)))
        params.append(w)
        if b is not None:
            params.append(b)
        for a, bb, _ in terms:
            params += (a, bb)
        any_term = any_term or len(terms) > 0
    if not any_term:
        return None
    norm = recipes.norm_recipe(x)
    norm_args = (norm.x, norm.rstd, norm.weight, norm.offset) if norm is not None else (None, None, None, 0.0)
    return FusedLoraLinears.apply(x, *norm_args, tuple(layout), *params)


def lora_linear_fast_path(layer: AdaptedLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The `fast_path` slot of an adapted linear: the fused function, or the reference when not eligible."""
    pre = recipes.take_precomputed(layer, x)
    if pre is not None:
        return pre
    if args or kwargs:
        return layer.reference_forward(x, *args, **kwargs)
    out = fused_linears(x, (layer,))
    return out[0] if out is not None else layer.reference_forward(x)
