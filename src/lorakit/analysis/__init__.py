"""Adapter analysis: ΔW's spectrum and effective rank, subspace similarity between adapters (LoRA paper §7.2),
ΔW vs W and the amplification factor (§7.3), rank suggestions and truncation. Entry point: `analyze`."""

from .pipeline import analyze
from .results import AdapterAnalysis, AnalysisResult, LayerAnalysis
from .table import format_table

__all__ = ["analyze", "format_table", "AnalysisResult", "AdapterAnalysis", "LayerAnalysis"]
