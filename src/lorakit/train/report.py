"""What a run leaves behind: metrics.json, loss_curve.png, generations.md, and the summary it prints."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

from ..core import atomic
from ..errors import ConfigError
from .distributed import LAUNCH_FILE

# what a run writes into its output directory (--overwrite removes these, and only these)
RUN_FILES = ("adapter", "checkpoints", "metrics.json", "options.json", "loss_curve.png", "generations.md")


def check_output_dir(options) -> None:
    """ConfigError when --output-dir already holds files and neither --overwrite nor --resume is given (a
    torchrun worker started by --nproc finds only the launch file there). Changes nothing."""
    out = Path(options.output_dir)
    if options.resume or options.overwrite or not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file, not a directory")
    held = sorted(p.name for p in out.iterdir() if p.name != LAUNCH_FILE)
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ConfigError(f"output directory {out} already holds files ({shown}): pass --overwrite to replace "
                          "a previous run's, --resume to continue it, or choose another --output-dir")


def prepare_output_dir(options, dist) -> Path:
    """Create --output-dir (on the main process); with --overwrite, first remove a previous run's files
    (RUN_FILES only: anything else in the directory is left alone)."""
    out = Path(options.output_dir)
    if dist.is_main:
        if options.overwrite and not options.resume and out.is_dir():
            for name in RUN_FILES:
                path = out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return out


def _clean(value: Any) -> Any:
    """JSON-safe copy (NaN/inf become null, tensors and paths become numbers and strings)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):
        return _clean(value.item())
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> Path:
    """Write metrics.json (made JSON-safe: NaN/inf as null); returns its path."""
    path = out_dir / "metrics.json"
    return atomic.write_text(path, json.dumps(_clean(metrics), indent=2) + "\n")


def plot_loss(out_dir: Path, history: Sequence[dict[str, Any]], title: str = "training loss") -> Path:
    """Training loss per step (and held-out loss where evaluated) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    held = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "loss_curve.png"
    atomic.write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def write_generations(out_dir: Path, prompts: Sequence[str], references: Sequence[str], before: Sequence[str],
                      after: Sequence[str]) -> Path:
    """Write generations.md: each prompt with its reference and the outputs before and after training."""
    lines = ["# Before / after generations (greedy)", ""]
    for i, (prompt, ref, b, a) in enumerate(zip(prompts, references, before, after), 1):
        lines += [f"## Example {i}", "", "**Prompt**", "", "```", prompt.strip(), "```", "",
                  f"- reference: `{ref}`", f"- before: `{b}`", f"- after:  `{a}`", ""]
    path = out_dir / "generations.md"
    return atomic.write_text(path, "\n".join(lines))


def format_scores(scores: dict[str, float]) -> str:
    """Scores as one line: shares as percentages, BLEU with two decimals, other numbers with three."""
    parts = []
    for key, value in scores.items():
        if key in ("exact_match", "field_accuracy", "accuracy"):
            parts.append(f"{key} {100 * value:.1f}%")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.3f}" if key != "bleu" else f"bleu {value:.2f}")
    return ", ".join(parts)
