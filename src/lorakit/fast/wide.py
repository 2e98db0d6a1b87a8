"""Room for the LoRA term inside the base GEMM: y = [x | h]·[W | s·B]ᵀ.

The fused linear's plain form computes y = x·Wᵀ and then y += s·h·Bᵀ (h = x·Aᵀ): the second GEMM has K = r and
is bound by reading and writing all of y once more. When x and h lie side by side in one buffer and W and s·B in
another, one GEMM with K = in + R gives both (R/in more FLOPs: 1-2% at rank 16). In backward one GEMM
dY·[W | s·B] then gives dX's base part and gH = s·dY·B together, instead of a GEMM that reads dY again for gH.

Both sides get the room from the fast paths that make them:
- weights: optimize() widens the base weights of the fused groups that read an RMSNorm's output (q/k/v, gate/up).
  W [out, in] becomes the first `in` columns of a zeroed buffer [out, in + E], E ≥ the group's total rank. The
  Parameter stays the same object with the same values; only its storage changes (row stride in + E).
  unoptimize() and unload() pack it back (core/patching.pack_parameters). A weight whose storage was replaced
  since (.to(), FSDP's sharding) is no longer wide, and its fused call takes the plain form.
- inputs: the RMSNorm fast path writes its output into the first d columns of a [N, d + E] buffer once a fused
  call that read it asked for E columns (recipes.NormRecipe.want); the fused call writes h into them. A norm
  stops giving the columns after norms.STRIKES wide outputs in a row that no call took (weights packed back, adapters
  gone, another path), and gives none where no fused call could take them (inference mode, an autocast to
  another dtype).
Each fused call writes s·B of its terms into the weights' spare columns from the live factors (through an alias
with its own version counter, so the base weight saved for backward is not seen as modified), after zeroing the
spare columns when the layout of the group's terms changed. Backward checks that the layout it relies on is
still there, else it computes gH the plain way.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.patching import RESTORED_ATTR

WIDE_ATTR = RESTORED_ATTR  # on a widened Parameter: [data_ptr, row stride, column layout, what was written]
ALIGN = 8  # spare columns in multiples of 8: rows stay 16-byte aligned in 16-bit dtypes when `in` is a multiple of 8
# torch's CPU bf16 GEMM (2.13, oneDNN) reads K rounded up to a multiple of 8 where the row stride allows it: with
# K = in + R = 76 in rows of 80 it reads columns 76-79 too (a NaN there made every output NaN; K = 72 did not). W's
# spare columns are zeros, and on CPU the input buffer's spare columns are zeroed before h is written into them
# (CUDA's GEMMs keep to K).


def storage_alias(t: torch.Tensor, shape, stride, offset: int) -> torch.Tensor:
    """A tensor on t's storage that is not a view of t (its own version counter, no autograd link)."""
    return t.new_empty(0).set_(t.untyped_storage(), offset, shape, stride)


def _whole(w: torch.Tensor, rank: int) -> torch.Tensor:
    """The widened weight w [out, in] with its first `rank` spare columns: [out, in + rank], an alias."""
    return storage_alias(w, (w.shape[0], w.shape[1] + rank), (w.stride(0), 1), w.storage_offset())


def room(w: torch.Tensor) -> int:
    """Spare columns behind each row of a widened weight w [out, in], 0 when w is not (or no longer) wide."""
    mark = w.__dict__.get(WIDE_ATTR) if hasattr(w, "__dict__") else None
    if mark is None or mark[0] != w.data_ptr() or mark[1] != w.stride(0) or w.stride(1) != 1:
        return 0
    return w.stride(0) - w.shape[1]


def widen(param: torch.nn.Parameter, spare: int) -> bool:
    """Give a 2-D weight Parameter `spare` zeroed columns behind each row (rounded up to ALIGN); True when it
    changed. Values, dtype, device and the Parameter object are kept."""
    w = param.data
    spare = -(-spare // ALIGN) * ALIGN
    if w.dim() != 2 or w.stride(-1) != 1 or spare <= 0 or room(param) >= spare or w.is_meta:
        return False
    out_f, in_f = w.shape
    buf = w.new_zeros(out_f, in_f + spare)  # [out, in + E]
    buf[:, :in_f].copy_(w)
    param.data = buf[:, :in_f]
    param.__dict__[WIDE_ATTR] = [param.data_ptr(), param.stride(0), None, None]
    return True


def group_rank(specs, kernel_masks: bool) -> Optional[int]:
    """The total rank R of a fused group's terms when the wide form can serve it, else None: every output a dense
    weight with room ≥ R, dropout only with masks the kernels draw (kernel_masks: the call has a seed), not with a
    dropped input tensor (layer specs of spec.py, as _fuse holds them). An output-scaled output's GEMM gives its z."""
    total = 0
    for w, _, terms, source, scaled in specs:
        if w is None or source is not None or (not kernel_masks and any(t[3] > 0 for t in terms)):
            return None
        total += sum(t[0].shape[0] for t in terms)
    if total == 0 or any(room(spec[0]) < total for spec in specs):
        return None
    return total


def wide_input(x: torch.Tensor, recipe, rank: int) -> Optional[torch.Tensor]:
    """The buffer [N, in + E] whose first `in` columns are x (from the norm's recipe), when it has ≥ rank spare
    columns; else None, and the norm is asked for them on its next call."""
    buf = recipe.wide
    if buf is None or buf.shape[1] - x.shape[-1] < rank or buf.data_ptr() != x.data_ptr():
        want = -(-rank // ALIGN) * ALIGN
        if recipe.want is not None and recipe.want[0] < want:
            recipe.want[0], recipe.want[1] = want, 0  # given from the norm's next call on
        return None
    recipe.want[1] = 0  # taken: no untaken outputs in a row
    return buf


def write_terms(plan, params, rank: int) -> tuple:
    """Write s·B of every term into its output's weight columns [in + col, in + col + r) (zeroing the spare
    columns first when this output's layout changed); returns each output's wide weight [out, in + R]."""
    wides = []
    for j, (wi, _, _) in enumerate(plan.outs):
        w = params[wi]
        out_f, in_f = w.shape
        cols = tuple((col, r) for jj, _, _, col, r, _, _ in plan.terms if jj == j) + (rank,)
        whole = _whole(w, rank)
        mark = w.__dict__[WIDE_ATTR]
        if mark[2] != cols or (w.is_cuda and torch.cuda.is_current_stream_capturing()):  # a graph: every replay
            storage_alias(w, (out_f, w.stride(0) - in_f), (w.stride(0), 1), w.storage_offset() + in_f).zero_()
            mark[2] = cols
        written = []
        for jj, _, bi, col, r, s, _ in plan.terms:
            if jj == j:
                b = params[bi]
                torch.mul(b.detach(), s, out=whole[:, in_f + col:in_f + col + r])
                written.append((id(b), b._version, b.data_ptr(), s))
        mark[3] = (cols, tuple(written))  # what a backward of this call checks is still there
        wides.append(whole)
    return tuple(wides)


def forward(x2: torch.Tensor, buf: torch.Tensor, a_x, plan, params, lead: tuple, rank_major: bool,
            seed=None, engine=None) -> tuple:
    """(outputs y_j [*lead, out_j] (z_j, with its term, for an output-scaled one), h [N, R] to save, what the mask
    engine keeps) of a group in the wide form.

    Args:
        x2: the input [N, in], the first columns of buf; buf: [N, in + E] with E ≥ R; a_x: the x-reading terms'
        A [R_x, in] or None; seed, engine: the call's mask seed and engine when it has dropout terms (their columns
        of h come from the engine, lora_linear's module docstring).
    """
    n, in_f = x2.shape
    rank = plan.rank
    xe = buf[:, :in_f + rank]  # [N, in + R]
    if x2.device.type == "cpu":  # CPU bf16 GEMMs read past K into them (see ALIGN): they must be finite
        buf[:, in_f:].zero_()
    if a_x is not None:
        torch.mm(x2, a_x.t(), out=xe[:, in_f:in_f + plan.x_rank])  # h of the x-reading terms, beside x
    kept = engine.runs_down(x2, xe[:, in_f:], plan.kernel_runs, params, seed) if seed is not None else ()
    wides = write_terms(plan, params, rank)
    outs = []
    for j, (_, bi, mi) in enumerate(plan.outs):  # an output-scaled one: z with its term, its bias after the scale
        y = x2.new_empty(*lead, wides[j].shape[0])  # a fresh tensor, not a view (callers may change it in place)
        y2 = y.view(n, -1)  # [N, out_j]
        if bi is not None and mi is None:
            torch.addmm(params[bi], xe, wides[j].t(), out=y2)
        else:
            torch.mm(xe, wides[j].t(), out=y2)
        outs.append(y)
    h = x2.new_empty(rank, n).t() if rank_major else x2.new_empty(n, rank)  # saved apart: buf is not kept
    h.copy_(xe[:, in_f:])
    return outs, h, kept


def layout_of(plan, params) -> tuple:
    """What backward needs unchanged since forward: each weight's storage, and which factors (object, version)
    were written into its columns last. Another call's write of other factors (another adapter set in between)
    makes backward take the plain form."""
    return tuple((params[wi].data_ptr(), (params[wi].__dict__.get(WIDE_ATTR) or (None,) * 4)[3])
                 for wi, _, _ in plan.outs)  # a mark gone (packed back since): None, never equal to forward's


def backward_dx(gs, plan, params, a_x: torch.Tensor, layout: tuple) -> Optional[tuple]:
    """(dX [N, in], gH rank-major [R, N]) from dX_wide = Σ_j dY_j·[W_j | s·B_j]; None when a weight's columns
    hold other factors than at forward (the caller then takes the plain form)."""
    if layout_of(plan, params) != layout:
        return None
    rank = plan.rank
    dxe = None
    for j, (wi, _, _) in enumerate(plan.outs):
        if gs[j] is None:
            continue
        w = params[wi]
        whole = _whole(w, rank)
        dxe = gs[j] @ whole if dxe is None else dxe.addmm_(gs[j], whole)  # [N, in + R]
    if dxe is None:
        return None
    in_f = dxe.shape[1] - rank
    gh_t = dxe[:, in_f:].t().contiguous()  # gH = s·dY·B for every term (zeros for unused outputs), [R, N]
    dx = dxe[:, :in_f]
    if a_x is not None:
        dx.addmm_(gh_t[:plan.x_rank].t(), a_x)  # + gH·A of the x-reading terms (dropout terms: the mask engine)
    return dx, gh_t
