"""Training speed on real instruction data: lorakit padded, lorakit packed, TRL SFTTrainer (+ Liger), side by side
in one process, at one fixed token budget per optimizer step.

Data: ../shared/data/alpaca_small (2,000 Alpaca rows) through SmolLM2's tokenizer and lorakit's Alpaca template
(max 512 tokens, loss on the response), repeated `--repeat` times. Models: Llama-3.2-1B / Llama-3-8B shapes from
config (random weights, bf16, sdpa), LoRA r=16 alpha=32 on every linear, dropout 0, fused AdamW.

Cases (each at --budget tokens per step):
  fixed    budget/1024 rows of 1,024 random tokens (B8 T1024 at budget 8192: benchmarks/train_step.py's shape),
           lorakit + optimize(): the fixed-shape figure the packed case is held to, no data
  padded   lorakit + optimize(), micro-batches of 8 shuffled rows right-padded to their longest, rounded up to a
           multiple of 64 as `lorakit train --no-packing` does on CUDA (unpacked training)
  packed   lorakit + optimize(), best-fit-decreasing packed micro-batches (lorakit.train --packing)
  trl      TRL SFTTrainer + PEFT, packing=True (BFD, padding-free): flash_attention_2 where flash-attn imports,
           else sdpa (transformers 5 keeps packed rows apart from position_ids); the script says which
  trl_liger  the same + use_liger_kernel=True (skipped, with the reason, where liger_kernel does not import)
Reports real (non-padding) tokens/s, padding fraction and peak GiB; appends the table to BENCHMARKS.md.

    python benchmarks/real_data.py --shapes 1b,8b --budget 8192            # GPU
    python benchmarks/real_data.py --smoke                                 # CPU, a tiny shape: checks it runs
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lorakit  # noqa: E402
from lorakit.loading.models import BUILTIN_MODEL, load_tokenizer, resolve_model  # noqa: E402
from lorakit.loading.rows import Encoder, encode_rows, read_rows  # noqa: E402
from lorakit.train.batches import CUDA_PAD_MULTIPLE, collate, epoch_order  # noqa: E402
from lorakit.train.loop import causal_loss_sum  # noqa: E402
from lorakit.train.packed_attention import choose_path, packed_loss_sum, use_varlen_attention  # noqa: E402
from lorakit.train.packing import PackedBatches, real_tokens  # noqa: E402

SECTION = "## Real-data training: packing"
GIB = 2**30
SHAPES = {  # name: LlamaConfig overrides
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
}


# --- data ---------------------------------------------------------------------------------------------------
def load_examples(data: Path, repeat: int, max_length: int, tokenizer_dir: str = None):
    """(tokenizer, Examples, rows): alpaca_small through SmolLM2's tokenizer (the bundled model's, or a copy of its
    tokenizer files in `tokenizer_dir` where the package is absent, as on the GPU machine), repeated `repeat` times."""
    tokenizer = load_tokenizer(tokenizer_dir or resolve_model(BUILTIN_MODEL, log=lambda *a: None))
    rows = read_rows(data)
    examples = encode_rows(Encoder(tokenizer, "causal", "auto", max_length), rows)
    return tokenizer, examples * repeat, rows * repeat


def padded_batches(examples, size: int = 8, seed: int = 0):
    """Right-padded micro-batches of `size` shuffled rows (what unpacked training computes)."""
    order = epoch_order(len(examples), seed, 0)
    return [collate([examples[j] for j in order[i:i + size]], 0, "causal", CUDA_PAD_MULTIPLE)
            for i in range(0, len(order) - size + 1, size)], size


# --- models -------------------------------------------------------------------------------------------------
def build_llama(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly (no fp32 copy of 8B weights)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.train()


def lorakit_model(shape: str, device: str, dtype: torch.dtype):
    model = build_llama(shape, device, dtype)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    lorakit.optimize(model)
    return model


# --- lorakit cases ------------------------------------------------------------------------------------------
def run_lorakit(case: str, shape: str, batches, device: str, dtype, warmup: int, steps: int) -> dict:
    model = lorakit_model(shape, device, dtype)
    if case != "padded" and device == "cuda":
        use_varlen_attention(model)  # torch's varlen_attn where its probe is exact
    path = "sdpa, padding mask" if case == "padded" else choose_path(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
    loss_sum = causal_loss_sum if case == "padded" else packed_loss_sum

    def step(batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        total, count = loss_sum(model, batch)
        (total / max(1, count)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(batches[i % len(batches)])
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    real = slots = 0
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        batch = batches[i % len(batches)]
        real += real_tokens(batch)
        slots += batch["input_ids"].numel()
        step(batch)
    _sync(device)
    seconds = time.perf_counter() - t0
    out = _result(shape, case, real, slots, seconds, device, note=f"attention: {path}")
    del model, opt, params
    _free(device)
    return out


# --- TRL cases ----------------------------------------------------------------------------------------------
def trl_dataset(tokenizer, rows, max_length: int):
    """alpaca rows as prompt/completion, the prompt rendered by lorakit's Alpaca template (the same tokens)."""
    from datasets import Dataset

    encoder = Encoder(tokenizer, "causal", "auto", max_length)
    prompts = [encoder._turns("alpaca", r)[0][0] for r in rows]
    return Dataset.from_dict({"prompt": prompts, "completion": [str(r["output"]) for r in rows]})


def run_trl(case: str, shape: str, tokenizer, rows, budget: int, device: str, dtype, warmup: int, steps: int,
            out_dir: Path) -> dict:
    """TRL SFTTrainer + PEFT: BFD packing into [1, budget] padding-free sequences; timed from a callback."""
    try:
        from peft import LoraConfig
        from transformers import TrainerCallback
        from trl import SFTConfig, SFTTrainer
    except ImportError as e:
        return _skipped(shape, case, f"trl/peft do not import: {e}")
    liger = case == "trl_liger"
    if liger and importlib.util.find_spec("liger_kernel") is None:
        return _skipped(shape, case, "liger_kernel is not installed")
    flash = device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    model = build_llama(shape, device, dtype)
    if flash:
        model.set_attn_implementation("flash_attention_2")
    note = ("packing=True (bfd, padding-free), " + ("flash_attention_2" if flash else
            "sdpa: no flash-attn; transformers masks rows apart from position_ids"))

    class Clock(TrainerCallback):
        t0 = tokens0 = None
        t1 = tokens1 = 0

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup:
                _sync(device)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
            if state.global_step == warmup + steps:
                _sync(device)
                self.t1, self.tokens1 = time.perf_counter(), state.num_input_tokens_seen

    args = SFTConfig(output_dir=str(out_dir / f"trl-{shape}-{case}"), max_steps=warmup + steps, packing=True,
                     max_length=budget, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                     learning_rate=1e-5, bf16=dtype == torch.bfloat16, use_cpu=device == "cpu", report_to=[],
                     logging_steps=10_000, save_strategy="no", dataloader_num_workers=0, use_liger_kernel=liger,
                     include_num_input_tokens_seen=True,
                     optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
                     disable_tqdm=True, dataset_num_proc=None)
    clock = Clock()
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=trl_dataset(tokenizer, rows, 512),
                             processing_class=tokenizer, callbacks=[clock],
                             peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
        trainer.train()
    except Exception as e:  # noqa: BLE001 - a failing case must not lose the others' numbers
        del model
        _free(device)
        return _skipped(shape, case, f"failed: {repr(e)[:200]}")
    real = clock.tokens1 - clock.tokens0
    slots = steps * budget  # padding-free [1, ≤ budget] sequences: the slots are the budget at most
    out = _result(shape, case, real, slots, clock.t1 - clock.t0, device, note=note)
    del trainer, model
    _free(device)
    return out


# --- reporting ----------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _result(shape, case, real, slots, seconds, device, note="") -> dict:
    peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else float("nan")
    return dict(shape=shape, case=case, real_tokens_per_s=real / seconds, padding_fraction=1 - real / max(1, slots),
                peak_gib=peak, seconds=seconds, note=note)


def _skipped(shape, case, reason) -> dict:
    print(f"[{shape}] {case}: skipped ({reason})", flush=True)
    return dict(shape=shape, case=case, real_tokens_per_s=float("nan"), padding_fraction=float("nan"),
                peak_gib=float("nan"), seconds=float("nan"), note=f"skipped: {reason}")


def table(rows: list[dict]) -> str:
    lines = ["| shape | case | real tokens/s | padding | peak GiB | × fixed | × best TRL | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = [x for x in rows if x["shape"] == r["shape"]]
        fixed = next((x["real_tokens_per_s"] for x in same if x["case"] == "fixed"), float("nan"))
        trl = max((x["real_tokens_per_s"] for x in same if x["case"].startswith("trl")
                   and x["real_tokens_per_s"] == x["real_tokens_per_s"]), default=float("nan"))
        fmt = lambda v, f: "–" if v != v else format(v, f)  # noqa: E731  (NaN: not measured)
        lines.append(f"| {r['shape']} | {r['case']} | {fmt(r['real_tokens_per_s'], ',.0f')} | "
                     f"{fmt(100 * r['padding_fraction'], '.1f')} % | {fmt(r['peak_gib'], '.2f')} | "
                     f"{fmt(r['real_tokens_per_s'] / fixed, '.3f')} | {fmt(r['real_tokens_per_s'] / trl, '.3f')} | "
                     f"{r['note']} |")
    return "\n".join(lines)


def environment(device: str) -> str:
    import transformers

    versions = []
    for name in ("peft", "trl", "liger_kernel", "flash_attn"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name.replace('_', '-'))}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} missing")
    where = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return (f"{datetime.date.today()} · {where} · torch {torch.__version__} · transformers "
            f"{transformers.__version__} · " + " · ".join(versions))


def write_section(text: str) -> None:
    """Replace (or append) this script's section of BENCHMARKS.md."""
    path = REPO / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(SECTION)
    if start >= 0:
        end = old.find("\n## ", start + len(SECTION))
        old = old[:start] + old[end + 1:] if end >= 0 else old[:start]
    path.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "alpaca_small" / "alpaca_small.json"))
    ap.add_argument("--tokenizer", default=None, help="a directory with SmolLM2's tokenizer files (default: the "
                    "bundled model's)")
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--cases", default="fixed,padded,packed,trl,trl_liger")
    ap.add_argument("--budget", type=int, default=8192, help="tokens per optimizer step")
    ap.add_argument("--repeat", type=int, default=4, help="repetitions of the data set")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--padded-warmup", type=int, default=24, help="padded micro-batches before timing: each new "
                    "padded length can compile new Triton specialisations, a one-time cost a short timing would count")
    ap.add_argument("--padded-steps", type=int, default=48, help="padded micro-batches timed (8 rows each)")
    ap.add_argument("--smoke", action="store_true", help="CPU, the tiny shape, budget 1024, 3 steps, fp32")
    ap.add_argument("--out-dir", default="/tmp/lorakit-real-data")
    ap.add_argument("--json", default=None, help="append one JSON line per case to this file")
    ap.add_argument("--no-md", action="store_true", help="do not write BENCHMARKS.md")
    args = ap.parse_args(argv)
    from transformers.utils import logging

    logging.set_verbosity_error()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        args.shapes, args.budget, args.steps, args.warmup, args.repeat = "tiny", 1024, 3, 1, 1
        args.padded_warmup, args.padded_steps = 1, 3
    tokenizer, examples, rows = load_examples(Path(args.data), args.repeat, 512, args.tokenizer)
    packed = PackedBatches(examples, args.budget, seed=0, pad_id=tokenizer.pad_token_id)
    padded, rows_per_step = padded_batches(examples)
    print(f"{len(examples)} rows, budget {args.budget}: packed {packed.per_epoch} micro-batches "
          f"({100 * packed.padding_fraction():.1f}% padding); padded {rows_per_step} rows a micro-batch", flush=True)
    g = torch.Generator().manual_seed(0)
    row = min(1024, args.budget)  # rows of 1,024 tokens laid end to end, positions restarting per row
    fixed = [{"input_ids": (ids := torch.randint(3, 49152, (1, args.budget), generator=g)), "labels": ids,
              "position_ids": (torch.arange(args.budget) % row)[None],
              "document_ids": (torch.arange(args.budget) // row)[None]}]
    out_dir = Path(args.out_dir)
    results = []
    for shape in args.shapes.split(","):
        for case in args.cases.split(","):
            print(f"[{shape}] {case} ...", flush=True)
            if case.startswith("trl"):
                results.append(run_trl(case, shape, tokenizer, rows, args.budget, device, dtype, args.warmup,
                                       args.steps, out_dir))
                continue
            batches = {"fixed": fixed, "padded": padded, "packed": [packed[i] for i in range(packed.per_epoch)]}[case]
            try:
                results.append(run_lorakit(case, shape, batches, device, dtype, *((args.padded_warmup, args.padded_steps) if case == "padded"
                                                                                 else (args.warmup, args.steps))))
            except Exception as e:  # noqa: BLE001 - one failing case must not lose the others' numbers
                results.append(_skipped(shape, case, f"failed: {repr(e)[:200]}"))
                _free(device)
    text = table(results)
    env = environment(device)
    print(env)
    print(text)
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps({**r, "budget": args.budget, "env": env}) + "\n")
    if not args.no_md and not args.smoke:
        command = "python benchmarks/real_data.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(f"{SECTION}\n\nMeasured {env}.\n\nCommand: `{command}`\n\n"
                      f"alpaca_small × {args.repeat} through SmolLM2's tokenizer, budget {args.budget} tokens a step, "
                      f"{args.steps} timed steps after {args.warmup}; LoRA r=16 all-linear, bf16.\n\n{text}\n")


if __name__ == "__main__":
    main()
