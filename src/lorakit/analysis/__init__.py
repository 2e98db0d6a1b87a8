"""Adapter analysis: ΔW's spectrum and effective rank, subspace similarity between adapters (LoRA paper §7.2),
ΔW vs W and the amplification factor (§7.3), rank suggestions and truncation. Entry point: `analyze`."""

from .pipeline import analyze
from .report import format_table
from .results import AdapterAnalysis, AnalysisResult, LayerAnalysis

__all__ = ["analyze", "format_table", "AnalysisResult", "AdapterAnalysis", "LayerAnalysis"]
