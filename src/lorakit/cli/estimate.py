"""`lorakit estimate`: the memory of fine-tuning a model, printed as a table (the arithmetic is
lorakit.train.estimate)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ..train.estimate import KNOWN_SHAPES, TRAINABLE_BYTES, Estimate, estimate, weights_table

DEFAULT_TARGETS = ["q_proj", "v_proj"]


@dataclass
class EstimateOptions:
    """Options of `lorakit estimate`; each attribute's docstring is its --help text."""

    model: str = "llama-3-8b"
    """A local model directory, a config.json, or a known shape name (see --list-shapes)."""
    r: int = 8
    """LoRA rank."""
    targets: list[str] = field(default_factory=list)
    """Adapted modules (names or suffixes), or 'all-linear'; default q_proj v_proj (all-linear with --max-context)."""
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
    max_context: bool = False
    """Print the longest sequence (batch 1) that trains in --gpu-memory on the long-context path
    (optimize(checkpoint="offload"): offloaded block inputs, tiled MLPs, chunked loss), with each per-token
    and fixed term of the account. --targets defaults to all-linear here."""
    gpu_memory: float = 80.0
    """GPU memory in GiB (2^30 bytes), for --max-context."""
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
    if options.max_context:
        return _print_max_context(options)
    options = replace(options, targets=options.targets or list(DEFAULT_TARGETS))
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


def _print_max_context(options: EstimateOptions) -> int:
    from ..train.context_estimate import GIB, estimate_max_context, prefetch_tokens

    targets = options.targets or ["all-linear"]  # an explicit --targets q_proj v_proj is kept
    est = estimate_max_context(options.model, options.r, targets, options.bits, options.gpu_memory)
    precision = {32: "fp32", 16: "bf16", 8: "int8", 4: "NF4"}[options.bits]
    print(f"{est.shape.name}, LoRA r={options.r} on {','.join(targets)}, {precision} weights, batch 1, "
          f"{options.gpu_memory:g} GiB; optimize(checkpoint=\"offload\") with tiled MLPs")
    print("\nper token (one block's backward at its peak):")
    for term in est.per_token:
        if term.size:
            print(f"  {term.name:<40}{term.size:>9,.0f} B   {term.why}")
    print(f"  {'total':<40}{est.bytes_per_token:>9,.0f} B   = {est.bytes_per_token * 1000 / GIB:.3f} GiB per 1k tokens")
    print("\nfixed:")
    for term in est.fixed:
        print(f"  {term.name:<40}{term.size / GIB:>9.2f} GiB {term.why}")
    print(f"  {'total':<40}{est.fixed_bytes / GIB:>9.2f} GiB")
    tokens = est.max_tokens
    print(f"\nlongest context: {tokens:,} tokens (peak {est.peak_bytes(tokens) / GIB:.1f} GiB)")
    print(f"host memory for the offloaded block inputs: {est.host_bytes_per_token * tokens / GIB:.0f} GiB pinned "
          f"({est.host_bytes_per_token / 1024:.0f} KiB per token)")
    print(f"(sequences up to {prefetch_tokens(est.shape):,} tokens also prefetch one block input: "
          f"+{2 * est.shape.hidden:,} B per token)")
    return 0
