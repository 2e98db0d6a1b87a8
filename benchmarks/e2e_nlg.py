"""E2E NLG (the LoRA paper's GPT-2 task) with SmolLM2-135M-Instruct: zero-shot vs lorakit LoRA vs PEFT LoRA.

Training on devset.csv (E2E's train file is not in ../shared/data), evaluation on testset_w_refs.csv with
sacrebleu corpus BLEU against all references of each meaning representation (MR), greedy decoding. lorakit and
PEFT run through the same loop (lorakit.train.loop.train_loop), data order, seed and settings.

    python benchmarks/e2e_nlg.py              # full: all 4,672 dev pairs, 1 epoch; all 630 test MRs
    python benchmarks/e2e_nlg.py --subset     # CPU budget: 256 training pairs, 40 test MRs
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(REPO / "benchmarks"))

import lorakit  # noqa: E402
from lorakit.loading.rows import Encoder  # noqa: E402
from lorakit.train.batches import MicroBatches  # noqa: E402
from lorakit.train.evaluate import bleu, generate  # noqa: E402
from lorakit.train.loop import train_loop  # noqa: E402
from lorakit.loading.models import BUILTIN_MODEL, load_model, load_tokenizer, pick_device, resolve_model  # noqa: E402
from lorakit.train.options import TrainOptions  # noqa: E402
from sst2 import update_benchmarks_md  # noqa: E402

SYSTEM = "Write one sentence describing the restaurant from its attributes."


def read_pairs(path: Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return [(row["mr"], row["ref"]) for row in csv.DictReader(f)]


def chat(mr: str, ref: str = "") -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": mr},
                         {"role": "assistant", "content": ref}]}


def grouped(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for mr, ref in pairs:
        out.setdefault(mr, []).append(ref)
    return out


def score(model, tokenizer, encoder, tests: dict[str, list[str]], args, device) -> tuple[float, list[str]]:
    prompts = [encoder.encode(chat(mr, "x")).prompt_ids for mr in tests]
    texts = generate(model, tokenizer, prompts, args.max_new_tokens, batch_size=args.eval_batch, device=device)
    return bleu(texts, list(tests.values())), texts


def train_one(kind: str, path: str, train_set, pad_id: int, args, device):
    model = load_model(path, "causal", device=str(device))
    torch.manual_seed(args.seed)
    if kind == "lorakit":
        lorakit.add_adapter(model, lorakit.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                      target_modules=args.targets))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                 target_modules=args.targets, task_type="CAUSAL_LM"))
    opts = TrainOptions(data="e2e", epochs=args.epochs, batch_size=args.batch, lr=args.lr, warmup=0.06,
                        schedule="linear", seed=args.seed, log_every=10,
                        precision="bf16" if device.type == "cuda" else "fp32", quiet=True)
    batches = MicroBatches(train_set, args.batch, args.seed, pad_id, "causal")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        history = train_loop(model, batches, opts, device, Path(out), progress=not args.quiet)
    seconds = time.perf_counter() - t0
    steps = [h for h in history if "loss" in h]
    return model, {"train_s": seconds, "steps": steps[-1]["step"], "final_loss": steps[-1]["loss"],
                   "tokens_per_s": steps[-1]["tokens_per_s"],
                   "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subset", action="store_true", help="CPU budget: 256 training pairs, 40 test MRs")
    p.add_argument("--train-limit", type=int, default=0)
    p.add_argument("--test-mrs", type=int, default=0, help="evaluate on the first N test MRs (0: all 630)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=["zero-shot", "lorakit", "peft"])
    p.add_argument("--model", default=BUILTIN_MODEL)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "e2e_nlg"))
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--benchmarks-md", default=str(REPO / "BENCHMARKS.md"), help="'' to skip")
    args = p.parse_args()
    if args.subset:
        args.train_limit, args.test_mrs = args.train_limit or 256, args.test_mrs or 40
    device = pick_device(args.device)
    started = time.time()
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    encoder = Encoder(tokenizer, "causal", max_length=256)
    data = Path(args.data_dir)
    train_pairs = read_pairs(data / "devset.csv")
    if args.train_limit:  # spread over MRs: every k-th pair
        step = max(1, len(train_pairs) // args.train_limit)
        train_pairs = train_pairs[::step][: args.train_limit]
    tests = grouped(read_pairs(data / "testset_w_refs.csv"))
    if args.test_mrs:
        tests = dict(list(tests.items())[: args.test_mrs])
    train_set = [encoder.encode(chat(mr, ref)) for mr, ref in train_pairs]
    rows, samples = [], {}
    for method in args.methods:
        t0 = time.perf_counter()
        if method == "zero-shot":
            model, info = load_model(path, "causal", device=str(device)), {}
        else:
            model, info = train_one(method, path, train_set, tokenizer.pad_token_id, args, device)
        value, texts = score(model, tokenizer, encoder, tests, args, device)
        rows.append({"method": method, "bleu": value, **info, "wall_s": time.perf_counter() - t0})
        samples[method] = texts[:3]
        print(json.dumps(rows[-1]), flush=True)
        del model
    lines = ["| method | BLEU | trainable | steps | train time | tokens/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bleu']:.2f} | {r.get('trainable', 0):,} | {r.get('steps', '-')} | "
                     f"{r.get('train_s', 0):.0f} s | {r.get('tokens_per_s', 0):.0f} |")
    print("\n".join(lines))
    first = next(iter(tests))
    print(f"\nMR: {first}\n" + "\n".join(f"{m}: {s[0]}" for m, s in samples.items()))
    if args.benchmarks_md:
        dev_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
        mode = (f"subset: {len(train_set)} training pairs, {len(tests)} test MRs" if args.train_limit or args.test_mrs
                else f"full: {len(train_set)} training pairs, {len(tests)} test MRs")
        body = (f"Command: `python benchmarks/e2e_nlg.py {' '.join(sys.argv[1:])}`  \n"
                f"Device: {dev_name}; torch {torch.__version__}; Python {platform.python_version()}; "
                f"date {datetime.date.today()}; {mode}; wall {time.time() - started:.0f} s  \n"
                f"LoRA r={args.r}, alpha={2 * args.r} on {','.join(args.targets)}; lr {args.lr:g}, batch {args.batch}, "
                f"{args.epochs:g} epoch(s), linear schedule, 6% warmup; greedy decoding, at most {args.max_new_tokens} "
                "new tokens; sacrebleu corpus BLEU with every reference of an MR.\n\n" + "\n".join(lines)
                + f"\n\nExample (MR `{first}`):\n\n" + "\n".join(f"- {m}: {s[0]}" for m, s in samples.items()))
        key = "E2E NLG / SmolLM2-135M-Instruct (" + ("GPU" if device.type == "cuda" else "CPU") + \
              (", subset" if args.train_limit or args.test_mrs else "") + ")"
        update_benchmarks_md(Path(args.benchmarks_md), key, body)


if __name__ == "__main__":
    main()
