"""The analysis written to disk: table.txt, analysis.json, the suggested rank_pattern files and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..core import atomic
from .plots import make_plots
from .results import AnalysisResult
from .table import format_table


def write_rank_pattern(result: AnalysisResult, out: Path) -> dict[str, str]:
    """rank_pattern.json (the bare dict, for LoraConfig(rank_pattern=...)) and suggested_ranks.yaml (a
    `lorakit train --config` file: the same dict under adapter_options, r = the largest suggested rank)."""
    pattern = result.rank_pattern or {}
    atomic.write_text(out / "rank_pattern.json", json.dumps(pattern, indent=2) + "\n")
    settings = {"r": max(pattern.values(), default=8), "adapter_options": {"rank_pattern": pattern}}
    note = (f"# lorakit analyze --suggest-rank {result.energy:g}: per layer, the smallest LoRA rank keeping "
            f"{result.energy * 100:g}% of ΔW's energy\n# in {result.adapter.label}. Use: lorakit train --config "
            "suggested_ranks.yaml (other flags as before; lora_alpha is kept as given, so alpha/r follows each rank).\n")
    try:
        import yaml

        text = yaml.safe_dump(settings, sort_keys=False)
    except ImportError:  # JSON is YAML too
        text = json.dumps(settings, indent=2) + "\n"
    atomic.write_text(out / "suggested_ranks.yaml", note + text)
    return {"rank_pattern": str(out / "rank_pattern.json"), "train_config": str(out / "suggested_ranks.yaml")}


def write_outputs(result: AnalysisResult, out: Path, plots: bool = True, phi_depth: Optional[int] = None) -> None:
    """Write table.txt, analysis.json, the rank_pattern files (with --suggest-rank) and the plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        result.files.update(make_plots(result, out, phi_depth))
    if result.rank_pattern is not None:
        result.files.update(write_rank_pattern(result, out))
    atomic.write_text(out / "table.txt", format_table(result) + "\n")
    result.files["table"] = str(out / "table.txt")
    result.files["json"] = str(out / "analysis.json")
    atomic.write_text(out / "analysis.json", json.dumps(result.to_dict(), indent=1) + "\n")
