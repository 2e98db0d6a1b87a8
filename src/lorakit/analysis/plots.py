"""PNG plots of an analysis (matplotlib's Agg canvas directly: no pyplot, no global backend switch).

spectrum.png       σ_i/σ_1 per layer (log scale), one panel per module name, a row per adapter
energy.png         share of ‖ΔW‖_F² kept by the top-k directions, with the --suggest-rank threshold
phi_<depth>.png    φ(i, j) heatmaps of one block, like the LoRA paper's Figure 3 (full and i, j ≤ 8)
phi_depth.png      φ(1,1) and the mean of φ(i,i) across blocks
amplification.png  ‖ΔW‖_F / ‖UᵀWV‖_F across blocks, per adapter (needs the base model)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..core import atomic
from .results import AdapterAnalysis, AnalysisResult, LayerAnalysis
from .table import PHI_LABEL, phi_bases

DPI = 110
ZOOM = 8  # the paper's zoomed panels: i, j ≤ 8


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> str:
    atomic.write_file(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format=Path(path).suffix.lstrip(".") or "png"))
    return str(path)


def _groups(analysis: AdapterAnalysis) -> dict[str, list[LayerAnalysis]]:
    out: dict[str, list[LayerAnalysis]] = {}
    for la in analysis.layers:
        out.setdefault(la.group, []).append(la)
    return out


def _depths(layers: list[LayerAnalysis]) -> list[int]:
    return [la.depth if la.depth is not None else i for i, la in enumerate(layers)]


def _adapters(result: AnalysisResult) -> list[AdapterAnalysis]:
    return [result.adapter] + ([result.compare] if result.compare else [])


def _depth_colors(layers: list[LayerAnalysis]):
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    depths = _depths(layers)
    norm = Normalize(min(depths), max(max(depths), min(depths) + 1))
    return [colormaps["viridis"](norm(d)) for d in depths], norm


def plot_spectra(result: AnalysisResult, path: Path) -> str:
    """σ_i / σ_1 of every layer's ΔW (log scale), a panel per module group, coloured by block; returns the PNG path."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable

    adapters = _adapters(result)
    groups = list(_groups(result.adapter))
    fig = _figure(3.6 * len(groups) + 0.8, 2.9 * len(adapters))
    axes = fig.subplots(len(adapters), len(groups), squeeze=False, sharey=True)
    for row, analysis in enumerate(adapters):
        per_group = _groups(analysis)
        for col, group in enumerate(groups):
            ax, layers = axes[row][col], per_group.get(group, [])
            colors, norm = _depth_colors(layers) if layers else ([], None)
            for la, color in zip(layers, colors):
                s = la.spectrum.s[: max(la.spectrum.rank, 1)]
                if len(s) and s[0] > 0:
                    ax.semilogy(range(1, len(s) + 1), (s / s[0]).numpy(), ".-", color=color, lw=1, ms=3)
            ax.set_title(f"{analysis.label} · {group}", fontsize=9)
            ax.set_xlabel("i (direction)", fontsize=8)
            ax.grid(alpha=0.3, which="both")
            ax.tick_params(labelsize=7)
        axes[row][0].set_ylabel("σ_i / σ_1", fontsize=8)
        if norm is not None:
            bar = fig.colorbar(ScalarMappable(norm=norm, cmap=colormaps["viridis"]), ax=axes[row][-1], pad=0.02)
            bar.set_label("block", fontsize=8)
            bar.ax.tick_params(labelsize=7)
    fig.suptitle("Singular values of ΔW (numerically non-zero ones)", fontsize=10)
    return _save(fig, path)


def plot_energy(result: AnalysisResult, path: Path) -> str:
    """Cumulative energy Σᵢ≤ₖ σᵢ² / ‖ΔW‖² against k per layer; returns the PNG path."""
    adapters = _adapters(result)
    fig = _figure(4.2 * len(adapters), 3.0)
    axes = fig.subplots(1, len(adapters), squeeze=False)[0]
    for ax, analysis in zip(axes, adapters):
        colors, _ = _depth_colors(analysis.layers)
        styles = dict(zip(_groups(analysis), ("-", "--", ":", "-.") * 4))
        for la, color in zip(analysis.layers, colors):
            e = la.spectrum.energy()[: max(la.spectrum.rank, 1)]
            ax.plot(range(1, len(e) + 1), e.numpy(), color=color, lw=1, ls=styles[la.group])
        for group, style in styles.items():  # legend entries for the line styles only
            ax.plot([], [], color="gray", ls=style, label=group)
        ax.legend(fontsize=7, loc="lower right")
        if result.energy is not None:
            ax.axhline(result.energy, color="crimson", lw=1, ls=":")
            ax.text(1, result.energy, f" {result.energy * 100:g}%", color="crimson", fontsize=7, va="bottom")
        if max(la.spectrum.rank for la in analysis.layers) > 16:
            from matplotlib.ticker import ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_title(f"{analysis.label}: cumulative energy of ΔW (dark: first block)", fontsize=9)
        ax.set_xlabel("k (top directions kept)", fontsize=8)
        ax.set_ylabel("‖ΔW_k‖F² / ‖ΔW‖F²", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    return _save(fig, path)


def _pick_depth(layers: list[LayerAnalysis], wanted: Optional[int]) -> Optional[int]:
    depths = sorted({la.depth for la in layers if la.phi and la.depth is not None})
    if not depths:
        return None
    if wanted is not None and wanted in depths:
        return wanted
    return depths[len(depths) // 2]


def _heatmap(ax, phi: torch.Tensor, title: str):
    k1, k2 = phi.shape
    image = ax.imshow(phi.numpy(), vmin=0, vmax=1, cmap="magma", aspect="auto", interpolation="nearest",
                      extent=(0.5, k2 + 0.5, k1 + 0.5, 0.5))
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("j", fontsize=8)
    ax.set_ylabel("i", fontsize=8)
    ax.tick_params(labelsize=7)
    for axis, k in ((ax.xaxis, k2), (ax.yaxis, k1)):
        step = max(1, k // 8)
        axis.set_ticks(list(range(1, k + 1, step)))
    return image


def plot_phi(result: AnalysisResult, out: Path, depth: Optional[int]) -> Optional[str]:
    """Figure-3-style heatmaps for one block: per basis (row) and module name, the full φ and i, j ≤ 8."""
    depth = _pick_depth(result.layers, depth)
    bases = phi_bases(result)
    layers = [la for la in result.layers if la.depth == depth and la.phi]
    if depth is None or not bases or not layers:
        return None
    fig = _figure(2.9 * 2 * len(layers) + 0.6, 2.6 * len(bases))
    axes = fig.subplots(len(bases), 2 * len(layers), squeeze=False)
    image = None
    for row, basis in enumerate(bases):
        for col, la in enumerate(layers):
            if basis not in la.phi:
                axes[row][col].axis("off")
                axes[row][len(layers) + col].axis("off")
                continue
            phi = la.phi[basis]
            name = f"{PHI_LABEL[basis]} · {la.group}"
            image = _heatmap(axes[row][col], phi, f"{name}  (i ≤ {phi.shape[0]}, j ≤ {phi.shape[1]})")
            _heatmap(axes[row][len(layers) + col], phi[:ZOOM, :ZOOM], f"{name}  (i, j ≤ {min(ZOOM, *phi.shape)})")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, pad=0.01).ax.tick_params(labelsize=7)
    label2 = result.compare.label if result.compare else "?"
    fig.suptitle(f"φ({result.adapter.label}, {label2}, i, j) at block {depth}: share of {result.adapter.label}'s "
                 f"top-i subspace inside {label2}'s top-j (φA: LoRA paper's basis, rows of A; φΔ: ΔW's input space)",
                 fontsize=9)
    return _save(fig, out / f"phi_{depth}.png")


def plot_phi_depth(result: AnalysisResult, path: Path) -> Optional[str]:
    """φ(1,1) and the mean φ(i,i) between the two adapters against block depth; None when no φ was computed."""
    bases = phi_bases(result)
    if not bases:
        return None
    groups = _groups(result.adapter)
    fig = _figure(4.2 * len(bases), 3.0)
    axes = fig.subplots(1, len(bases), squeeze=False)[0]
    for ax, basis in zip(axes, bases):
        for (group, layers), color in zip(groups.items(), ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7")):
            layers = [la for la in layers if basis in la.phi]
            if not layers:
                continue
            depths = _depths(layers)
            top = [float(la.phi[basis][0, 0]) for la in layers]
            diag = [float(torch.diagonal(la.phi[basis]).mean()) for la in layers]
            ax.plot(depths, top, "o-", color=color, label=f"{group}: φ(1,1)", ms=4)
            ax.plot(depths, diag, "s--", color=color, label=f"{group}: mean φ(i,i)", ms=3, alpha=0.7)
        ax.set_title(f"{PHI_LABEL[basis]} across blocks (random subspaces: ≈ max(i, j)/n)", fontsize=9)
        ax.set_xlabel("block", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_amplification(result: AnalysisResult, path: Path) -> Optional[str]:
    """The amplification factor ‖ΔW‖_F / ‖UᵀWV‖_F per layer; None without the base weights."""
    adapters = [a for a in _adapters(result) if a.has_base]
    if not adapters:
        return None
    fig = _figure(5.2, 3.2)
    ax = fig.subplots()
    for style, analysis in zip(("o-", "s--", "^:"), adapters):
        for (group, layers), color in zip(_groups(analysis).items(), ("C0", "C1", "C2", "C3", "C4", "C5")):
            layers = [la for la in layers if la.base]
            ax.plot(_depths(layers), [la.base["amplification"] for la in layers], style, color=color, ms=4,
                    label=f"{analysis.label} · {group}")
    ax.set_yscale("log")
    ax.set_title("Amplification ‖ΔW‖F / ‖UᵀWV‖F (U, V: ΔW's top-r singular vectors)", fontsize=9)
    ax.set_xlabel("block", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    return _save(fig, path)


def make_plots(result: AnalysisResult, out: Path, phi_depth: Optional[int] = None) -> dict[str, str]:
    """Every plot the result supports, written into `out`: {name: PNG path}."""
    files = {"spectrum_png": plot_spectra(result, out / "spectrum.png"),
             "energy_png": plot_energy(result, out / "energy.png")}
    for key, made in (("phi_png", plot_phi(result, out, phi_depth)),
                      ("phi_depth_png", plot_phi_depth(result, out / "phi_depth.png")),
                      ("amplification_png", plot_amplification(result, out / "amplification.png"))):
        if made is not None:
            files[key] = made
    return files
