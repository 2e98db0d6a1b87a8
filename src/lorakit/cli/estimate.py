"""`lorakit estimate`: the memory of fine-tuning a model, printed as a table (the arithmetic is
lorakit.train.estimate)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..train.estimate import KNOWN_SHAPES, TRAINABLE_BYTES, Estimate, estimate, weights_table


@dataclass
class EstimateOptions:
    """Options of `lorakit estimate`; each attribute's docstring is its --help text."""

    model: str = "llama-3-8b"
    """A local model directory, a config.json, or a known shape name (see --list-shapes)."""
    r: int = 8
    """LoRA rank."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Adapted modules (names or suffixes), or 'all-linear'."""
    bits: Literal[32, 16, 8, 4] = 16
    """Bits per frozen weight: 32 (fp32, e.g. CPU), 16 (bf16/fp16), 8 (int8), 4 (NF4, ≈4.13 bits with absmax)."""
    batch: int = 1
    """Sequences per step."""
    seq: int = 512
    """Tokens per sequence."""
    activation_bytes: int = 0
    """Bytes per activation element; 0: 4 for --bits 32, else 2 (bf16 autocast)."""
    gradient_checkpointing: bool = False
    """Estimate with activations recomputed per layer (only layer inputs are kept)."""
    list_shapes: bool = False
    """List the known shape names and exit."""


def gb(n: float) -> str:
    """Bytes as GB (1e9) from 1 GB up, else as MB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def run_estimate(options: EstimateOptions) -> int:
    """Print the LoRA vs full fine-tuning memory table (or, with --list-shapes, the known shape names)."""
    if options.list_shapes:
        for name, values in KNOWN_SHAPES.items():
            print(f"{name:<14} {values['model_type']}")
        return 0
    est = estimate(options.model, options.r, options.targets, options.bits, options.batch, options.seq,
                   options.activation_bytes, options.gradient_checkpointing)
    _print_setup(options, est)
    _print_table(est)
    return 0


def _print_setup(options: EstimateOptions, est: Estimate) -> None:
    s = est.shape
    share = 100 * est.trainable / (s.params + est.trainable)
    precision = {32: "fp32", 16: "bf16", 8: "int8", 4: "NF4"}[options.bits]
    print(f"{s.name}: {s.params / 1e9:.3f} B parameters, {s.layers} layers, hidden {s.hidden}")
    print(f"LoRA r={options.r} on {','.join(options.targets)}: {est.trainable:,} trainable ({share:.3f}%)")
    print(f"batch {options.batch} x seq {options.seq}, frozen weights in {precision}"
          + (", gradient checkpointing" if options.gradient_checkpointing else ""))
    print()


def _print_table(est: Estimate) -> None:
    params = est.shape.params
    print(f"{'':28}{'LoRA':>14}{'full fine-tuning':>20}")
    rows = [("frozen weights", est.weights_bytes, 0.0),  # full FT: every weight is in the 16-byte states
            ("trainable (16 B/param)", est.trainable_bytes, params * TRAINABLE_BYTES),
            ("activations", est.activation_bytes, est.activation_bytes),
            ("total", est.total_bytes, est.full_ft_bytes)]
    for label, lora, full in rows:
        print(f"{label:<28}{gb(lora):>14}{gb(full):>20}")
    print()
    print("weights alone by precision:")
    for label, n in weights_table(params):
        print(f"  {label:<12}{gb(n):>12}")
