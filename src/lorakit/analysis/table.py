"""The analysis as a terminal table (`format_table`), and the φ labels the table and the plots share."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from .results import AnalysisResult, LayerAnalysis


PHI_LABEL = {"A": "φA", "delta_in": "φΔ", "delta_out": "φΔout"}
PHI_TEXT = {"A": "right singular vectors of the factor A (the LoRA paper's Figure 3)",
            "delta_in": "ΔW's right singular vectors (input space)",
            "delta_out": "ΔW's left singular vectors (output space)"}


def phi_bases(result: AnalysisResult) -> list[str]:
    """The φ bases present, in the order shown: the paper's (A) first, then ΔW's input space."""
    present = {b for la in result.layers for b in la.phi}
    return [b for b in ("A", "delta_in") if b in present]


def short_paths(paths: list[str]) -> dict[str, str]:
    """Module paths without their common dotted prefix ("bert.encoder.layer.")."""
    if len(paths) < 2:
        return {p: p for p in paths}
    prefix = os.path.commonprefix([p + "." for p in paths])
    prefix = prefix[: prefix.rfind(".") + 1]
    return {p: p[len(prefix):] or p for p in paths}


def _num(x: Optional[float], fmt: str = "{:.3g}") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return fmt.format(x)


def _columns(result: AnalysisResult, energy: float) -> list[tuple[str, Callable[[LayerAnalysis], str]]]:
    other = {la.path: la for la in result.compare.layers} if result.compare else {}
    cols: list[tuple[str, Callable[[LayerAnalysis], str]]] = [
        ("r", lambda la: _num(la.nominal_rank, "{}")),
        ("rank", lambda la: str(la.spectrum.rank)),
        ("eff.rank", lambda la: _num(la.spectrum.effective_rank, "{:.2f}")),
        (f"k{energy * 100:g}%", lambda la: str(la.spectrum.energy_rank(energy))),
        ("‖ΔW‖F", lambda la: _num(la.spectrum.fro_norm)),
    ]
    if result.adapter.has_base:
        cols.append(("amp", lambda la: _num(la.base["amplification"], "{:.2f}") if la.base else "-"))
        if not result.compare:
            cols.append(("simW_out", lambda la: _num(la.base["overlap_out"], "{:.3f}") if la.base else "-"))
            cols.append(("simW_in", lambda la: _num(la.base["overlap_in"], "{:.3f}") if la.base else "-"))
    if result.compare:
        def of_other(fn):
            return lambda la: fn(other[la.path]) if la.path in other else "-"

        cols.append(("r2", of_other(lambda o: _num(o.nominal_rank, "{}"))))
        cols.append(("rank2", of_other(lambda o: str(o.spectrum.rank))))
        if result.compare.has_base:
            cols.append(("amp2", of_other(lambda o: _num(o.base["amplification"], "{:.2f}") if o.base else "-")))
        for basis in phi_bases(result):
            for which in ("1,1", "k,k"):
                cols.append((f"{PHI_LABEL[basis]}({which})", lambda la, b=basis, w=which: _phi_cell(la, b, w)))
    if result.energy is not None:
        cols.append(("sugg.r", lambda la: _num(la.suggested_rank, "{}")))
    if result.truncated is not None:
        cols.append(("trunc.err", lambda la: _num(la.truncation["measured_error"], "{:.4f}") if la.truncation else "-"))
    return cols


def _phi_cell(la: LayerAnalysis, basis: str, which: str) -> str:
    """φ(1,1) or φ(k,k), k = min(k1, k2), of one layer on one basis."""
    if basis not in la.phi:
        return "-"
    phi = la.phi[basis]
    i = 0 if which == "1,1" else min(phi.shape) - 1
    return f"{float(phi[i, i]):.3f}"


def format_table(result: AnalysisResult) -> str:
    """The analysis as a terminal table: one row per layer, a legend below."""
    energy = result.energy if result.energy is not None else 0.9
    main = result.adapter
    names = short_paths([la.path for la in main.layers])
    cols = [("layer", lambda la: names[la.path])] + _columns(result, energy)
    rows = [[fn(la) for _, fn in cols] for la in main.layers]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, (h, _) in enumerate(cols)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    how = "from its factors" if all(la.spectrum.from_factors for la in main.layers) else "dense"
    head = [f"adapter: {main.label} ({main.variant}, {len(main.layers)} layers, ΔW's SVD {how})"]
    if result.compare:
        head.append(f"compared with: {result.compare.label} ({result.compare.variant}) — columns ending in 2")
    head.append(f"base: {result.base}" if result.base else "base: none (figures that need W are left out)")
    body = [line([h for h, _ in cols]), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(head + [""] + body + [""] + _legend(result, energy))


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _legend(result: AnalysisResult, energy: float) -> list[str]:
    out = [f"rank: numerical rank of ΔW; eff.rank: exp(entropy of σ/Σσ); k{energy * 100:g}%: smallest rank keeping "
           f"{energy * 100:g}% of ‖ΔW‖F²"]
    main = result.adapter
    if main.has_base:
        amp = _mean([la.base["amplification"] for la in main.layers if la.base])
        line = f"amp: ‖ΔW‖F / ‖UᵀWV‖F (U, V: ΔW's top-r singular vectors); mean {_num(amp, '{:.2f}')} ({main.label})"
        if result.compare and result.compare.has_base:
            amp2 = _mean([la.base["amplification"] for la in result.compare.layers if la.base])
            line += f" vs {_num(amp2, '{:.2f}')} ({result.compare.label})"
        out.append(line)
        if not result.compare:
            out.append("simW_out / simW_in: φ between ΔW's and W's top-r left / right singular vectors "
                       "(random subspaces: r/out, r/in)")
    for basis in phi_bases(result):
        m11 = _mean([float(la.phi[basis][0, 0]) for la in main.layers if basis in la.phi])
        n = next(la.shape[1] for la in main.layers if basis in la.phi)
        out.append(f"{PHI_LABEL[basis]}: φ(i, j) on {PHI_TEXT[basis]}; k = min(r, r2); "
                   f"mean φ(1,1) = {_num(m11, '{:.3f}')} (random subspaces: max(i, j)/n, e.g. {1 / n:.3f} for n={n})")
    if result.truncated is not None:
        out.append(f"trunc.err: ‖ΔW − ΔW_k‖F / ‖ΔW‖F of the rank-{result.truncate_k} adapter in {result.truncated}")
    return out
