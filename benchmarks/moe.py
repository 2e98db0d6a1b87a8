"""LoRA on a mixture-of-experts model's fused expert weights (target_parameters): training-step time and peak memory
against the frozen floor, with PEFT's implementation of the same adapter beside lorakit's.

GPU (bf16, Qwen3-30B-A3B shapes from config with random weights: hidden 2048, 128 experts of 768, top-8, 32 heads;
the first --layers of its 48 layers; B=4 T=1024; transformers' grouped_mm experts; fused AdamW; r=16 alpha=32):
    python benchmarks/moe.py [--layers 8] [--cases floor,attn,experts,experts_attn,peft_experts] [--append BENCHMARKS.md]
CPU (a tiny Qwen3-MoE, fp32, B=4 T=64; checks that every case runs):
    python benchmarks/moe.py --cpu

Cases: floor (every weight frozen, the embeddings' output requiring grad: a full backward with no weight gradient),
attn (LoRA on q,k,v,o), experts (LoRA on experts.gate_up_proj and experts.down_proj), experts_attn (both), and
peft_experts (PEFT 0.21's LoRA on the same parameters). An expert adapter adds ΔW_e = s·B_e·A_e to every expert's
weights in one batched matmul per parameter and forward, so the step pays for W' = W + ΔW (written once per forward,
kept for backward) and for the gradient of W', from which A's and B's come.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_step  # noqa: E402  (make_step, environment; it puts src/ on the path)
from timing import median_ms  # noqa: E402

import lorakit  # noqa: E402

GIB = 2**30
CASES = ("floor", "attn", "experts", "experts_attn", "peft_experts")
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     vocab_size=151936, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)


def build(shape: dict, layers: int, device: str, dtype: torch.dtype, experts_impl: str):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**shape, num_hidden_layers=layers, max_position_embeddings=4096,
                         attn_implementation="sdpa", experts_implementation=experts_impl)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the benchmark dtype directly (no fp32 copy)
    try:
        with torch.device(device):
            model = Qwen3MoeForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.train()


def prepare(case: str, model, r: int):
    """Apply a case to a fresh model; returns (model, trainable parameters)."""
    targets = {"attn": dict(target_modules=ATTENTION), "experts": dict(target_modules=[], target_parameters=EXPERTS),
               "experts_attn": dict(target_modules=ATTENTION, target_parameters=EXPERTS)}
    if case == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif case == "peft_experts":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, **targets["experts"]),
                               autocast_adapter_dtype=False)  # adapters in the model's dtype, as lorakit's
    else:
        lorakit.add_adapter(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, **targets[case]))
    return model, [p for p in model.parameters() if p.requires_grad]


def run(cases, shape: dict, layers: int, bsz: int, seq: int, device: str, dtype, experts_impl: str, steps: int,
        r: int) -> list[dict]:
    """Each case built, warmed up, timed (median of `steps`) and freed in turn; peak memory of the case alone."""
    rows = []
    cuda = device == "cuda"
    for case in cases:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated() if cuda else 0
        model, params = prepare(case, build(shape, layers, device, dtype, experts_impl), r)
        g = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(0, shape["vocab_size"], (bsz, seq), device=device, generator=g)
        step = train_step.make_step(model, params, {"input_ids": ids, "labels": ids}, device)
        step()  # the optimizer state
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, reps=steps, warmup=2, cuda=cuda)
        peak = (torch.cuda.max_memory_allocated() - held) / GIB if cuda else float("nan")
        rows.append(dict(case=case, step_ms=ms, peak_gib=peak, tokens=bsz * seq,
                         trainable=sum(p.numel() for p in params)))
        del model, params, step
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | trainable | step ms | tokens/s | × floor | peak GiB |", "|---|---|---|---|---|---|"]
    floor = next((r for r in rows if r["case"] == "floor"), None)
    for r in rows:
        ratio = f"{r['step_ms'] / floor['step_ms']:.2f}" if floor else "–"
        peak = "–" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['case']} | {r['trainable']:,} | {r['step_ms']:.1f} | "
                     f"{r['tokens'] / r['step_ms'] * 1e3:,.0f} | {ratio} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="a tiny Qwen3-MoE on the CPU (fp32)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the Qwen3-30B-A3B shape (48 in full)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--experts-impl", default="grouped_mm", help="transformers' experts_implementation")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=10, help="timed steps per case")
    ap.add_argument("--append", default=None, help="append a section (command, device, date, table) to this file")
    args = ap.parse_args(argv)
    cases = args.cases.split(",")
    t0 = time.perf_counter()
    if args.cpu:
        torch.set_num_threads(1)  # tiny tensors: one thread is fastest and steadiest
        rows = run(cases, TINY, 2, 4, 64, "cpu", torch.float32, "eager", max(2, args.steps // 5), 8)
        label = "tiny Qwen3-MoE (hidden 64, 8 experts top-2, 2 layers), B=4 T=64, fp32, eager experts, r=8"
    else:
        rows = run(cases, QWEN3_30B_A3B, args.layers, args.batch, args.seq, "cuda", torch.bfloat16,
                   args.experts_impl, args.steps, args.r)
        label = (f"Qwen3-30B-A3B shapes, {args.layers} of 48 layers, B={args.batch} T={args.seq}, bf16, "
                 f"{args.experts_impl} experts, r={args.r}")
    text = f"{train_step.environment('cpu' if args.cpu else 'cuda')}\n\n{label}\n\n{table(rows)}"
    print(text)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.append:
        command = "python benchmarks/moe.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(args.append, "a") as f:
            f.write(f"\n### LoRA on MoE experts (target_parameters) vs the frozen floor ({datetime.date.today()})\n\n"
                    f"`{command}` · {text}\n")


if __name__ == "__main__":
    main()
