"""`lorakit.analyze`: what did the adapter learn? The Python API behind `lorakit analyze`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..errors import ConfigError
from ..core.api import list_adapters
from . import adapters
from .adapters import AdapterView
from .report import write_outputs
from .results import AdapterAnalysis, AnalysisResult, LayerAnalysis
from .similarity import base_similarity, subspace_similarity
from .spectrum import right_singular_vectors, top_singular
from .truncate import truncate as write_truncated

MAX_PHI_DIRECTIONS = 256  # φ over at most this many of ΔW's directions (dense variants can have thousands)
PathLike = Union[str, os.PathLike]


def analyse_view(view: AdapterView) -> AdapterAnalysis:
    """ΔW's figures of every layer (the ΔW–W figures are added by add_base_figures)."""
    layers = []
    for path, entry in view.layers.items():
        factors = entry.delta.low_rank_factors()
        layers.append(LayerAnalysis(
            path=path, shape=entry.shape, nominal_rank=entry.nominal_rank(view.config),
            spectrum=entry.spectrum(view.has_base),
            a_basis=right_singular_vectors(factors[1]) if factors is not None else None))
    return AdapterAnalysis(view.label, view.source, view.peft_type, view.variant, view.has_base, layers)


def add_base_figures(views: list[AdapterView], analyses: list[AdapterAnalysis]) -> None:
    """ΔW vs W for every layer of every adapter that has its base. All views of one call share one base
    model, so each W is decomposed once, to the largest rank any adapter needs there."""
    per_path: dict[str, list[tuple[AdapterView, LayerAnalysis]]] = {}
    for view, analysis in zip(views, analyses):
        if view.has_base:
            for la in analysis.layers:
                per_path.setdefault(la.path, []).append((view, la))
    for path, entries in per_path.items():
        w = entries[0][0].layers[path].base_weight()  # the base layer outlives the adapter's removal
        k = max(la.spectrum.rank for _, la in entries)
        top = top_singular(w, k) if k else None
        for _, la in entries:
            la.base = base_similarity(la.spectrum, w, top)


def compare_layers(x: LayerAnalysis, y: LayerAnalysis) -> dict[str, torch.Tensor]:
    """φ(x, y, i, j) on each basis both layers have: "A" (the paper's: right singular vectors of the factor A),
    "delta_in" / "delta_out" (ΔW's right / left singular vectors, any variant)."""
    if x.shape != y.shape:
        return {}
    phi = {}
    if x.a_basis is not None and y.a_basis is not None and x.a_basis.shape[1] and y.a_basis.shape[1]:
        phi["A"] = subspace_similarity(x.a_basis, y.a_basis)
    kx, ky = min(x.spectrum.rank, MAX_PHI_DIRECTIONS), min(y.spectrum.rank, MAX_PHI_DIRECTIONS)
    if kx and ky:
        phi["delta_in"] = subspace_similarity(x.spectrum.v[:, :kx], y.spectrum.v[:, :ky])
        phi["delta_out"] = subspace_similarity(x.spectrum.u[:, :kx], y.spectrum.u[:, :ky])
    return phi


def suggest_ranks(analysis: AdapterAnalysis, energy: float) -> dict[str, int]:
    """Per layer, the smallest rank keeping `energy` of ‖ΔW‖_F² (at least 1: rank_pattern values are positive)."""
    pattern = {}
    for la in analysis.layers:
        la.suggested_rank = max(1, la.spectrum.energy_rank(energy))
        pattern[la.path] = la.suggested_rank
    return pattern


def _openers(adapter, base, compare, name: str, num_labels: int, device: str) -> list[Callable[[], AdapterView]]:
    """How to open the adapter and the one it is compared with. They are opened (and a base model's copy
    taken off again) one after the other, so a base model never holds both at once."""
    if isinstance(adapter, nn.Module):
        if base is not None:
            raise ConfigError("pass base= only with an adapter directory; a model already has its base weights")
        openers = [lambda: adapters.from_model(adapter, name)]
        if compare is not None:
            if isinstance(compare, str) and compare in list_adapters(adapter):
                openers.append(lambda: adapters.from_model(adapter, compare))
            else:
                openers.append(lambda: adapters.attached(adapter, compare))
        return openers
    sources = [adapter] + ([compare] if compare is not None else [])
    for s in sources:
        if not isinstance(s, (str, os.PathLike)):
            raise ConfigError(f"an adapter is a directory or a model with the adapter attached, got {type(s).__name__}")
    if base is None:
        return [lambda s=s: adapters.from_directory(s) for s in sources]
    model = base if isinstance(base, nn.Module) else adapters.load_base_model(str(base), adapter, num_labels, device)

    def open_on_base(source) -> AdapterView:
        view = adapters.attached(model, source)
        if not isinstance(base, nn.Module):
            view.base_label = str(base)
        return view

    return [lambda s=s: open_on_base(s) for s in sources]


def _check_arguments(adapter, out, suggest_rank, truncate, truncate_out, plots) -> Optional[Path]:
    """Refuse bad arguments before any work; returns where a truncated adapter goes."""
    if truncate is not None and (not isinstance(truncate, int) or truncate < 1):
        raise ConfigError(f"--truncate takes a rank k >= 1, got {truncate!r}")
    if truncate is not None and truncate_out is None and out is None:
        raise ConfigError("--truncate needs a directory: pass out= or truncate_out=")
    if truncate is not None:
        truncate_out = Path(truncate_out) if truncate_out is not None else Path(out) / f"truncated-r{truncate}"
        if not isinstance(adapter, nn.Module) and truncate_out.resolve() == Path(adapter).resolve():
            raise ConfigError("--truncate would overwrite the adapter it reads; pick another directory")
    if out is not None and plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("the plots need matplotlib (pip install matplotlib, or lorakit[train]); "
                              "or pass --no-plots") from None
    if suggest_rank is not None and not 0.0 < suggest_rank <= 1.0:
        raise ConfigError(f"--suggest-rank takes the share of ΔW's energy to keep, in (0, 1], got {suggest_rank!r}")
    return truncate_out


def analyze(adapter: Union[PathLike, nn.Module], *, base: Union[PathLike, nn.Module, None] = None,
            compare: Union[PathLike, str, None] = None, out: Optional[PathLike] = None,
            suggest_rank: Optional[float] = None, truncate: Optional[int] = None,
            truncate_out: Optional[PathLike] = None, name: str = "default", plots: bool = True,
            phi_depth: Optional[int] = None, num_labels: int = 0, device: str = "cpu",
            log: Optional[Callable[[str], None]] = None) -> AnalysisResult:
    """Spectrum, effective rank, subspace similarity, ΔW–W similarity and amplification of an adapter's ΔW.

    adapter: an adapter directory (PEFT or lorakit), or a model with adapter `name` attached.
    base: the base model (a local HF directory, a .gguf, or an nn.Module) for the figures that need W
        (ΔW–W similarity, amplification). Without it, a directory is analysed from its tensors alone.
    compare: a second adapter directory (or, with a model, another adapter's name) of the same base: φ
        between the two per layer (the LoRA paper's Figure 3), and its own figures.
    out: write analysis.json, table.txt and PNG plots here (None: nothing is written).
    suggest_rank: a share of ΔW's energy (e.g. 0.9): per layer the smallest rank keeping it, written as a
        LoRA rank_pattern (rank_pattern.json, and suggested_ranks.yaml for `lorakit train --config`).
    truncate: k: write a LoRA adapter keeping each ΔW's top-k directions (to truncate_out, default
        out/truncated-r{k}) and report its relative Frobenius error per layer.
    phi_depth: the block index whose φ heatmaps are drawn (default: the middle one).
    A base model passed as an nn.Module gets the adapters attached for the analysis and removed after.
    """
    truncate_out = _check_arguments(adapter, out, suggest_rank, truncate, truncate_out, plots)
    log = log or (lambda _: None)
    views, analyses = [], []
    for open_view in _openers(adapter, base, compare, name, num_labels, device):
        view = open_view()
        try:
            analyses.append(analyse_view(view))
        finally:
            adapters.detach(view)  # its layers and deltas stay usable here (truncate writes from them)
        views.append(view)
        log(f"analysed {len(analyses[-1].layers)} layers of {view.label}")
    add_base_figures(views, analyses)
    return _finish(views, analyses, out, suggest_rank, truncate, truncate_out, plots, phi_depth, log)


def _finish(views, analyses, out, suggest_rank, truncate, truncate_out, plots, phi_depth, log) -> AnalysisResult:
    main = analyses[0]
    result = AnalysisResult(main, base=views[0].base_label)
    if len(views) > 1:
        result.compare = analyses[1]
        other = {la.path: la for la in result.compare.layers}
        for la in main.layers:
            if la.path in other:
                la.phi = compare_layers(la, other[la.path])
        if not any(la.phi for la in main.layers):
            raise ConfigError(f"{result.compare.label} adapts none of {main.label}'s layers with the same shape")
    if suggest_rank is not None:
        result.energy = float(suggest_rank)
        result.rank_pattern = suggest_ranks(main, result.energy)
        if result.compare is not None:
            suggest_ranks(result.compare, result.energy)
    if truncate is not None:
        result.truncated = write_truncated(views[0], main.layers, truncate, truncate_out)
        result.truncate_k = truncate
        result.files["truncated_adapter"] = str(result.truncated)
        log(f"wrote the rank-{truncate} adapter to {result.truncated}")
    if out is not None:
        write_outputs(result, Path(out), plots=plots, phi_depth=phi_depth)
    return result
