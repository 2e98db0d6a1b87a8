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
than to recompute with another read of X).
Beyond that plain form (each asked through spec.py, each held to the reference by tests):
- dropout: a term with dropout p reads xd = x ⊙ mask / (1 − p). Such terms get their own columns of h
  (x-reading terms still share one GEMM). Where dropout.mask_source says "philox" (CUDA with Triton) or "hash"
  (CPU) the term passes no tensor, only the call's seed, and a mask engine draws its masks: dropout_kernels.py
  in the Triton kernels (forward h columns; backward dA and dX += (gH·A) ⊙ mask / (1 − p) in one pass, the masks
  drawn again), dropout_hash.py with torch's integer ops (a run's masks at once, kept as int8 for backward); x
  is saved once for all terms. Elsewhere ("native": nn.Dropout's own kernel, or "bits") the dropped xd is an
  autograd input whose autograd keeps only the bool mask; xd is saved for dA instead of x.
- an output-scaled term (Delta.scaled_linear_factors): y = f ⊙ z + b with z = x·Wᵀ + s·h·Bᵀ and f = m / norm
  (norm detached, from the rank-r factors); backward dm = Σ dY ⊙ z / norm, dZ = dY ⊙ f, db = Σ dY. Where Triton
  runs, scaled_kernels.py does each stage in one pass: the norm in one launch; forward adds the output's one term
  s·h·Bᵀ and scales in the same pass (instead of addmm_), saving the base GEMM's output; backward reads dY and that
  output once for dZ, dm, db. Elsewhere z (with its term) is saved and scaled by torch ops.
- a 4-bit base (a weight source with write_dense): W is dequantised into one reused scratch buffer
  (scratch.py) in forward and again in backward, nothing of W's size allocated or saved; in an offloaded block's
  passes (scratch.kept_dense) into a tensor of its own, once per pass, kept on ctx for the backward.
- autocast: x, W, biases and factors are cast to the autocast dtype as autocast would, then the call runs
  with autocast off.
- the wide form (wide.py): when x is an RMSNorm's output lying in a buffer with spare columns and every W has
  spare columns too (optimize() gives them to q/k/v and gate/up), h is written beside x and s·B beside W, and
  each output is one GEMM [x | h]·[W | s·B]ᵀ (no addmm_ pass over y); backward's dY·[W | s·B] gives dX's base part
  and gH together. Plain LoRA, in-kernel dropout and output-scaled terms take it.
- inside a checkpoint's recompute (thread_scope.SINGLE_BACKWARD), whose graph runs one backward, a call whose X is
  the gated activation (read by this call alone: no forward hook, families.py) takes dA first and then writes dX
  over X: one [N, in] tensor less at the backward's peak (56 MiB in an 8B Llama's down projection at T2048).
  Where nobody reads the outputs (fused_linears(unread=True): that down projection in a Llama-form layer's
  recompute, families.py), the call computes h and skips the base product and the LoRA terms: backward reads x and
  h, never y. A frozen nn.Linear there (no adapter on it) takes the call too, for its dX = dY·W alone.
The per-call Python is kept lean (plain dict lookups, no
nn.Module.__getattr__): at 1B scale a LoRA step is bound by launch overhead, not by the GPU.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapted import AdaptedLayer
from . import recipes
from . import dropout_hash, dropout_kernels
from .dropout import draw_seed, dropped, mask_source
from .lora_grads import grad_a, grad_b, grad_h, output_grads, plain_dx
from .scaled_kernels import scale_output, takes_up
from .scratch import base_weight, dense_from_source, keeping_dense
from . import wide
from .spec import FALLBACK_ATTR, check_input, note_fallback, spec_or_reason
from .thread_scope import SINGLE_BACKWARD

# Rank-r products in "rank-major" form (r as the GEMM's row count) where the BLAS runs the skinny forms
# badly. Measured on CPU (MKL, one thread, N=2048, out=1536, r=8): x·Aᵀ 0.37 ms vs (A·xᵀ)ᵀ 0.21, and
# dYᵀ·h as [out, r] 33 ms vs as [r, out] 1.4. On an H100 both forms cost the same (benchmarks/lora_gemm_forms.py).
RANK_MAJOR = {"cpu": True, "cuda": False}
# Where the masks of terms that pass only the call's seed are drawn, by dropout.mask_source's answer.
_MASK_ENGINES = {"philox": dropout_kernels, "hash": dropout_hash}


# --- the autograd function -------------------------------------------------------------------------------
class _Plan:
    """Index bookkeeping for one layout (cached): where each output's W, bias, magnitude and terms sit in
    `params`. Columns of h: first the terms that read x itself (one GEMM), then each dropout term's own."""

    def __init__(self, layout):
        self.outs, terms, k = [], [], 0  # outs: (w_idx, bias_idx, m_idx); m_idx + 1 holds the row norm
        in_kernel = {}  # xd_idx → p of a dropout term whose mask the kernels draw (its param is the call's seed)
        for j, (has_w, has_bias, scaled, ranks, scalings, drop_flags) in enumerate(layout):
            w_idx = k if has_w else None
            k += has_w
            bias_idx = k if has_bias else None
            k += has_bias
            m_idx = k if scaled else None
            k += 2 if scaled else 0
            self.outs.append((w_idx, bias_idx, m_idx))
            for r, s, drop in zip(ranks, scalings, drop_flags):
                terms.append([j, k, k + 1, 0, r, s, k + 2 if drop else None])
                if type(drop) is float:
                    in_kernel[k + 2] = drop
                k += 3 if drop else 2
        col = 0
        for t in sorted(terms, key=lambda t: t[6] is not None):  # x-reading terms first (stable)
            t[3], col = col, col + t[4]
        self.terms = [tuple(t) for t in terms]  # (j, a_idx, b_idx, col, r, s, xd_idx)
        self.x_terms = [t for t in self.terms if t[6] is None]
        self.drop_terms = sorted((t for t in self.terms if t[6] is not None), key=lambda t: t[3])
        self.tensor_drops = [t for t in self.drop_terms if t[6] not in in_kernel]  # a dropped input each
        self.kernel_runs = _kernel_runs(self.drop_terms, in_kernel)
        self.n_params, self.rank = k, col
        self.x_rank = sum(t[4] for t in self.x_terms)
        self.n_scaled = sum(m is not None for _, _, m in self.outs)
        ones = [t for t in self.terms if self.outs[t[0]][2] is not None and sum(u[0] == t[0] for u in self.terms) == 1]
        self.scaled_ups = {t[0]: t for t in ones}  # output-scaled j → its one term (the scale kernels may take it)


def _kernel_runs(drop_terms, in_kernel: dict) -> tuple:
    """Consecutive in-kernel dropout terms of one rank and one p, each run one launch per kernel:
    (first column of h, r, p, A indices, first stream). A term's stream is its index among the dropout terms."""
    runs = []
    for stream, (_, ai, _, col, r, _, xi) in enumerate(drop_terms):
        if xi not in in_kernel:
            continue
        last = runs[-1] if runs else None
        if last is not None and last[1:3] == [r, in_kernel[xi]] and last[0] + len(last[3]) * r == col:
            last[3].append(ai)
        else:
            runs.append([col, r, in_kernel[xi], [ai], stream])
    return tuple((col, r, p, tuple(a_idx), stream) for col, r, p, a_idx, stream in runs)


_PLANS: dict = {}


def _plan(layout) -> _Plan:
    plan = _PLANS.get(layout)
    if plan is None:
        plan = _PLANS[layout] = _Plan(layout)
    return plan


def _down(x2, a_x, drops, rank_major: bool) -> torch.Tensor:
    """h = [x·A_xᵀ | xd_t·A_tᵀ ...] [N, R] (a view of [R, N] when rank-major); drops: [(xd_t [N, in], A_t)]."""
    if rank_major:
        parts = ([a_x @ x2.t()] if a_x is not None else []) + [a @ xd.t() for xd, a in drops]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).t()
    parts = ([x2 @ a_x.t()] if a_x is not None else []) + [xd @ a.t() for xd, a in drops]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _down_in_kernel(x2, a_x, plan: _Plan, params, seed: int, rank_major: bool, engine) -> tuple:
    """(h [N, R] (a view of [R, N] when rank-major), what the mask engine keeps for backward): x-reading terms by
    one GEMM, each run of dropout terms with seeded masks by the mask engine (masks drawn from `seed`)."""
    n = x2.shape[0]
    h_t = x2.new_empty(plan.rank, n) if rank_major else None
    h = h_t.t() if rank_major else x2.new_empty(n, plan.rank)
    if a_x is not None:  # terms with and without dropout in one call
        if rank_major:
            torch.mm(a_x, x2.t(), out=h_t[:plan.x_rank])
        else:
            h[:, :plan.x_rank] = x2 @ a_x.t()
    kept = engine.runs_down(x2, h, plan.kernel_runs, params, seed)
    return h, kept


def _scaled_ups(plan: _Plan, outs, h, params, taken=None) -> dict:
    """{j: (h_t [N, r], B_t, s_t)} for the output-scaled outputs whose one term's s·h·Bᵀ the scale kernels add
    themselves (scaled_kernels.takes_up); in backward `taken` names the outputs that forward gave them."""
    if not plan.scaled_ups:
        return {}
    ups = {}
    for j, (_, _, bi, col, r, s, _) in plan.scaled_ups.items():
        if taken is not None and j not in taken:
            continue
        up = (h[:, col:col + r], params[bi], s)
        if taken is not None or takes_up(outs[j], *up[:2]):
            ups[j] = up
    return ups


def _plain_forward(x, x2, a_x, plan: _Plan, params, sources, seed, engine, rank_major: bool, unread: bool) -> tuple:
    """(h, what the mask engine keeps, outputs, {j: term the scale kernels took}, z of the output-scaled outputs):
    the forward of the module docstring, h by its own GEMM and each LoRA term by addmm_ into its output.
    unread: nobody reads the outputs' values, so they are left unwritten."""
    if seed is not None:
        h, kept = _down_in_kernel(x2, a_x, plan, params, seed, rank_major, engine)
    else:
        kept = ()
        drops = [(params[t[6]].reshape(-1, x.shape[-1]), params[t[1]]) for t in plan.tensor_drops]
        h = _down(x2, a_x, drops, rank_major) if plan.rank > 0 else None
    if unread:  # backward reads x, h and the factors, never y
        sizes = [params[wi].shape[0] if wi is not None else sources[j].dense_shape[0]
                 for j, (wi, _, _) in enumerate(plan.outs)]
        return h, kept, [x.new_empty(*x.shape[:-1], n) for n in sizes], {}, []
    outs = []
    for j, (wi, bi, mi) in enumerate(plan.outs):  # bias in the GEMM epilogue unless a magnitude follows
        bias = None if bi is None or mi is not None else params[bi]
        outs.append(F.linear(x, base_weight(params, wi, sources, j, x.device), bias))
    ups = _scaled_ups(plan, outs, h, params)  # output-scaled j → its term's up-projection, taken by the kernels
    for j, _, bi, col, r, s, _ in plan.terms:
        if j not in ups:
            y = outs[j]
            y.view(-1, y.shape[-1]).addmm_(h[:, col:col + r], params[bi].t(), alpha=s)  # LoRA term, beta=1
    return h, kept, outs, ups, _scale_outputs(plan, outs, params, ups)


def _scale_outputs(plan: _Plan, outs: list, params, ups: dict) -> list:
    """y = f ⊙ z + b (f = m / norm) in place of each output-scaled z in `outs`; returns the z's (kept for dm)."""
    zs = []
    for j, (_, bi, mi) in enumerate(plan.outs):
        if mi is not None:
            zs.append(outs[j])
            outs[j] = scale_output(outs[j], params[mi], params[mi + 1], params[bi] if bi is not None else None,
                                   ups.get(j))
    return zs


class FusedLoraLinears(torch.autograd.Function):
    """layout: per output (has W, has bias, scaled, ranks, scalings, dropout per term: False, True for a dropped
    input tensor, or p for in-kernel masks); params: per output [W], [bias], [m, norm], then A, B, [dropped input
    or the call's seed (an int)] per term; sources: per output a weight source or None; wide_buf: the [N, in + E]
    buffer x lies in for the wide form (wide.py), or None; unread: nobody reads the outputs' values (the plain
    form then leaves them unwritten)."""

    @staticmethod
    def forward(ctx, x, norm_x, norm_rstd, norm_w, norm_offset, layout, sources, wide_buf, unread, *params):
        plan = _plan(layout)
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)
        xt = plan.x_terms
        a_x = None
        if xt:
            a_x = torch.cat([params[t[1]] for t in xt]) if len(xt) > 1 else params[xt[0][1]]
        rank_major = RANK_MAJOR.get(x.device.type, False)
        seed = params[plan.drop_terms[0][6]] if plan.kernel_runs else None  # the call's mask seed (an int)
        engine = _MASK_ENGINES[mask_source(x.device)] if seed is not None else None
        ctx.wide = None
        if seed is not None:
            x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        if wide_buf is not None:  # h beside x and s·B beside W: one GEMM per output (wide.py)
            outs, h, kept = wide.forward(x2, wide_buf, a_x, plan, params, x.shape[:-1], rank_major, seed, engine)
            ctx.wide, ups = wide.layout_of(plan, params), {}  # each z holds its term
            zs = _scale_outputs(plan, outs, params, ups)
        else:
            unread = unread and plan.n_scaled == 0  # an output-scaled term's backward reads z
            h, kept, outs, ups, zs = _plain_forward(x, x2, a_x, plan, params, sources, seed, engine, rank_major, unread)
        # Which z lack their term (the scale kernels add it), saved as a tensor, not on ctx: a checkpoint's
        # recompute may take the other form, and backward pairs forward's ctx with the recompute's saved tensors.
        taken = torch.tensor([j in ups for j in plan.scaled_ups]) if plan.scaled_ups else None
        ctx.plan, ctx.norm_offset, ctx.x_shape, ctx.rank_major = plan, norm_offset, x.shape, rank_major
        ctx.sources, ctx.drop_seed, ctx.mask_engine = sources, seed, engine
        # Inside scratch.kept_dense(): the dense weights this call read, kept for backward (on ctx, not saved: a
        # torch checkpoint's recompute must save what its forward saved, wherever it runs).
        ctx.kept_dense = tuple(None if w is None else dense_from_source(w, x.device) for w in sources) \
            if keeping_dense() and any(w is not None for w in sources) else ()
        ctx.recipe_used = norm_x is not None
        # In a checkpoint's recompute dX may take X's memory: X the gated activation, read by this call alone.
        ctx.dx_over_x = (SINGLE_BACKWARD.active() and not ctx.recipe_used and seed is None and wide_buf is None
                         and not plan.tensor_drops and bool(xt) and x._base is None
                         and type(x.grad_fn).__name__ == "GatedActFunctionBackward")
        if ctx.recipe_used:
            nx = norm_x.reshape(-1, in_features)  # the dropout kernels read its rows with unit stride
            saved_x = (nx if nx.stride(-1) == 1 else nx.contiguous(), norm_rstd.reshape(-1), norm_w)
        else:  # only dropped-tensor terms: x itself is not needed
            saved_x = (x2 if xt or seed is not None else None, None, None)
        if seed is not None:  # the seed slots hold ints, which autograd does not save
            params = [None if type(t) is int else t for t in params]
        if torch.compiler.is_compiling():  # dynamo refuses to save views of the call's input or intermediates
            saved_x = (x if saved_x[0] is x2 and x2._base is not None else saved_x[0], *saved_x[1:])  # reshaped back
            h = h.clone() if h is not None else None  # [N, R]: small
        ctx.save_for_backward(*saved_x, h, a_x, taken, *zs, *params, *kept)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        plan: _Plan = ctx.plan
        x2, rstd, norm_w, h, a_x, taken, *rest = ctx.saved_tensors
        x2 = x2.reshape(-1, x2.shape[-1]) if x2 is not None else None  # [N, in] (compiled: x was saved)
        zs, params = rest[:plan.n_scaled], rest[plan.n_scaled:plan.n_scaled + plan.n_params]
        kept = rest[plan.n_scaled + plan.n_params:]  # the mask engine's, from forward
        # the params' (after x, norm_x, norm_rstd, norm_w, norm_offset, layout, sources, wide_buf, unread)
        needs = ctx.needs_input_grad[9:]
        gs = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        out: list[Optional[torch.Tensor]] = [None] * plan.n_params  # W_j: frozen (checked before the call)
        ups = () if taken is None else tuple(j for j, t in zip(plan.scaled_ups, taken.tolist()) if t)
        output_grads(plan, gs, zs, params, needs, out, _scaled_ups(plan, None, h, params, ups))

        got = early = None  # early: dA, when X's memory takes dX
        if ctx.wide is not None and ctx.needs_input_grad[0]:  # dX's base part and gH from one GEMM per output
            got = wide.backward_dx(gs, plan, params, a_x, ctx.wide)
        if got is not None:
            dx, gh_t = got[0].view(ctx.x_shape), got[1]
        else:
            gh_t = grad_h(gs, plan, params, h)
            if ctx.dx_over_x and any(needs[t[1]] for t in plan.x_terms):
                early = gh_t[:plan.x_rank] @ x2  # dA reads X before dX is written over it
            dx = plain_dx(ctx, gs, plan, params, gh_t, h, a_x, into=x2 if ctx.dx_over_x else None)
        if plan.kernel_runs:  # dX and dA of the in-kernel dropout terms, their masks drawn again
            dx2 = dx.view(-1, dx.shape[-1]) if dx is not None else None
            norm = (rstd, norm_w, ctx.norm_offset) if ctx.recipe_used else None
            ctx.mask_engine.runs_back(x2, norm, gh_t, dx2, plan.kernel_runs, params, needs, ctx.drop_seed, out, kept)
        for _, ai, _, col, r, _, xi in plan.tensor_drops:  # the dropped input's grad; dropout's backward masks it
            if needs[xi]:
                out[xi] = (gh_t[col:col + r].t() @ params[ai]).view(ctx.x_shape)
            if needs[ai]:
                out[ai] = gh_t[col:col + r] @ params[xi].reshape(-1, params[xi].shape[-1])
        if a_x is not None and any(needs[t[1]] for t in plan.x_terms):
            d_a_x = early if early is not None else \
                grad_a(gh_t[:plan.x_rank], x2, rstd, norm_w, ctx.norm_offset, ctx.recipe_used)  # [R0, in]
            for _, ai, _, col, r, _, _ in plan.x_terms:
                if needs[ai]:
                    out[ai] = d_a_x[col:col + r]
        for j, _, bi, col, r, s, _ in plan.terms:
            if needs[bi] and gs[j] is not None:
                out[bi] = grad_b(gs[j], h[:, col:col + r], s, ctx.rank_major)
        return (dx, None, None, None, None, None, None, None, None, *out)


# --- entry points ------------------------------------------------------------------------------------------
def _drop_flag(p: float, seed) -> object:
    """A term's dropout in the layout: False (reads x), True (a dropped input tensor) or p (in-kernel masks)."""
    return False if p <= 0 else True if seed is None else float(p)


class _LayerReason(str):
    """A reason that lies in the layer itself (spec_or_reason's), not in the call's input."""


def _fuse(x: torch.Tensor, layers: Sequence[nn.Module], unread: bool = False):
    """The fused outputs of `layers` on x, or the reason (a str) they must take the reference path. unread: nobody
    reads the outputs' values (frozen linears without an adapter are then fused too, for their dX)."""
    dev = x.device.type
    cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None  # as autocast would
    specs = []
    for layer in layers:
        spec = spec_or_reason(layer, cast is not None)
        if type(spec) is str:
            return _LayerReason(spec)
        why = check_input(x, spec, cast)
        if why is not None:
            return why
        specs.append(spec)
    if not any(spec[2] for spec in specs) and not unread:
        return "no active adapter on this layer"
    cast_any = []  # non-empty once a tensor is cast; an autocast that casts nothing keeps the recipe and wide form

    def to(t):  # as autocast would (differentiable casts)
        if cast is None or t.dtype == cast:
            return t
        cast_any.append(True)
        return t.to(cast)

    xc = to(x)
    seed = None  # seeded masks: one key per call from torch's CPU generator (seeded runs repeat)
    if any(t[3] > 0 for spec in specs for t in spec[2]) and mask_source(x.device) in _MASK_ENGINES:
        seed = draw_seed(x.device)
    layout, params, sources, any_x = [], [], [], False
    for w, b, terms, source, scaled in specs:  # dropout masks drawn in the reference's order: layer, then term
        layout.append((w is not None, b is not None, scaled is not None, tuple(t[0].shape[0] for t in terms),
                       tuple(t[2] for t in terms), tuple(_drop_flag(t[3], seed) for t in terms)))
        params += [to(t) for t in (w, b) if t is not None]
        if scaled is not None:
            params += (to(scaled[0]), scaled[1])
        for a, bb, _, p in terms:
            params += (to(a), to(bb))
            if p > 0 and seed is not None:
                params.append(seed)
            elif p > 0:  # the mask as dropout.py draws it for this device; autograd keeps it as bool
                params.append(to(dropped(x, p)))
            any_x = any_x or p == 0
        sources.append(source)
    norm = recipes.norm_recipe(x) if (any_x or seed is not None) and not cast_any else None
    norm_args = (norm.x, norm.rstd, norm.weight, norm.offset) if norm is not None else (None, None, None, 0.0)
    rank = wide.group_rank(specs, seed is not None) if norm is not None and norm.want is not None else None
    wide_buf = wide.wide_input(x, norm, rank) if rank is not None else None
    if cast is None:
        return FusedLoraLinears.apply(xc, *norm_args, tuple(layout), tuple(sources), wide_buf, unread, *params)
    with torch.autocast(dev, enabled=False):
        return FusedLoraLinears.apply(xc, *norm_args, tuple(layout), tuple(sources), wide_buf, unread, *params)


def fused_linears(x: torch.Tensor, layers: Sequence[nn.Module], unread: bool = False
                  ) -> Optional[tuple[torch.Tensor, ...]]:
    """The outputs of `layers` (adapted or plain frozen linears) on the same input x, through one fused function
    (unread: values nobody reads, only what backward needs); None when any of them (or x) needs the reference
    path, none has a LoRA term (outputs read), or a layer's forward is replaced on the instance (accelerate's hooks:
    the layer's own call runs it)."""
    out = None if any("forward" in layer.__dict__ for layer in layers) else _fuse(x, layers, unread)
    return None if out is None or isinstance(out, str) else out


def lora_linear_fast_path(layer: AdaptedLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The `fast_path` slot of an adapted linear: the fused function, or the reference when not eligible
    (the reason is kept on the layer for lorakit.fast.fusion_report)."""
    pre = recipes.take_precomputed(layer, x)
    if pre is not None:
        return pre
    out = _fuse(x, (layer,)) if not (args or kwargs) else "called with extra arguments"
    if isinstance(out, str):
        if not isinstance(out, _LayerReason):  # the input's fault: the report cannot see it without the call
            note_fallback(layer, out)
        return layer.reference_forward(x, *args, **kwargs)
    layer.__dict__.pop(FALLBACK_ATTR, None)
    return out[0]
