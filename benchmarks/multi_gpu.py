"""LoRA training throughput and memory per GPU under torchrun: DDP and FSDP2, through lorakit.train.distributed.

    torchrun --nproc-per-node 1 benchmarks/multi_gpu.py --strategy fsdp      # the one-GPU baseline
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --strategy fsdp      # two GPUs, same batch per GPU
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --strategy ddp --optimize   # with lorakit.optimize()

Each process trains LoRA (r=16, all linear layers) on the Llama-3-8B shape (random bf16 weights from config,
sdpa attention) with --batch sequences of --seq tokens per GPU (weak scaling: the global batch grows with the
GPUs), through the same wrap_model / own_rows / grad_sync calls as `lorakit train`. Reported per GPU: tokens/s
and peak memory (torch.cuda.max_memory_allocated); scaling efficiency = tokens/s per GPU on N GPUs over the
one-GPU figure given with --baseline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import lorakit  # noqa: E402
from lorakit.train import distributed  # noqa: E402
from lorakit.train.estimate import load_config  # noqa: E402
from lorakit.train.loop import causal_loss_sum  # noqa: E402


def build(shape: str, r: int, strategy: str, dist, device, optimize: bool = False):
    """The adapted model, wrapped. FSDP: built on the meta device and sharded before any memory is allocated.
    optimize: lorakit.optimize() before wrapping (its patches go on the model's own modules; FSDP2 unshards each
    block's parameters before the block's fused calls read them)."""
    from transformers import AutoModelForCausalLM

    config, _ = load_config(shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("meta" if strategy == "fsdp" else device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    for p in model.parameters():  # fp32 master weights for the adapter
        if p.requires_grad:
            p.data = p.data.float()
    if optimize:
        lorakit.optimize(model)
    distributed.wrap_model(model, dist, strategy, device, bf16=True)
    if strategy == "fsdp":
        model.to_empty(device=device)
        with torch.no_grad():  # random weights (same seed on every rank); B = 0 as after LoRA's init
            for name, p in model.named_parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                local.zero_() if name.endswith("lora_B") else local.normal_(0, 0.02)
            for b in model.buffers():  # RoPE's inv_freq: 0 (no rotation); the cost is the same
                b.zero_()
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="fsdp")
    p.add_argument("--batch", type=int, default=4, help="sequences per GPU")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--baseline", type=float, default=0.0, help="one-GPU tokens/s of the same case")
    p.add_argument("--optimize", action="store_true", help="lorakit.optimize() before wrapping")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (gloo)")
    args = p.parse_args()
    dist, device = distributed.setup(args.device)
    cuda = device.type == "cuda"
    if not dist.enabled:
        raise SystemExit("start me with torchrun (see --help)")
    model = build(args.shape, args.r, args.strategy, dist, device, args.optimize)
    forward = dist.forward_model(model)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    n = args.batch * dist.world_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(32000, model.config.vocab_size), (n, args.seq), generator=g)  # every rank holds the global batch
    batch = {k: v.to(device) for k, v in dist.own_rows(
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}).items()}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            torch.cuda.synchronize() if cuda else None
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            total, count = causal_loss_sum(forward, batch)
        (total / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize() if cuda else None
    seconds = (time.perf_counter() - t0) / args.steps
    mine = {"rank": dist.rank, "tokens_per_s": args.batch * args.seq / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, "step_s": seconds}
    every = dist.gather_objects(mine)
    if dist.is_main:
        per_gpu = sum(m["tokens_per_s"] for m in every) / len(every)
        row = {"shape": args.shape, "strategy": args.strategy, "optimize": args.optimize, "gpus": dist.world_size,
               "batch_per_gpu": args.batch,
               "seq": args.seq, "tokens_per_s_per_gpu": per_gpu, "tokens_per_s_total": per_gpu * len(every),
               "peak_gib_per_gpu": max(m["peak_gib"] for m in every),
               "device": torch.cuda.get_device_name() if cuda else "cpu",
               "torch": torch.__version__, "date": str(datetime.date.today()),
               "scaling_efficiency": per_gpu / args.baseline if args.baseline else None}
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(row, indent=2))
    dist.close()


if __name__ == "__main__":
    main()
