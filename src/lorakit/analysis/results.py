"""What `lorakit.analyze` returns: per-layer figures for the adapter (and the one it is compared with)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .similarity import phi_summary
from .spectrum import Spectrum
from .table import format_table

MAX_SAVED_VALUES = 256  # singular values per layer written to JSON (LoRA ranks are well below this)
MAX_SAVED_PHI = 64  # φ[i][j] written to JSON for i, j ≤ 64 (the summaries use the whole matrix)
ENERGY_SHARES = (0.5, 0.9, 0.99)


def _finite(x: Any) -> Any:
    """JSON has no inf/NaN: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _rounded(t: torch.Tensor, digits: int = 6) -> list:
    return [[round(float(v), digits) for v in row] for row in t] if t.dim() == 2 else [float(v) for v in t]


@dataclass
class LayerAnalysis:
    """What the analysis found for one adapted layer (ΔW's spectrum, φ, ΔW vs W, rank suggestion, truncation)."""

    path: str
    shape: tuple[int, int]  # (out, n): ΔW as a matrix in the canonical orientation, n = in·kernel
    nominal_rank: Optional[int]  # the rank the config gives this layer (None for variants without one)
    spectrum: Spectrum
    a_basis: Optional[torch.Tensor] = None  # [n, r] right singular vectors of A (adapters with factors)
    base: Optional[dict[str, float]] = None  # ΔW vs W (needs the base model), see similarity.base_similarity
    phi: dict[str, torch.Tensor] = field(default_factory=dict)  # basis → φ [k1, k2] vs the compared adapter
    suggested_rank: Optional[int] = None
    truncation: Optional[dict[str, float]] = None

    @property
    def group(self) -> str:
        """The module's own name (query, v_proj, ...): layers are grouped by it in tables and plots."""
        return self.path.rsplit(".", 1)[-1]

    @property
    def depth(self) -> Optional[int]:
        """The first number in the module path (the block index), as layers_to_transform counts."""
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", self.path)
        return int(m.group(1)) if m else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures of this layer (analysis.json)."""
        spec = self.spectrum
        out: dict[str, Any] = {
            "path": self.path, "shape": list(self.shape), "nominal_rank": self.nominal_rank,
            "from_factors": spec.from_factors, "rank": spec.rank, "effective_rank": spec.effective_rank,
            "stable_rank": spec.stable_rank, "fro_norm": spec.fro_norm, "spectral_norm": spec.spectral_norm,
            "energy_rank": {str(e): spec.energy_rank(e) for e in ENERGY_SHARES},
            "singular_values": _rounded(spec.s[:MAX_SAVED_VALUES], 8),
        }
        if self.base is not None:
            out["base"] = dict(self.base)
        if self.phi:
            out["phi"] = {basis: {**phi_summary(m), "matrix": _rounded(m[:MAX_SAVED_PHI, :MAX_SAVED_PHI], 4)} for basis, m in self.phi.items()}
        if self.suggested_rank is not None:
            out["suggested_rank"] = self.suggested_rank
        if self.truncation is not None:
            out["truncation"] = dict(self.truncation)
        return out


@dataclass
class AdapterAnalysis:
    """The per-layer analyses of one adapter."""

    label: str
    source: Optional[str]
    peft_type: str
    variant: str
    has_base: bool
    layers: list[LayerAnalysis]

    def __getitem__(self, path: str) -> LayerAnalysis:
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(path)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures of this adapter."""
        return {"label": self.label, "source": self.source, "peft_type": self.peft_type, "variant": self.variant,
                "has_base": self.has_base, "layers": [la.to_dict() for la in self.layers]}


@dataclass
class AnalysisResult:
    """What lorakit.analyze returns: the adapter's analysis, the compared one, suggestions and written files."""

    adapter: AdapterAnalysis
    compare: Optional[AdapterAnalysis] = None
    base: Optional[str] = None  # the base model (path or class name), if one was used
    energy: Optional[float] = None  # the share --suggest-rank kept
    rank_pattern: Optional[dict[str, int]] = None  # the suggested LoRA rank_pattern
    truncated: Optional[Path] = None  # where --truncate wrote the smaller adapter
    truncate_k: Optional[int] = None
    files: dict[str, str] = field(default_factory=dict)  # what was written: role → path

    @property
    def layers(self) -> list[LayerAnalysis]:
        """The main adapter's layer analyses."""
        return self.adapter.layers

    def __getitem__(self, path: str) -> LayerAnalysis:
        return self.adapter[path]

    def table(self) -> str:
        """The analysis as a terminal table (format_table)."""
        return format_table(self)

    def to_dict(self) -> dict[str, Any]:
        """The analysis.json contents (non-finite numbers as null)."""
        return _finite({
            "adapter": self.adapter.to_dict(),
            "compare": self.compare.to_dict() if self.compare else None,
            "base": self.base,
            "suggest_rank": {"energy": self.energy, "rank_pattern": self.rank_pattern} if self.energy else None,
            "truncate": {"k": self.truncate_k, "directory": str(self.truncated)} if self.truncated else None,
            "files": dict(self.files),
        })
