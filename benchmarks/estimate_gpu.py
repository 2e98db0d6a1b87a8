"""`lorakit estimate` against the measured peak GPU memory of real LoRA training steps.

For each case: build the Llama shape from its config (random bf16 weights, on the GPU), add LoRA, run a few
AdamW steps through the plain reference path (no lorakit.optimize), and compare torch.cuda.max_memory_allocated
with the estimate's total (frozen weights + 16 B per trainable parameter + activations).

    python benchmarks/estimate_gpu.py                    # llama-3.2-1b B=8 T=1024, llama-3-8b B=4 T=1024
    python benchmarks/estimate_gpu.py --cases llama-3.2-1b:8:1024:ckpt
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import lorakit  # noqa: E402
from lorakit.train.estimate import estimate, load_config  # noqa: E402

GIB = 2**30
DEFAULT_CASES = ["llama-3.2-1b:8:1024", "llama-3.2-1b:8:1024:ckpt", "llama-3-8b:4:1024", "llama-3-8b:4:1024:ckpt"]


def measure(name: str, batch: int, seq: int, r: int, checkpointing: bool, steps: int = 3) -> float:
    """Peak bytes allocated over `steps` training steps (weights, adapter, optimizer state, activations)."""
    from transformers import AutoModelForCausalLM

    config, _ = load_config(name)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, opt, x
    torch.cuda.empty_cache()
    return float(peak)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="shape:batch:seq[:ckpt]")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--json", default=None)
    p.add_argument("--benchmarks-md", default=str(REPO / "BENCHMARKS.md"), help="'' to skip")
    args = p.parse_args()
    rows = []
    for case in args.cases:
        name, batch, seq, *flags = case.split(":")
        ckpt = "ckpt" in flags
        est = estimate(name, r=args.r, targets=["all-linear"], bits=16, batch=int(batch), seq=int(seq),
                       gradient_checkpointing=ckpt)
        peak = measure(name, int(batch), int(seq), args.r, ckpt)
        rows.append({"case": case, "estimate_gib": est.total_bytes / GIB, "measured_gib": peak / GIB,
                     "weights_gib": est.weights_bytes / GIB, "activations_gib": est.activation_bytes / GIB,
                     "trainable": est.trainable, "full_ft_gib": est.full_ft_bytes / GIB})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| case (shape:batch:seq) | estimate | measured peak | estimate / measured | of which weights | "
             "activations (est.) | full FT (est.) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['estimate_gib']:.2f} GiB | {r['measured_gib']:.2f} GiB | "
                     f"{r['estimate_gib'] / r['measured_gib']:.2f} | {r['weights_gib']:.2f} GiB | "
                     f"{r['activations_gib']:.2f} GiB | {r['full_ft_gib']:.1f} GiB |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.benchmarks_md:
        from sst2 import update_benchmarks_md

        body = (f"Command: `python benchmarks/estimate_gpu.py {' '.join(sys.argv[1:])}`  \n"
                f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; Python "
                f"{platform.python_version()}; date {datetime.date.today()}  \n"
                f"LoRA r={args.r} on all linear layers, bf16 weights from config (random), sdpa attention, AdamW, "
                "3 steps through the reference path; measured = torch.cuda.max_memory_allocated; estimate = "
                "`lorakit estimate --bits 16 --targets all-linear` (ckpt: --gradient-checkpointing).\n\n" + table)
        update_benchmarks_md(Path(args.benchmarks_md), "Memory estimate vs measured (GPU)", body)


if __name__ == "__main__":
    main()
