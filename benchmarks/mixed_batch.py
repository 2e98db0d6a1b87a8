"""Mixed-adapter batches on one GPU: base forward, PEFT 0.21 mixed batch (`adapter_names=`), lorakit
`per_row` (Triton SGMV prefill / BGMV decode), one adapter unmerged, merged; and decode tokens/s.

    python benchmarks/mixed_batch.py [--md section.md] [--json results.json] [--skip-peft]
    python benchmarks/mixed_batch.py --diagnose DIR   # layer-level timings, block variants, a profile
    python benchmarks/mixed_batch.py --smoke           # toy sizes on CPU: checks the script, measures nothing

Llama-3.2-1B shape from config (random weights), bf16, sdpa, eval, torch.no_grad; LoRA r=16, alpha=32 on
q,k,v,o,gate,up,down (all-linear), random A and B (init_lora_weights=False) in both libraries, adapters in
bf16 in both (PEFT: autocast_adapter_dtype=False). Full-vocabulary logits for every position, as HF's
forward returns by default. Times: median of CUDA-event timings after warm-up (and, beside each prefill, the host
time until the call returns, its launches queued: above the device time the call is host-bound); each lorakit
mixed-batch timing includes entering the `per_row` block (its per-layer stacks are cached from the first entry).
Before timing, lorakit's mixed batch is checked against its per-adapter reference (impl="reference"), and the
replayed one (lorakit.PerRowGraphs, use_cache=False, logits copied out of the graph) against per_row's eager output.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lorakit  # noqa: E402
from timing import median_host_ms, median_ms  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)
RANK, ALPHA = 16, 32
PREFILL = {"8 adapters, 32×512, each row its own": (8, 32, 512, 1.2),
           "32 adapters, 32×128, each row its own": (32, 32, 128, 1.3)}
SINGLE = (32, 512, 1.10)
DECODE = (32, 64, 32)  # rows, prompt tokens, new tokens
DEV = "cuda"


def smoke_settings() -> None:
    """--smoke: the same code path on CPU at toy sizes (checks the script, measures nothing)."""
    global DEV, SINGLE, DECODE
    DEV = "cpu"
    LLAMA_1B.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=256)
    for label, (n, _, _, goal) in list(PREFILL.items()):
        PREFILL[label] = (n, 32, 8, goal)
    SINGLE, DECODE = (32, 8, 1.10), (32, 4, 3)


def build_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B, attn_implementation="sdpa")).to(torch.bfloat16)
    return model.eval()


def timed(fn, warmup: int = 2, reps: int = 10) -> float:
    """Median milliseconds of fn() (CUDA events; wall clock on the CPU)."""
    return median_ms(fn, reps, warmup, cuda=DEV != "cpu")


def host_ms(fn) -> float:
    return median_host_ms(fn, 10, cuda=DEV != "cpu")


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def record(results: list, **row) -> None:
    results.append(row)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)


def tokens_per_s(generate, rows: int, new: int) -> float:
    """Generated tokens per second: the better of two timed runs after a full-length warm-up."""
    generate(new)  # warm-up (kernel compilation, caches, allocator)
    best = 0.0
    for _ in range(2):
        _sync()
        t0 = time.perf_counter()
        generate(new)
        _sync()
        best = max(best, rows * new / (time.perf_counter() - t0))
    return best


def ids_for(rows: int, tokens: int) -> torch.Tensor:
    return torch.randint(1, LLAMA_1B["vocab_size"], (rows, tokens), device=DEV,
                         generator=torch.Generator(DEV).manual_seed(rows * tokens))


def gen_fn(model, ids, **kw):
    return lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


# --- lorakit ----------------------------------------------------------------------------------------------------
def add_lorakit(model, n: int) -> None:
    for i in range(n):
        torch.manual_seed(100 + i)
        lorakit.add_adapter(model, lorakit.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                                      init_lora_weights=False), f"a{i}")
    model.eval()  # new adapted layers start in training mode


def check_lorakit(model, names) -> float:
    """Relative error of the kernel path against the per-adapter reference on a slice of the batch."""
    ids = ids_for(len(names), 64)
    with lorakit.per_row(model, names, impl="reference"):
        ref = model(ids).logits.float()
    with lorakit.per_row(model, names):
        out = model(ids).logits.float()
    return float((out - ref).norm() / ref.norm())


def lorakit_rows(model, results, base_ms):
    add_lorakit(model, 32)
    for label, (n_adapters, rows, tokens, goal) in PREFILL.items():
        names = [f"a{i % n_adapters}" for i in range(rows)]
        err = check_lorakit(model, names[:8])
        ids = ids_for(rows, tokens)

        def run():
            with lorakit.per_row(model, names):
                model(ids)
        ms = timed(run)
        record(results, case=label, impl="lorakit per_row", ms=ms, base_ms=base_ms[label], goal=goal,
                       check_rel_err=err, host_ms=host_ms(run))
        graph_rows(model, results, label, names, ids, base_ms[label], goal)
    rows, tokens, goal = SINGLE
    ids = ids_for(rows, tokens)
    lorakit.set_active(model, "a0")
    record(results, case="one adapter", impl="lorakit unmerged", ms=timed(lambda: model(ids)),
                        base_ms=base_ms["single"], goal=goal)
    try:
        lorakit.optimize(model, group=True, norms=False, rope=False, glu=False, fused_loss=False)
        record(results, case="one adapter", impl="lorakit unmerged + optimize (LoRA linears only)",
                       ms=timed(lambda: model(ids)), base_ms=base_ms["single"], goal=goal)
        lorakit.unoptimize(model)
    except Exception as e:  # another team's fast path; report, don't fail the run
        print(f"optimize skipped: {type(e).__name__}: {e}")
    lorakit.merge(model, ["a0"])
    record(results, case="one adapter", impl="lorakit merged", ms=timed(lambda: model(ids)),
                        base_ms=base_ms["single"], goal=None)
    lorakit.unmerge(model)
    rows, prompt, new = DECODE
    ids = ids_for(rows, prompt)
    for n_adapters in (8, 32):
        names = [f"a{i % n_adapters}" for i in range(rows)]

        def generate(n):
            with lorakit.per_row(model, names):
                return gen_fn(model, ids)(n)
        record(results, case=f"decode {rows} rows, {n_adapters} adapters", impl="lorakit per_row",
                       tok_s=tokens_per_s(generate, rows, new), base_tok_s=base_ms["decode"])


def graph_rows(model, results, label: str, names: list, ids, base_ms: float, goal: float) -> None:
    """The same mixed batch replayed by lorakit.PerRowGraphs (captured once, then every call a replay with the
    logits copied out), against the eager base forward and against the base forward replayed the same way (all
    rows None: the adapted model's graph without any adapter work)."""
    graphs = lorakit.PerRowGraphs(model)
    with lorakit.per_row(model, names):
        eager = model(ids).logits.float()
    graphs(names, ids)  # captured here
    err = float((graphs(names, ids).logits.float() - eager).norm() / eager.norm())
    del eager
    replay, base = (lambda: graphs(names, ids)), (lambda: graphs([None] * len(names), ids))
    ms, base_replay_ms = timed(replay), timed(base)
    record(results, case=label, impl="base forward, replayed (PerRowGraphs, all rows None)", ms=base_replay_ms,
           base_ms=base_ms, host_ms=host_ms(base))
    record(results, case=label, impl="lorakit PerRowGraphs (replayed)", ms=ms, base_ms=base_ms, goal=goal,
           check_rel_err=err, host_ms=host_ms(replay))
    record(results, case=label, impl="lorakit PerRowGraphs × the replayed base", ms=ms, base_ms=base_replay_ms,
           goal=goal)
    graphs.clear()


# --- PEFT -------------------------------------------------------------------------------------------------------
def peft_rows(base, results, base_ms):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(100)
    model = get_peft_model(base, cfg, adapter_name="a0", autocast_adapter_dtype=False)
    for i in range(1, 32):
        torch.manual_seed(100 + i)
        model.add_adapter(f"a{i}", cfg, autocast_adapter_dtype=False)
    model.to(torch.bfloat16).eval()
    for label, (n_adapters, rows, tokens, goal) in PREFILL.items():
        names = [f"a{i % n_adapters}" for i in range(rows)]
        ids = ids_for(rows, tokens)
        ms = timed(lambda: model(input_ids=ids, adapter_names=names), warmup=1, reps=3)
        record(results, case=label, impl="PEFT adapter_names", ms=ms, base_ms=base_ms[label], goal=goal)
    rows, tokens, goal = SINGLE
    ids = ids_for(rows, tokens)
    model.set_adapter("a0")
    record(results, case="one adapter", impl="PEFT unmerged", ms=timed(lambda: model(input_ids=ids), reps=5),
                        base_ms=base_ms["single"], goal=goal)
    rows, prompt, new = DECODE
    ids = ids_for(rows, prompt)
    for n_adapters in (8, 32):
        names = [f"a{i % n_adapters}" for i in range(rows)]
        gen = lambda n: model.generate(input_ids=ids, adapter_names=names, max_new_tokens=n,  # noqa: E731
                                       min_new_tokens=n, do_sample=False, pad_token_id=0)
        record(results, case=f"decode {rows} rows, {n_adapters} adapters", impl="PEFT adapter_names",
                       tok_s=tokens_per_s(gen, rows, new), base_tok_s=base_ms["decode"])


# --- diagnostics (--diagnose) -------------------------------------------------------------------------------------
def diagnose(model, out_dir: Path) -> None:
    """Layer-level timings (base, one adapter by cuBLAS, per_row kernels, per_row torch) on real shapes,
    whole forwards with the block entered once or per call, and a profile of one mixed forward."""
    from triton.testing import do_bench

    add_lorakit(model, 32)
    blocks = model.model.layers[0]
    layers = {"q 2048→2048": blocks.self_attn.q_proj, "gate 2048→8192": blocks.mlp.gate_proj,
              "down 8192→2048": blocks.mlp.down_proj}
    lines = ["| rows×tokens, adapters | layer | base | +1 adapter (cuBLAS) | per_row kernels | per_row SGMV split "
             "| per_row torch |", "|---|---|---|---|---|---|---|"]
    for rows, tokens, n in ((32, 512, 8), (32, 128, 32), (32, 1, 32)):
        names = [f"a{i % n}" for i in range(rows)]
        for label, layer in layers.items():
            x = torch.randn(rows, tokens, layer.base_layer.in_features, device=DEV, dtype=torch.bfloat16)
            base = do_bench(lambda: layer.base_layer(x), return_mode="median")
            y = layer.base_layer(x)
            one = do_bench(lambda: layer.deltas["a0"](x, y, layer), return_mode="median") + base
            times = []
            for impl, fused in (("auto", True), ("auto", False), ("torch", True)):
                lorakit.multi.kernels.SGMV_FUSED = fused
                with lorakit.per_row(model, names, impl=impl):
                    times.append(do_bench(lambda: layer(x), return_mode="median"))
            lorakit.multi.kernels.SGMV_FUSED = True
            lines.append(f"| {rows}×{tokens}, {n} | {label} | {base * 1e3:.0f} µs | {one * 1e3:.0f} µs | "
                         + " | ".join(f"{t * 1e3:.0f} µs" for t in times) + " |")
    ids = ids_for(8, 64)
    names = [f"a{i}" for i in range(8)]
    logits = {}
    for impl in ("reference", "torch", "auto"):
        with lorakit.per_row(model, names, impl=impl):
            logits[impl] = model(ids).logits.float()
    ref = logits["reference"]
    lines.append(f"bf16 logits vs reference impl: torch {float((logits['torch'] - ref).norm() / ref.norm()):.2e}, "
                 f"auto {float((logits['auto'] - ref).norm() / ref.norm()):.2e}")
    print("\n".join(lines), flush=True)
    lines.append("")
    lines += ["| case | variant | forward |", "|---|---|---|"]
    for label, (n, rows, tokens, _) in PREFILL.items():
        names = [f"a{i % n}" for i in range(rows)]
        ids = ids_for(rows, tokens)
        variants = [("auto, block per call", "auto", None, False), ("auto, one open block", "auto", None, True),
                    ("torch, one open block", "torch", None, True)]
        variants += [(f"auto block_m={m}, one open block", "auto", m, True) for m in (16, 32, 64, 128)]
        for name, impl, block_m, open_block in variants:
            if open_block:
                with lorakit.per_row(model, names, impl=impl, block_m=block_m):
                    ms = timed(lambda: model(ids), reps=5)
            else:
                def run():
                    with lorakit.per_row(model, names, impl=impl, block_m=block_m):
                        model(ids)
                ms = timed(run, reps=5)
            lines.append(f"| {label} | {name} | {ms:.1f} ms |")
            print(lines[-1], flush=True)
    from torch.profiler import ProfilerActivity, profile

    names = [f"a{i}" for i in range(32)]
    ids = ids_for(32, 128)
    with lorakit.per_row(model, names):
        model(ids)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(ids)
            torch.cuda.synchronize()
    averages = prof.key_averages()
    try:
        by_device = averages.table(sort_by="self_device_time_total", row_limit=12)
    except Exception:  # older torch names it cuda
        by_device = averages.table(sort_by="self_cuda_time_total", row_limit=12)
    report = [averages.table(sort_by="self_cpu_time_total", row_limit=18), by_device]
    (out_dir / "diagnose.md").write_text("\n".join(lines) + "\n\n" + "\n\n".join(report))
    print(report[0][-6000:], flush=True)
    print(report[1][-3500:], flush=True)


# --- report -----------------------------------------------------------------------------------------------------
def base_rows(model, results) -> dict:
    base = {}
    for label, (_, rows, tokens, _) in PREFILL.items():
        ids = ids_for(rows, tokens)
        base[label] = timed(lambda: model(ids))
        record(results, case=label, impl="base forward", ms=base[label], base_ms=base[label],
               host_ms=host_ms(lambda: model(ids)))
    rows, tokens, _ = SINGLE
    same = (rows, tokens) == PREFILL[next(iter(PREFILL))][1:3]
    base["single"] = base[next(iter(PREFILL))] if same else timed(lambda: model(ids_for(rows, tokens)))
    rows, prompt, new = DECODE
    base["decode"] = tokens_per_s(gen_fn(model, ids_for(rows, prompt)), rows, new)
    record(results, case=f"decode {rows} rows", impl="base", tok_s=base["decode"], base_tok_s=base["decode"])
    return base


def table(results) -> str:
    lines = ["| case | implementation | time | vs base | goal | check |", "|---|---|---|---|---|---|"]
    for r in results:
        if "ms" in r:
            ratio = r["ms"] / r["base_ms"]
            goal = f"≤ {r['goal']:.2f}x {'✓' if ratio <= r['goal'] else '✗'}" if r.get("goal") else ""
            check = ", ".join(([f"rel. err {r['check_rel_err']:.1e}"] if "check_rel_err" in r else [])
                              + ([f"host {r['host_ms']:.1f} ms"] if "host_ms" in r else []))
            lines.append(f"| {r['case']} | {r['impl']} | {r['ms']:.1f} ms | {ratio:.2f}x | {goal} | {check} |")
        else:
            ratio = r["tok_s"] / r["base_tok_s"]
            lines.append(f"| {r['case']} | {r['impl']} | {r['tok_s']:.0f} tok/s | {ratio:.2f}x of base tok/s | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--md", help="write the BENCHMARKS.md section to this file")
    parser.add_argument("--json", help="write the raw results to this file")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU: checks the script only")
    parser.add_argument("--diagnose", metavar="DIR", help="layer-level timings and a profile into DIR/diagnose.md")
    args = parser.parse_args()
    if args.smoke:
        smoke_settings()
    elif not torch.cuda.is_available():
        sys.exit("mixed_batch.py needs a CUDA GPU")
    if args.diagnose:
        with torch.no_grad():
            return diagnose(build_base(), Path(args.diagnose))
    results: list[dict] = []
    model = build_base()
    with torch.no_grad():
        base_ms = base_rows(model, results)
        peft_base = None if args.skip_peft else copy.deepcopy(model)
        lorakit_rows(model, results, base_ms)
        del model
        lorakit.multi.routing.clear_stacks()
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
        if peft_base is not None:
            peft_rows(peft_base, results, base_ms)
    import peft
    import transformers

    triton = lorakit.multi.kernels.HAVE_TRITON and __import__("triton").__version__
    device = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (smoke)"
    env = (f"{datetime.date.today()} · {device} · torch {torch.__version__} · triton {triton} · "
           f"transformers {transformers.__version__} · peft {peft.__version__}")
    command = "python benchmarks/mixed_batch.py " + " ".join(sys.argv[1:])
    order = ["base forward", "base", "PEFT adapter_names", "PEFT unmerged"]
    rank = {case: i for i, case in enumerate([*PREFILL, "one adapter"])}
    results.sort(key=lambda r: (rank.get(r["case"], len(rank)), r["case"],
                                order.index(r["impl"]) if r["impl"] in order else len(order)))
    text = table(results)
    print(f"{env}\n`{command}`\n\n{text}")
    if args.md:
        Path(args.md).write_text(f"Measured {env}.\nCommand: `{command}`\n\n{text}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(env=env, command=command, results=results), indent=2))


if __name__ == "__main__":
    main()
