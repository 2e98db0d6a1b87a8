"""llama.cpp runs what `lorakit export` writes: greedy tokens of llama.cpp (through llama-cpp-python) against
transformers' on a few chat prompts, for the merged SmolLM2 GGUF (f16 and q8_0) and for the f16 base GGUF plus
the adapter GGUF (`--lora`).

    pip install llama-cpp-python            # built from its source distribution; not a lorakit dependency
    python benchmarks/export_llama_cpp.py            # ~1-2 min on 2 CPU cores, prints a table
    python benchmarks/export_llama_cpp.py --append   # also appends the table to BENCHMARKS.md

The adapter is a LoRA (r=8, all seven projections) with small random factors on the bundled SmolLM2-135M-Instruct:
it changes the answers, and an error in the q/k permutation, the scale or the tokenizer would show as different
tokens. Each llama.cpp run is compared with transformers on the same weights: the same GGUF file read by
transformers' GGUF loader (the merged files), or the base GGUF read so plus the adapter attached by lorakit (the
--lora run); llama.cpp keeps its KV cache in f32 here. Both sides get the same token ids (transformers' chat
template) and stop at the end-of-turn token; llama.cpp's own tokenization of the prompt text is compared too.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
SECTION = "## export: llama.cpp runs the exported GGUFs"
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "List three primary colors."]


def greedy_hf(model, ids: list[int], n: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)
    return out[0, len(ids):].tolist()


def greedy_llama_cpp(llm, ids: list[int], n: int, eos: int) -> list[int]:
    llm.reset()
    got = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        got.append(int(token))
        if len(got) == n or token == eos:
            break
    return got


def hf_from_gguf(path: Path):
    """transformers' own reading of a GGUF file (float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--std", type=float, default=0.004, help="std of the random adapter factors")
    parser.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="lorakit-llama-cpp-"))  # ~700 MB of GGUF files, removed at the end
    try:
        return compare(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare(args, work: Path) -> int:
    """Write the GGUF files under `work`, run llama.cpp on them and print (or append) the table."""
    from llama_cpp import Llama, __version__ as llama_cpp_version

    import lorakit
    from lorakit.export.command import write_merged_gguf
    from lorakit.export.gguf_adapter import export_adapter_gguf
    from lorakit.loading.models import BUILTIN_MODEL, bundled_model_path, load_model, load_tokenizer

    path = str(bundled_model_path())
    tokenizer, base = load_tokenizer(path), load_model(path, "causal").eval()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    write_merged_gguf(base, tokenizer, path, BUILTIN_MODEL, work / "base-f16.gguf", "f16", name="base")
    torch.manual_seed(0)
    lorakit.add_adapter(base, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        base_model_name_or_path=BUILTIN_MODEL))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if ".deltas." in name:
                p.add_(torch.randn(p.shape, generator=g) * args.std)
    lorakit.save_adapter(base, work / "adapter")
    export_adapter_gguf(work / "adapter", work / "adapter.gguf", model=None, outtype="f32", log=lambda _: None)
    merged = lorakit.unload(base, merge=True)
    for outtype in ("f16", "q8_0"):
        write_merged_gguf(merged, tokenizer, path, BUILTIN_MODEL, work / f"merged-{outtype}.gguf", outtype, name="m")
    base_f16 = hf_from_gguf(work / "base-f16.gguf")
    plain = {}
    lora_ref = hf_from_gguf(work / "base-f16.gguf")
    lorakit.load_adapter(lora_ref, work / "adapter")
    runs = {"merged f16": (dict(model_path=str(work / "merged-f16.gguf")), hf_from_gguf(work / "merged-f16.gguf")),
            "merged q8_0": (dict(model_path=str(work / "merged-q8_0.gguf")), hf_from_gguf(work / "merged-q8_0.gguf")),
            "base f16 + --lora adapter": (dict(model_path=str(work / "base-f16.gguf"),
                                               lora_path=str(work / "adapter.gguf")), lora_ref)}
    rows = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text).input_ids
        plain[prompt] = greedy_hf(base_f16, ids, args.tokens, eos)
        for label, (kw, reference) in runs.items():
            want = greedy_hf(reference, ids, args.tokens, eos)
            llm = Llama(n_ctx=256, seed=0, verbose=False, type_k=0, type_v=0, **kw)  # 0: GGML_TYPE_F32
            got = greedy_llama_cpp(llm, ids, args.tokens, eos)
            same_tok = llm.tokenize(text.encode(), add_bos=False, special=True) == ids
            rows.append((prompt, label, got == want, same_tok, want != plain[prompt], tokenizer.decode(got)))
            del llm
    lines = [SECTION, "", f"`python benchmarks/export_llama_cpp.py` — {datetime.date.today()}, "
             f"{platform.processor() or platform.machine()}, llama-cpp-python {llama_cpp_version}, "
             f"up to {args.tokens} greedy tokens, SmolLM2-135M-Instruct + a random LoRA r=8 (factor std {args.std})", "",
             "| prompt | llama.cpp runs | tokens = transformers' (same weights) | prompt tokenized alike "
             "| adapter changed the answer "
             "| llama.cpp's text |", "|---|---|---|---|---|---|"]
    for prompt, label, same, same_tok, changed, text in rows:
        shown = text.replace("\n", " ").replace("|", "\\|")
        lines.append(f"| {prompt} | {label} | {'yes' if same else 'NO'} | {'yes' if same_tok else 'no'} | "
                     f"{'yes' if changed else 'no'} | {shown} |")
    table = "\n".join(lines)
    print(table)
    if args.append:
        with (REPO / "BENCHMARKS.md").open("a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")
    return 0 if all(r[2] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
