"""`lorakit serve`: load the base model and the adapters, start the engine thread, serve HTTP with uvicorn.

    lorakit serve --model smollm2-135m-instruct --adapter support=runs/a/adapter sql=runs/b --port 8000

This module imports only the standard library at the top, so `lorakit --help` stays fast; torch,
transformers, FastAPI and uvicorn are imported when the command runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

from ..errors import ServeError
from ..loading.models import BUILTIN_MODEL


@dataclass
class ServeOptions:
    """Options of `lorakit serve`."""

    model: str = BUILTIN_MODEL
    """Base model: a local Hugging Face model directory, a .gguf file, a bundled model name or a hub name. A request
    whose `model` is this name (or --served-name) runs the base model."""
    adapter: list[str] = field(default_factory=list)
    """Adapters served from the start, as NAME=DIR (a request's `model` names one). More can be loaded at run time
    with POST /v1/load_lora_adapter."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """Port to listen on."""
    served_name: Optional[str] = None
    """The base model's name in requests and /v1/models (default: --model as given)."""
    device: str = "auto"
    """Where the model runs: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Weights and KV cache precision. auto: bf16 on CUDA, fp32 on CPU."""
    max_batch: int = 32
    """Rows decoded together (KV cache slots); more requests wait for a free slot."""
    max_len: int = 2048
    """Tokens per request, prompt plus completion (the KV cache's length; at most the model's context)."""
    max_loras: int = 8
    """Adapter slots: adapters served at once (the startup ones included)."""
    max_lora_rank: int = 16
    """Rank every slot can hold without reallocating (a larger adapter reallocates the stacks once)."""
    max_prefill_tokens: int = 8192
    """Prompt tokens prefilled together when requests join the batch."""
    cuda_graphs: bool = True
    """On CUDA, capture the decode step as CUDA graphs (one per batch/length bucket) and replay them."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "warning"
    """uvicorn's log level."""


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    """NAME=DIR pairs from --adapter (a bare DIR is named after its folder); ServeError on a repeated name."""
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep:
            from pathlib import Path

            name, directory = Path(spec).resolve().name, spec
        if not name or not directory:
            raise ServeError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in dict(pairs):
            raise ServeError(f"--adapter: the name {name!r} is given twice")
        pairs.append((name, directory))
    return pairs


def build_served(options: ServeOptions, log=print, check_port: bool = False):
    """(Served, engine) ready to answer: model loaded in --dtype, adapters in their slots, the engine thread
    started. Raises a LorakitError (ConfigError, AdapterFormatError, ServeError, ...) before serving on bad input;
    with check_port, also when --host/--port cannot be bound (before the model loads)."""
    import torch

    from ..loading.models import load_pretrained
    from ..train.evaluate import stop_token_ids
    from ..train.layout import adapter_dir
    from .adapters import AdapterTable
    from .app import Served
    from .attention import install as install_attention
    from .cache import Steps, cache_for
    from .engine import Engine

    pairs = parse_adapters(options.adapter)
    dirs = [(name, adapter_dir(directory)) for name, directory in pairs]  # checked before the model loads
    if options.max_batch < 1 or options.max_len < 8:
        raise ServeError(f"--max-batch must be ≥ 1 and --max-len ≥ 8 (got {options.max_batch}, {options.max_len})")
    if options.max_loras < 1 or options.max_lora_rank < 1 or options.max_prefill_tokens < 1:
        raise ServeError(f"--max-loras, --max-lora-rank and --max-prefill-tokens must be ≥ 1 (got {options.max_loras}, "
                         f"{options.max_lora_rank}, {options.max_prefill_tokens})")
    if check_port:
        _check_port(options.host, options.port)
    model, tokenizer, device = load_pretrained(options.model, "causal", device=options.device, log=log)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        options.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.to(dtype).eval()
    if getattr(model, "_supports_attention_backend", False):
        install_attention(model)  # decode without repeating key/value heads (see serve/attention.py)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or options.max_len
    max_len = min(options.max_len, limit) + 1  # one more column: the cache's sink
    table = AdapterTable(model, options.max_loras, options.max_lora_rank)
    for name, directory in dirs:
        table.load(name, str(directory))
    cache = cache_for(model, options.max_batch, max_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    steps = Steps(model, cache, table, pad, options.cuda_graphs)
    captured = steps.capture_all()
    if captured:
        log(f"lorakit serve: {captured} CUDA graphs of the decode step captured")
    engine = Engine(steps, table, options.max_batch, options.max_prefill_tokens)
    served = Served(engine, tokenizer, options.served_name or options.model, max_len - 1,
                    frozenset(stop_token_ids(model, tokenizer)))
    engine.start()
    return served, engine


def _check_port(host: str, port: int) -> None:
    """Refuse an address that cannot be bound now, before minutes of model loading (uvicorn would end with its
    own log line and exit 1). SO_REUSEADDR as uvicorn sets it, so a socket in TIME_WAIT is no obstacle."""
    import socket

    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except (OSError, OverflowError) as e:
        raise ServeError(f"--host {host} --port {port}: cannot listen there ({e})") from None


def run_serve(options: ServeOptions) -> int:
    """`lorakit serve`: serve until interrupted (Ctrl-C / SIGTERM), then stop the engine."""
    try:
        import uvicorn

        from .app import build_app
    except ImportError as e:
        raise ServeError(f"lorakit serve needs FastAPI and uvicorn: pip install 'lorakit[serve]' ({e})") from None
    from ..loading.models import log_to_stderr

    served, engine = build_served(options, log=log_to_stderr, check_port=True)
    app = build_app(served)
    # The engine thread and the HTTP loop share the GIL: a short switch interval gives the GIL back to the engine
    # soon after the GPU step it waited on, instead of after up to 5 ms of HTTP work.
    sys.setswitchinterval(0.001)
    names = ", ".join([served.base_name] + engine.table.names())
    print(f"lorakit serve: serving {names} on http://{options.host}:{options.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level=options.log_level, access_log=False)
    finally:
        engine.stop()
        engine.table.close()
    return 0
