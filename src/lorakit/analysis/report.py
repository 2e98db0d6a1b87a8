"""The analysis as a terminal table, analysis.json, and the suggested rank_pattern files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Optional

from .plots import make_plots
from .results import PHI_LABEL, PHI_TEXT, AnalysisResult, LayerAnalysis, phi_bases


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


# --- files ------------------------------------------------------------------------------------------------
def write_rank_pattern(result: AnalysisResult, out: Path) -> dict[str, str]:
    """rank_pattern.json (the bare dict, for LoraConfig(rank_pattern=...)) and suggested_ranks.yaml (a
    `lorakit train --config` file: the same dict under adapter_options, r = the largest suggested rank)."""
    pattern = result.rank_pattern or {}
    (out / "rank_pattern.json").write_text(json.dumps(pattern, indent=2) + "\n")
    settings = {"r": max(pattern.values(), default=8), "adapter_options": {"rank_pattern": pattern}}
    note = (f"# lorakit analyze --suggest-rank {result.energy:g}: per layer, the smallest LoRA rank keeping "
            f"{result.energy * 100:g}% of ΔW's energy\n# in {result.adapter.label}. Use: lorakit train --config "
            "suggested_ranks.yaml (other flags as before; lora_alpha is kept as given, so alpha/r follows each rank).\n")
    try:
        import yaml

        text = yaml.safe_dump(settings, sort_keys=False)
    except ImportError:  # JSON is YAML too
        text = json.dumps(settings, indent=2) + "\n"
    (out / "suggested_ranks.yaml").write_text(note + text)
    return {"rank_pattern": str(out / "rank_pattern.json"), "train_config": str(out / "suggested_ranks.yaml")}


def write_outputs(result: AnalysisResult, out: Path, plots: bool = True, phi_depth: Optional[int] = None) -> None:
    """Write table.txt, analysis.json, the rank_pattern files (with --suggest-rank) and the plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        result.files.update(make_plots(result, out, phi_depth))
    if result.rank_pattern is not None:
        result.files.update(write_rank_pattern(result, out))
    (out / "table.txt").write_text(format_table(result) + "\n")
    result.files["table"] = str(out / "table.txt")
    result.files["json"] = str(out / "analysis.json")
    (out / "analysis.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
