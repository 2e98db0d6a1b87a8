"""The fused path beyond plain LoRA, every case with lorakit.optimize(): DoRA, lora_dropout 0.1 and an NF4 base
against LoRA (dropout 0, dense base), interleaved round by round in one process (benchmarks/timing.py).

CPU (all-MiniLM-L6-v2 classifier, B=32 T=64, all-linear r=8, fp32):
    python benchmarks/fast_variants.py --cpu [--rounds 7 --steps 2] [--append BENCHMARKS.md]
GPU (bf16 Llama shapes from config, r=16 all-linear, B/T of benchmarks/train_step.py):
    python benchmarks/fast_variants.py --shapes 1b,8b [--cases lora,dora,drop,nf4] [--append BENCHMARKS.md]
GPU, Llama-3-8B QLoRA vs bf16 LoRA at B=1 T=2048, both optimize(checkpoint=True), both with checkpoint="offload",
both with checkpoint=True and cuda_graphs=True; peak memory per case:
    python benchmarks/fast_variants.py --qlora8b [--append BENCHMARKS.md]
Several GPUs: torchrun --nproc-per-node N benchmarks/multi_gpu.py --optimize (see that script).

Cases: lora, dora, drop (lora_dropout 0.1), nf4 (the base quantized to NF4; adapters as lorakit gives them), and
each with the suffix _ref for the reference path (no optimize) or _g for optimize(cuda_graphs=True) (GPU: the
blocks replayed from CUDA graphs). The table gives step time, the ratio to `lora`
(optimized) and how many adapted layers optimize() left unfused (lorakit.fusion_report).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_step  # noqa: E402  (its models, batches and step; it puts src/ on the path)

import lorakit  # noqa: E402

GIB = 2**30
CASES = ("lora", "dora", "drop", "nf4")


def prepare(case: str, model, targets, r: int, compute_dtype: torch.dtype, task_type=None):
    """Apply a case to a fresh model; returns (model, trainable params, adapted layers not fused)."""
    base = case.removesuffix("_ref").removesuffix("_g")
    if base == "nf4":
        lorakit.quantize(model, compute_dtype=compute_dtype)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type=task_type,
                                                  lora_dropout=0.1 if base == "drop" else 0.0,
                                                  use_dora=(base == "dora")))
    model.train()
    not_fused = -1
    if not case.endswith("_ref"):
        not_fused = lorakit.optimize(model, cuda_graphs=case.endswith("_g"))["not_fused"]
    return model, [p for p in model.parameters() if p.requires_grad], not_fused


def run_cpu(cases, rounds: int, steps: int) -> list[dict]:
    from transformers.utils import logging

    logging.set_verbosity_error()
    bsz, seq = 32, 64
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (bsz, seq), generator=g),
             "attention_mask": torch.ones(bsz, seq, dtype=torch.long), "labels": torch.randint(0, 2, (bsz,), generator=g)}
    runs = {}
    for case in cases:
        torch.manual_seed(0)
        model, params, not_fused = prepare(case, train_step.load_minilm(), "all-linear", 8, torch.float32, "SEQ_CLS")
        step = train_step.make_step(model, params, batch, "cpu")
        step()  # warm-up (and the optimizer state)
        runs[case] = dict(step=step, times=[], not_fused=not_fused)
    for _ in range(rounds):  # interleaved: every case sees the same machine load
        for case in cases:
            t0 = time.perf_counter()
            for _ in range(steps):
                runs[case]["step"]()
            runs[case]["times"].append((time.perf_counter() - t0) / steps)
    return [dict(shape="minilm-cpu", case=c, step_ms=statistics.median(runs[c]["times"]) * 1e3,
                 spread_ms=(max(runs[c]["times"]) - min(runs[c]["times"])) * 1e3, peak_gib=float("nan"),
                 not_fused=runs[c]["not_fused"], tokens=bsz * seq,
                 paired=train_step.paired_ratio(runs[c]["times"], runs[cases[0]]["times"])) for c in cases]


def run_gpu(shape: str, cases, rounds: int, steps: int) -> list[dict]:
    """Each case's model built in turn and kept (interleaved rounds): memory allows it on the 1B shape; for 8B
    pass one case per call, or --rounds 1."""
    _, bsz, seq = train_step.SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    runs = {}
    for case in cases:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()  # the cases built before this one stay: its peak is counted above
        torch.cuda.reset_peak_memory_stats()
        model = train_step.build_llama(shape, "cuda")
        model, params, not_fused = prepare(case, model, train_step.LLAMA_TARGETS, 16, torch.bfloat16)
        ids = torch.randint(0, model.config.vocab_size, (bsz, seq), device="cuda", generator=g)
        step = train_step.make_step(model, params, {"input_ids": ids, "labels": ids}, "cuda")
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        runs[case] = dict(step=step, times=[], not_fused=not_fused,
                          peak=(torch.cuda.max_memory_allocated() - before) / GIB)
    for _ in range(rounds):
        for case in cases:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                runs[case]["step"]()
            end.record()
            torch.cuda.synchronize()
            runs[case]["times"].append(start.elapsed_time(end) / steps / 1e3)
    return [dict(shape=shape, case=c, step_ms=statistics.median(runs[c]["times"]) * 1e3,
                 spread_ms=(max(runs[c]["times"]) - min(runs[c]["times"])) * 1e3, peak_gib=runs[c]["peak"],
                 not_fused=runs[c]["not_fused"], tokens=bsz * seq,
                 paired=train_step.paired_ratio(runs[c]["times"], runs[cases[0]]["times"])) for c in cases]


def run_qlora8b(steps: int, rounds: int = 5) -> list[dict]:
    """Llama-3-8B, B=1 T=2048, r=16 all-linear, optimize(checkpoint=...) and the fused loss: bf16 LoRA and QLoRA with
    checkpoint=True, then both with checkpoint="offload" (the memory-saving setting a 4-bit user would pick), then
    both with checkpoint=True and cuda_graphs=True (cases lora_g, nf4_g). Each case is built and its peak memory
    measured alone over a step after two (above what the cases before it hold); then all six stay resident and
    run in interleaved rounds of `steps` steps, so a host that speeds up or slows down during the run (the eager
    steps are host-bound) moves every case alike. Rows give the median round and the paired ratio to the
    like-for-like bf16 case."""
    import qlora

    cases = {}
    for quantized, checkpoint, graphs in ((False, True, False), (True, True, False), (False, "offload", False),
                                          (True, "offload", False), (False, True, True), (True, True, True)):
        torch._C._cuda_clearCublasWorkspaces()  # each case's peak counts its own cuBLAS workspaces (one per thread)
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated()
        model = qlora.build_llama(quantized, qlora.LLAMA3_8B, "cuda")
        lorakit.add_adapter(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        not_fused = lorakit.optimize(model, checkpoint=checkpoint, cuda_graphs=graphs)["not_fused"]
        params = [p for p in model.parameters() if p.requires_grad]
        ids = torch.randint(0, qlora.LLAMA3_8B["vocab_size"], (1, 2048), generator=torch.Generator().manual_seed(0))
        step = train_step.make_step(model, params, {"input_ids": ids.cuda(), "labels": ids.cuda()}, "cuda")
        step()  # warm-up (and the optimizer's state)
        step()  # graphs: captured here
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        case = "nf4" if quantized else "lora"
        case += "_offload" if checkpoint == "offload" else "_g" if graphs else ""
        cases[case] = dict(step=step, times=[], not_fused=not_fused,
                           peak_gib=(torch.cuda.max_memory_allocated() - held) / GIB)
    for _ in range(rounds):
        for run in cases.values():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                run["step"]()
            end.record()
            torch.cuda.synchronize()
            run["times"].append(start.elapsed_time(end) / steps / 1e3)
    rows = []
    for case, run in cases.items():
        base = cases["lora" + case[case.index("_"):] if "_" in case else "lora"]["times"]
        rows.append(dict(shape="8b B1 T2048", case=case, step_ms=statistics.median(run["times"]) * 1e3,
                         spread_ms=(max(run["times"]) - min(run["times"])) * 1e3, peak_gib=run["peak_gib"],
                         not_fused=run["not_fused"], tokens=2048, paired=train_step.paired_ratio(run["times"], base)))
    cases.clear()
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    paired = any("paired" in r for r in rows)
    like = " (an _offload or _g case × lora_offload or lora_g)" if any(r["case"].endswith(("_offload", "_g"))
                                                                      for r in rows) else ""
    lines = ["| shape | case | step ms | spread ms | tokens/s | × lora (time; an _offload or _g case × lora_offload or "
             "lora_g) | peak GiB "
             "| not fused |" + (f" × {rows[0]['case']}{like} (time, paired rounds) |" if paired else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if paired else "")]
    base = {(r["shape"], r["case"]): r for r in rows if r["case"] in ("lora", "lora_offload", "lora_g")}
    for r in rows:
        like = next((f"lora{s}" for s in ("_offload", "_g") if r["case"].endswith(s)), "lora")
        b = base.get((r["shape"], like))
        ratio = f"{r['step_ms'] / b['step_ms']:.3f}" if b else "–"
        peak = "–" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"
        spread = "–" if r["spread_ms"] != r["spread_ms"] else f"{r['spread_ms']:.1f}"
        nf = "– (reference)" if r["not_fused"] < 0 else str(r["not_fused"])
        lines.append(f"| {r['shape']} | {r['case']} | {r['step_ms']:.1f} | {spread} | "
                     f"{r['tokens'] / r['step_ms'] * 1e3:,.0f} | {ratio} | {peak} | {nf} |"
                     + (f" {r['paired']:.3f} |" if paired else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="the MiniLM CPU case")
    ap.add_argument("--qlora8b", action="store_true", help="GPU: Llama-3-8B QLoRA vs bf16 LoRA, B=1 T=2048")
    ap.add_argument("--shapes", default="1b")
    ap.add_argument("--cases", default=None, help=f"comma list of {', '.join(CASES)} (each also with _ref)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=10, help="steps per round (CPU default 2)")
    ap.add_argument("--json", default=None, help="append one JSON line per case to this file")
    ap.add_argument("--append", default=None, help="append a section (command, device, date, table) to this file")
    args = ap.parse_args(argv)
    cases = (args.cases or ",".join(CASES)).split(",")
    if args.cpu:
        rows = run_cpu(cases, args.rounds, args.steps if args.steps != 10 else 2)
        env = train_step.environment("cpu")
    elif args.qlora8b:
        rows = run_qlora8b(args.steps, args.rounds)
        env = train_step.environment("cuda")
    else:
        rows = [r for shape in args.shapes.split(",") for r in run_gpu(shape, cases, args.rounds, args.steps)]
        env = train_step.environment("cuda")
    text = f"{env}\n\n{table(rows)}"
    print(text)
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.append:
        command = "python benchmarks/fast_variants.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(args.append, "a") as f:
            f.write(f"\n### Fused variants: {', '.join(sorted({r['shape'] for r in rows}))} "
                    f"({datetime.date.today()})\n\n`{command}` · {text}\n")


if __name__ == "__main__":
    main()
