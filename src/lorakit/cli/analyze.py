"""`lorakit analyze ADAPTER_DIR [--base MODEL] [--compare OTHER_DIR] [--out DIR] [--suggest-rank E] [--truncate k]`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..analysis import analyze
from ..errors import ConfigError
from .options import positional


@dataclass
class AnalyzeOptions:
    """Options of `lorakit analyze`; each attribute's docstring is its --help text."""

    adapter: Optional[str] = positional()
    """Adapter directory to analyse (PEFT or lorakit: adapter_config.json + adapter_model.safetensors)."""
    base: Optional[str] = None
    """Base model (local Hugging Face directory, .gguf, or 'smollm2-135m-instruct') for the figures that need W:
    ΔW-W similarity and the amplification factor. Without it only ΔW's own figures are computed."""
    compare: Optional[str] = None
    """A second adapter directory of the same base model (e.g. r=64 vs r=8): subspace similarity φ(i, j) per
    layer as in the LoRA paper's Figure 3, and its own spectrum and amplification."""
    out: str = "lorakit-analysis"
    """Directory for analysis.json, table.txt and the PNG plots."""
    suggest_rank: Optional[float] = None
    """Share of ΔW's energy to keep (e.g. 0.9): per layer the smallest LoRA rank keeping it, written as a
    rank_pattern (rank_pattern.json, and suggested_ranks.yaml for `lorakit train --config`)."""
    truncate: Optional[int] = None
    """k: write a LoRA adapter keeping the top-k directions of each ΔW, and report its error per layer."""
    truncate_out: Optional[str] = None
    """Directory of the truncated adapter (default: OUT/truncated-rK)."""
    plots: bool = True
    """Write PNG plots (spectrum, energy, φ heatmaps, amplification)."""
    phi_depth: Optional[int] = None
    """Block index whose φ heatmaps are drawn (default: the middle block)."""
    num_labels: int = 0
    """Classes of a sequence-classification base (0: read from the adapter's saved classifier head)."""
    device: str = "cpu"
    """Where to load the base model and compute: 'cpu', 'cuda', ..."""
    threads: int = 0
    """CPU threads for torch (0: torch's default). The analysis is many small decompositions, so on a busy
    machine one thread is often the fastest."""
    quiet: bool = False
    """Print nothing (the files are still written)."""


def run_analyze(options: AnalyzeOptions) -> int:
    """`lorakit analyze`: run the analysis, write its files, print the table and where the files are."""
    if not options.adapter:
        raise ConfigError("lorakit analyze needs an adapter directory: lorakit analyze ADAPTER_DIR [--base MODEL]")
    if options.threads < 0:
        raise ConfigError(f"--threads must be 0 (torch's default) or more, got {options.threads}")
    if options.threads:
        torch.set_num_threads(options.threads)  # this process is the command's own
    say = (lambda _: None) if options.quiet else print
    result = analyze(options.adapter, base=options.base, compare=options.compare, out=options.out,
                     suggest_rank=options.suggest_rank, truncate=options.truncate, truncate_out=options.truncate_out,
                     plots=options.plots, phi_depth=options.phi_depth, num_labels=options.num_labels,
                     device=options.device)
    say(result.table())
    say("")
    for role, path in result.files.items():
        say(f"{role:>18}: {path}")
    return 0
