"""`lorakit serve` under load, over HTTP: 64 concurrent streamed requests, one adapter per client (32 adapters)
vs the same server with no adapter, vs HF `generate` in its fastest setting (static cache, compiled) at the
same batch, all in one run. One process drives the load (asyncio + aiohttp, the `bench` extra); the servers are `lorakit serve`
subprocesses started and stopped here.

GPU (Llama-3.2-1B shape from its config, random bf16 weights, rank-16 adapters on every linear layer):
    python benchmarks/serve.py [--append BENCHMARKS.md]
CPU check of the script itself (a tiny Llama, 8 clients, 2 adapters, no compile):
    python benchmarks/serve.py --cpu

Reported per case: output tokens/s over the whole round (prefill included: what HF generate's figure also
includes), decode tokens/s once every request has its first token (sum of later tokens / time from the last
first token to the last token), and p50/p99 time to first token. Requests use ignore_eos (random weights).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(SRC))
import train_step  # noqa: E402  (its Llama shapes and environment line)

import lorakit  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=512, tie_word_embeddings=True)


def build_model_dir(root: Path, shape: str, device: str) -> Path:
    """A Llama model directory (config, random weights, a word-level tokenizer over its vocabulary)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    over = TINY if shape == "tiny" else train_step.SHAPES[shape][0]
    config = LlamaConfig(**over, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    path = root / "model"
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")),
                                  eos_token="t1", pad_token="t1", unk_token="t2")
    tok.save_pretrained(path)
    return path, model


def make_adapters(model, root: Path, count: int, rank: int) -> list[str]:
    """`count` random rank-`rank` LoRA adapters on every linear layer, saved; the model is left without them."""
    specs = []
    for i in range(count):
        name = f"lora{i}"
        lorakit.add_adapter(model, lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS), name)
        g = torch.Generator(device="cpu").manual_seed(i)
        with torch.no_grad():
            for _, layer in lorakit.adapted_layers(model):
                for p in layer.deltas[name].parameters():
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))
        lorakit.save_adapter(model, root / name, name)
        lorakit.delete_adapter(model, name)
        specs.append(f"{name}={root / name}")
    return specs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, adapters: list[str], args, log: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "lorakit.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--max-batch", str(args.clients), "--max-len", str(args.prompt + args.new + 8),
           "--max-loras", str(max(len(adapters), 1)), "--max-lora-rank", str(args.rank)]
    if adapters:
        cmd += ["--adapter", *adapters]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server not ready in 600 s")


GENERATED = re.compile(rb'"text": ?"(?!")')  # a completion chunk with text in it


async def one_request(client, url: str, model: str, prompt: list[int], new: int) -> dict:
    """One streamed completion. The stream is read as raw byte blocks (not parsed line by line: 64 streams of
    per-token events would make this load generator the bottleneck); the first block with generated text
    stamps the time to first token, and the usage chunk at the end gives the token count."""
    body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = None
    tail = b""
    async with client.post(url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for block in r.content.iter_any():
            if first is None and GENERATED.search(block):
                first = time.perf_counter()
            tail = (tail + block)[-4096:]
    last = [line for line in tail.decode().splitlines() if line.startswith('data: {"')][-1]
    usage = json.loads(last[6:]).get("usage")  # the chunk before [DONE]
    tokens = usage["completion_tokens"] if usage else 0
    return dict(sent=sent, first=first, end=time.perf_counter(), tokens=tokens)


async def all_rounds(url: str, models: list[str], args) -> list[dict]:
    """A warm-up round (kernels compiled, connections opened), then args.rounds measured rounds; the clients keep
    their connections between rounds, as a service's clients do. aiohttp: httpx's pool, with 64 streams on kept
    connections, delivered the requests of a round over ~1.1 s to a server that answers at once (~20 ms with
    aiohttp)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as client:
        await one_round(client, url, models, args, seed=99)
        return [await one_round(client, url, models, args, seed=r) for r in range(args.rounds)]


async def one_round(client, url: str, models: list[str], args, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, args.vocab, (args.clients, args.prompt), generator=g).tolist()
    start = time.perf_counter()
    rs = await asyncio.gather(*[one_request(client, url, models[i % len(models)], prompts[i], args.new)
                                for i in range(args.clients)])
    assert all(r["tokens"] == args.new for r in rs), [r["tokens"] for r in rs]
    end = max(r["end"] for r in rs)
    last_first = max(r["first"] for r in rs)
    ttft = sorted(r["first"] - r["sent"] for r in rs)
    return dict(tok_s=sum(r["tokens"] for r in rs) / (end - start),
                decode_tok_s=sum(r["tokens"] - 1 for r in rs) / max(end - last_first, 1e-9),
                ttft_p50=ttft[len(ttft) // 2], ttft_p99=ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))])


def serve_case(name: str, model_dir: Path, adapters: list[str], args, root: Path) -> dict:
    proc, url = start_server(model_dir, adapters, args, root / f"{name}.log")
    try:
        models = [a.split("=")[0] for a in adapters] or [str(model_dir)]
        rounds = asyncio.run(all_rounds(url, models, args))
    finally:
        proc.kill()
        proc.wait(timeout=60)
    best = max(rounds, key=lambda r: r["tok_s"])
    return dict(case=name, **best)


def hf_generate_case(model_dir: Path, args, device: str) -> dict:
    """HF generate at the same batch: static cache (compiled by transformers on CUDA), greedy, fixed length."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.clients, args.prompt), generator=g).to(device)
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, cache_implementation="static",
              pad_token_id=1)
    if device != "cuda":
        kw["disable_compile"] = True
    times = []
    for i in range(args.rounds + 1):
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        _sync(device)
        if i:  # the first call compiles
            times.append(time.perf_counter() - t0)
    assert out.shape[1] == args.prompt + args.new
    best = min(times)
    return dict(case="HF generate (static, compiled)" if device == "cuda" else "HF generate (static)",
                tok_s=args.clients * args.new / best, decode_tok_s=float("nan"), ttft_p50=float("nan"),
                ttft_p99=float("nan"))


@torch.no_grad()
def check_graphs(model_dir: Path, adapters: list[str], device: str) -> str:
    """The captured decode step against the eager one, in process: 8 rows, 4 adapters + base rows, 6 steps."""
    from lorakit.serve.cache import Steps, cache_for
    from lorakit.serve.server import ServeOptions, build_served

    served, engine = build_served(ServeOptions(model=str(model_dir), adapter=adapters[:4], max_batch=8, max_len=64,
                                               max_lora_rank=16, device=device))
    engine.stop()
    table, graphed = engine.table, engine.steps
    eager = Steps(graphed.model, cache_for(graphed.model, 8, 65), table, 1, graphs=False)
    names = [a.split("=")[0] for a in adapters[:4]]
    slots = [table.slot_of(names[i % len(names)]) for i in range(4)] + [table.none_slot] * 4
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 9, 13, 3, 7, 11, 2, 6)]
    worst, agree, total = 0.0, 0, 0
    logits = [steps.prefill(prompts, list(range(8)), slots) for steps in (graphed, eager)]
    positions = [len(p) for p in prompts]
    for _ in range(6):
        tokens = logits[1].argmax(-1).tolist()  # both follow the eager path's tokens
        logits = [steps.decode(tokens, positions, slots) for steps in (graphed, eager)]
        positions = [p + 1 for p in positions]
        worst = max(worst, float((logits[0] - logits[1]).abs().max() / logits[1].abs().max()))
        agree += int((logits[0].argmax(-1) == logits[1].argmax(-1)).sum())
        total += 8
    table.close()
    how = ("CPU, no CUDA graphs" if device != "cuda" else "CUDA graphs used" if graphed.graphs else
           "CUDA graphs NOT used (capture failed, see stderr)")
    return f"{how}: decode vs eager decode, max |Δlogit|/max|logit| {worst:.2e}, argmax agree {agree}/{total}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["case"] == "no adapters"), None)
    hf = next((r for r in rows if r["case"].startswith("HF")), None)
    lines = ["| case | output tok/s | decode tok/s | vs no adapters (decode) | vs HF generate (output) | TTFT p50 | "
             "TTFT p99 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_base = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}×" if base and r["decode_tok_s"] == r[
            "decode_tok_s"] else "—"
        vs_hf = f"{r['tok_s'] / hf['tok_s']:.2f}×" if hf else "—"
        ttft = (f"{r['ttft_p50'] * 1e3:.0f} ms", f"{r['ttft_p99'] * 1e3:.0f} ms") if r["ttft_p50"] == r[
            "ttft_p50"] else ("—", "—")
        dec = f"{r['decode_tok_s']:,.0f}" if r["decode_tok_s"] == r["decode_tok_s"] else "—"
        lines.append(f"| {r['case']} | {r['tok_s']:,.0f} | {dec} | {vs_base} | {vs_hf} | {ttft[0]} | {ttft[1]} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny Llama on CPU: checks the script")
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds per case (the best is kept)")
    ap.add_argument("--append", default=None, help="append a section (command, device, date, table) to this file")
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if args.cpu:
        args.shape, args.clients, args.adapters, args.prompt, args.new = "tiny", 8, 2, 16, 8
    from transformers.utils import logging

    logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, model = build_model_dir(root, args.shape, device)
        args.vocab = model.config.vocab_size
        adapters = make_adapters(model, root, args.adapters, args.rank)
        del model
        check = check_graphs(model_dir, adapters, device)
        print(check, flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        rows = [serve_case(f"{args.adapters} adapters, one per client", model_dir, adapters, args, root),
                serve_case("no adapters", model_dir, [], args, root),
                hf_generate_case(model_dir, args, device)]
    env = train_step.environment(device)
    what = (f"{args.shape} shape, {args.clients} concurrent clients, {args.prompt}-token prompts, {args.new} new "
            f"tokens, rank {args.rank} on {len(TARGETS)} linear layers")
    text = f"{env}; {what}\n\n{check}\n\n{table(rows)}"
    print(text)
    if args.append:
        command = "python benchmarks/serve.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(args.append, "a") as f:
            f.write(f"\n### lorakit serve: {args.shape} ({datetime.date.today()})\n\n`{command}` · {text}\n")


if __name__ == "__main__":
    main()
