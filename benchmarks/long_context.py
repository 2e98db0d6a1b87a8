"""Long-context training memory: the longest batch-1 sequence Llama-3-8B (shape from its config, random weights)
trains on with LoRA r16 all-linear and optimize(checkpoint="offload") (offloaded block inputs, tiled MLPs,
chunked loss), NF4 or bf16 base, inside an emulated 80 GiB card (torch.cuda.set_per_process_memory_fraction).

    # GPU (one H200): each call fits in ~8 minutes
    python benchmarks/long_context.py --bits 4  --layers 2 --lengths 131072,262144,524288,700000,760000
    python benchmarks/long_context.py --bits 16 --layers 2 --lengths 131072,393216,600000,650000
    python benchmarks/long_context.py --bits 4  --layers 32 --lengths 32768 --steps 3 --legacy   # throughput vs before
    python benchmarks/long_context.py --bits 4  --layers 2 --check                           # offload == recompute
    python benchmarks/long_context.py --cpu                                                  # a tiny shape: the script

--layers N < 32 builds N of the 32 decoder layers and allocates the other layers' exact bytes (frozen weights at
--bits, LoRA factors, grads and AdamW moments) as one ballast tensor: the device holds what the whole model
holds, but the step does N/32 of the attention work (a 32-layer step at 700k tokens is ~20 minutes of flash
attention on an H200). The per-token memory is one block's working set, the same for 2 layers as for 32; the
block inputs of all layers live in pinned host memory (--layers 32 at 700k: ~171 GiB of host RAM).
Each length runs one real training step (forward, backward, AdamW); peak = torch.cuda.max_memory_allocated.
--append BENCHMARKS.md adds the command, device, date and table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

# the device allocator grows segments instead of fragmenting multi-GB blocks. (Newer torch can also stop rounding
# large pinned blocks up to a power of two, `pinned_max_round_threshold_mb`; torch 2.11 refuses that key.)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import lorakit  # noqa: E402
from lorakit.fast import checkpoint as ckpt  # noqa: E402
from lorakit.train.context_estimate import GIB, estimate_max_context  # noqa: E402
from lorakit.train.estimate import BYTES_PER_WEIGHT, TRAINABLE_BYTES, lora_targets, shape_of  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False)
FULL_LAYERS = 32


def build(bits: int, layers: int, cpu: bool):
    """The model with `layers` decoder layers, LoRA r on every linear; on CPU the tiny shape in fp32."""
    if cpu:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="sdpa", use_cache=False)).train()
        if bits == 4:
            lorakit.quantize(model, compute_dtype=torch.float32)
        return model
    import qlora

    return qlora.build_llama(bits == 4, dict(qlora.LLAMA3_8B, num_hidden_layers=layers), "cuda")


def missing_layer_bytes(bits: int, r: int, layers: int) -> int:
    """Exact bytes of the Llama-3-8B decoder layers not built: frozen linears at `bits`, two bf16 norms, LoRA
    factors with their grads and AdamW moments (16 B per trainable parameter)."""
    shape = shape_of("llama-3-8b")
    first = [dims for path, dims in lora_targets(shape, ["all-linear"]).items() if path.startswith("model.layers.0.")]
    linear = sum(fan_in * fan_out for fan_in, fan_out in first)
    lora = sum(r * (fan_in + fan_out) for fan_in, fan_out in first)
    per_layer = linear * BYTES_PER_WEIGHT[bits] + 2 * shape.hidden * 2 + lora * TRAINABLE_BYTES
    return int((FULL_LAYERS - layers) * per_layer)


def legacy_offload() -> None:
    """The offload of before this benchmark (copies on the compute stream, no prefetch, MLPs untiled): --legacy."""

    class Legacy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, anchor, run, stashed, overlap, *params):
            ctx.n_params = len(params)
            ctx.run, ctx.device = run, hidden.device
            ctx.rng = ckpt.device_rng_state(hidden.device)
            ctx.cpu = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
            ctx.cpu.copy_(hidden, non_blocking=True)
            stashed.append(None)
            with torch.no_grad():
                return run(hidden)

        @staticmethod
        def backward(ctx, dout, *_):  # the block's first output's gradient (a Llama block returns one tensor)
            hidden = ctx.cpu.to(ctx.device, non_blocking=True).requires_grad_(True)
            ctx.cpu = None
            devices = [ctx.device] if ctx.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                ckpt.restore_device_rng(ctx.device, ctx.rng)
                out = ctx.run(hidden)[0]
            torch.autograd.backward(out, dout)
            return (hidden.grad, None, None, None, None) + (None,) * ctx.n_params  # .grad accumulated

    ckpt._OffloadedBlock = Legacy


def one_step(model, opt, tokens: int, vocab: int, device: str) -> tuple[float, float]:
    """(seconds, peak bytes) of one training step on a random batch of 1 × tokens."""
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, float(torch.cuda.max_memory_allocated()) if device == "cuda" else float("nan")


def check(model, vocab: int, device: str, tokens: int) -> str:
    """Loss and LoRA gradients of offload + tiled MLPs against torch's checkpoint, on this device."""
    ids = torch.randint(0, vocab, (1, tokens), device=device, generator=None)
    results = []
    for mode, tile in ((True, False), ("offload", max(16, tokens // 7))):
        lorakit.unoptimize(model)
        lorakit.optimize(model, checkpoint=mode, tile_mlp=tile)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad.float().clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        results.append((loss.item(), grads))
    (l0, g0), (l1, g1) = results
    worst = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(g1, g0))
    verdict = "OK" if abs(l1 - l0) <= 2e-3 * abs(l0) and worst < 3e-2 else "MISMATCH"
    return f"check at T={tokens}: loss {l0:.6f} vs {l1:.6f}, worst LoRA grad rel. diff {worst:.2e}: {verdict}"


def run(args) -> list[str]:
    device = "cpu" if args.cpu else "cuda"
    bits = args.bits
    model = build(bits, args.layers, args.cpu)
    vocab = model.config.vocab_size
    lorakit.add_adapter(model, lorakit.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"))
    model.train()
    lines = [(f"Llama-3-8B shape ({args.layers} of {FULL_LAYERS} layers built)" if not args.cpu else "tiny shape (CPU)")
             + f", sdpa backend: {args.sdpa}"]
    if args.check:
        lines.append(check(model, vocab, device, args.check_tokens))
        print(lines[-1])
        return lines
    ballast = None
    if not args.cpu:
        extra = missing_layer_bytes(bits, args.r, args.layers)
        ballast = torch.empty(extra, dtype=torch.uint8, device="cuda")
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory * GIB / total))
        lines.append(f"ballast for the {FULL_LAYERS - args.layers} layers not built: {extra / GIB:.2f} GiB; "
                     f"cap {args.gpu_memory:g} GiB of {total / GIB:.0f}")
    if args.legacy:
        legacy_offload()
    counts = lorakit.optimize(model, checkpoint="offload", tile_mlp=False if args.legacy else None)
    lines.append(f"optimize: {counts['linear']} fused linears, {counts['not_fused']} not fused, "
                 f"{counts['checkpoint']} offloaded blocks, {counts['tiled_mlp']} tiled MLPs")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    predicted = estimate_max_context("llama-3-8b", r=args.r, bits=bits, gpu_memory_gib=args.gpu_memory)
    lines += [f"bits {bits}, LoRA r{args.r} all-linear, B=1, offload{' (legacy)' if args.legacy else ''}; "
              f"estimate: {predicted.bytes_per_token * 1000 / GIB:.3f} GiB per 1k tokens, "
              f"longest {predicted.max_tokens:,}", "",
              "| tokens | peak GiB | estimate GiB | GiB per 1k tokens (vs row above) | step s | tokens/s |",
              "|---|---|---|---|---|---|"]
    print("\n".join(lines))
    previous, longest = None, 0
    for tokens in args.lengths:
        try:
            times = [one_step(model, opt, tokens, vocab, device) for _ in range(args.steps)]
        except (torch.OutOfMemoryError, RuntimeError) as e:  # e.g. a kernel's own length limit: say which
            opt.zero_grad(set_to_none=True)
            what = "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"error: {str(e).splitlines()[0][:120]}"
            lines.append(f"| {tokens:,} | {what} | {predicted.peak_bytes(tokens) / GIB:.1f} | | | |")
            print(lines[-1])
            break
        seconds = sorted(t for t, _ in times[1:] or times)[len(times[1:] or times) // 2]
        peak = max(p for _, p in times)
        slope = (f"{(peak - previous[1]) / (tokens - previous[0]) * 1000 / GIB:.3f}" if previous else "")
        measured = f"{peak / GIB:.2f}" if not args.cpu else "n/a (CPU)"
        expected = f"{predicted.peak_bytes(tokens) / GIB:.1f}" if not args.cpu else ""
        lines.append(f"| {tokens:,} | {measured} | {expected} | {slope if not args.cpu else ''} | "
                     f"{seconds:.2f} | {tokens / seconds:,.0f} |")
        print(lines[-1], flush=True)
        previous, longest = (tokens, peak), tokens
    lines += ["", f"largest T that ran: {longest:,}"]
    print(lines[-1])
    del ballast
    return lines


def sdpa_backend(name: str):
    """A context restricting sdpa to one backend ("auto": no restriction)."""
    import contextlib

    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    return sdpa_kernel([backend])


def append(path: Path, argv: list[str], lines: list[str]) -> None:
    """Add this run's section (command, device, date, table) to BENCHMARKS.md."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"\n## Long context (benchmarks/long_context.py)\n\n`python benchmarks/long_context.py {' '.join(argv)}`"
            f" — {device}, torch {torch.__version__}, {when}\n\n" + "\n".join(lines) + "\n")
    with path.open("a") as f:
        f.write(text)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, choices=(4, 16), default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2, help=f"decoder layers built (of {FULL_LAYERS})")
    ap.add_argument("--lengths", default="131072,262144,524288,700000",
                    help="comma-separated sequence lengths, ascending; stops at the first out-of-memory")
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="emulated card size in GiB")
    ap.add_argument("--steps", type=int, default=1, help="steps per length (the first is dropped from the time)")
    ap.add_argument("--legacy", action="store_true", help="the offload of before (no side stream, MLPs untiled)")
    ap.add_argument("--check", action="store_true", help="only compare offload+tiling with recompute at --check-tokens")
    ap.add_argument("--check-tokens", type=int, default=4096)
    ap.add_argument("--sdpa", choices=("auto", "flash", "cudnn", "efficient"), default="auto",
                    help="restrict scaled_dot_product_attention to one backend (auto: torch's choice)")
    ap.add_argument("--cpu", action="store_true", help="the tiny shape on CPU, small lengths (checks the script)")
    ap.add_argument("--append", default="", help="append the result to this markdown file (e.g. BENCHMARKS.md)")
    args = ap.parse_args(argv)
    args.lengths = [int(t) for t in args.lengths.split(",")]
    if args.cpu:
        args.layers = TINY["num_hidden_layers"]
        args.lengths = [t for t in args.lengths if t <= 4096] or [256, 1024]
        args.check_tokens = min(args.check_tokens, 512)
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu")
    with sdpa_backend(args.sdpa):
        lines = run(args)
    if args.append:
        append(Path(args.append), argv, lines)


if __name__ == "__main__":
    main()
