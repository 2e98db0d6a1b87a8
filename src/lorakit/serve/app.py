"""The HTTP side: FastAPI routes of the OpenAI API and vLLM's adapter endpoints, over one Engine.

    GET  /v1/models                    the base model and every loaded adapter
    POST /v1/completions               text (or token-id) prompts
    POST /v1/chat/completions          messages, rendered with the tokenizer's chat template
    POST /v1/load_lora_adapter         {"lora_name", "lora_path"}: serve a new adapter without a restart
    POST /v1/unload_lora_adapter       {"lora_name"}
    GET  /health

A request's `model` names the base model or a loaded adapter. Tokens come from the engine thread into an
asyncio queue per request; `TextStream` turns them into text pieces (stop strings held back until they can
no longer start one), and the routes answer whole or as server-sent events. A bad request is answered with
an OpenAI error body before anything reaches the engine; a client that goes away cancels only its own rows.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import LorakitError
from . import protocol as P
from .engine import Engine, Request

TOKEN_TIMEOUT_S = 600.0  # the longest wait for one token before a request gives up (a stuck engine)


@dataclass
class Served:
    """What the routes need: the engine, the tokenizer, the base model's served name, the context length."""

    engine: Engine
    tokenizer: object
    base_name: str
    context: int  # prompt + generated tokens per request, at most
    stop_ids: frozenset
    created: int = 0


class TextStream:
    """A request's generated text as it grows: (piece, finish_reason or None) events, stop strings applied."""

    def __init__(self, served: Served, req: Request, events: "asyncio.Queue", stops: list[str],
                 gone: Callable[[], "asyncio.Future"]):
        self.served, self.req, self.events, self.stops, self.gone = served, req, events, stops, gone
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.hold = max((len(s) for s in stops), default=1) - 1
        self._prefix = self._read = 0  # the decoded window: ids[_prefix:_read] is text already taken

    def _grow(self, final: bool) -> None:
        """Append the new tokens' text. Incremental detokenization (as vLLM does it): decode a window of a few
        tokens before and after the new ones and keep the difference, instead of decoding everything again; a
        token that ends half a UTF-8 character waits for the next one (unless this is the end)."""
        decode = self.served.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    async def pieces(self) -> AsyncIterator[tuple[str, Optional[str]]]:
        """Yield text pieces; the last one carries the finish reason ("stop" or "length")."""
        waited = 0.0
        while True:
            if self.events.empty():
                try:
                    events = [await asyncio.wait_for(self.events.get(), timeout=1.0)]
                except asyncio.TimeoutError:
                    waited += 1.0
                    if waited > TOKEN_TIMEOUT_S or await self.gone():
                        self.req.cancel()
                        raise P.APIError(500 if waited > TOKEN_TIMEOUT_S else 499, "request abandoned",
                                         "server_error")
                    continue
            else:
                events = [self.events.get_nowait()]
            waited = 0.0
            while events[-1][0] == "token" and not self.events.empty():  # a slow reader takes what has come at once
                events.append(self.events.get_nowait())
            kind, value = events[-1]
            if kind == "error":
                raise P.APIError(500, str(value), "server_error")
            self.ids += [v for k, v in events if k == "token"]
            self._grow(final=kind == "done")
            text = self.text
            cut = self._stop_at(text)
            if cut is not None:
                self.req.cancel()
                yield text[self.sent:cut], "stop"
                return
            if kind == "done":
                yield text[self.sent:], "length" if value == "length" else "stop"
                return
            safe = len(text) - self.hold  # what can no longer be the start of a stop string
            if safe > self.sent:
                yield text[self.sent:safe], None
                self.sent = safe

    def _stop_at(self, text: str) -> Optional[int]:
        hits = [text.find(s, max(0, self.sent - len(s))) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None


def build_app(served: Served) -> FastAPI:
    """The FastAPI application over `served` (see the module docstring)."""
    options = dict(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None)
    if "telemetry" in inspect.signature(FastAPI).parameters:  # FastAPI ≥ 0.160 instruments every request by default
        options["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(**options)
    served.created = int(time.time())

    @app.exception_handler(P.APIError)
    async def api_error(_, e: P.APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        if first.get("type") == "json_invalid":
            message = f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}"
            return JSONResponse(P.APIError(400, message).body(), status_code=400)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(P.APIError(400, message, param=where or None).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.get("/health")
    async def health():
        return PlainTextResponse("ok")

    @app.get("/v1/models")
    async def models():
        with served.engine.table_lock:
            names = served.engine.table.names()
        return P.models_body(served.base_name, names, served.created)

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, http: HTTPRequest):
        prompts = _completion_prompts(served, body.prompt)
        return await _answer(served, body, prompts, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatRequest, http: HTTPRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = served.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that refuses these messages (roles out of order, ...)
            raise P.APIError(400, f"the chat template cannot render these messages: {e}", param="messages")
        ids = list(served.tokenizer(text, add_special_tokens=False)["input_ids"])
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        return await _answer(served, body, [ids], http, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: P.LoadAdapterRequest):
        if body.lora_name == served.base_name:
            raise P.APIError(400, f"{body.lora_name!r} is the base model's name", param="lora_name")
        table = served.engine.table
        try:
            await run_in_threadpool(served.engine.call, lambda: table.load(body.lora_name, body.lora_path))
        except LorakitError as e:
            raise P.APIError(400, str(e), param="lora_path")
        except Exception as e:  # out of memory, a stopped engine: still an OpenAI error body
            raise P.APIError(500, f"loading {body.lora_name!r} failed: {e}", "server_error")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: P.UnloadAdapterRequest):
        table = served.engine.table
        try:
            await run_in_threadpool(served.engine.call, lambda: table.unload(body.lora_name))
        except LorakitError as e:
            raise P.APIError(404, str(e), "not_found_error", "lora_name", "model_not_found")
        except Exception as e:  # a stopped engine: still an OpenAI error body
            raise P.APIError(500, f"unloading {body.lora_name!r} failed: {e}", "server_error")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


class Mailbox:
    """Hands engine events to asyncio queues of one event loop: one loop wake-up per batch of events (a decode step
    of 64 rows makes 64 events), not one per event."""

    def __init__(self, loop):
        self.loop = loop
        self.pending: list = []
        self.lock = threading.Lock()
        self.scheduled = False

    def post(self, events: "asyncio.Queue", item) -> None:
        """Queue `item` for `events` (any thread)."""
        with self.lock:
            self.pending.append((events, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop has closed (shutdown)
            pass

    def _flush(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for events, item in items:
            events.put_nowait(item)


_MAILBOXES: dict = {}


def _mailbox(loop) -> Mailbox:
    if loop not in _MAILBOXES:
        _MAILBOXES[loop] = Mailbox(loop)
    return _MAILBOXES[loop]


def _completion_prompts(served: Served, prompt) -> list[list[int]]:
    """Token ids of each prompt of a /v1/completions request."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise P.APIError(400, "prompt is empty", param="prompt")
    vocab = len(served.tokenizer)
    out = []
    for p in prompt:
        ids = list(served.tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p)
        if any(not 0 <= t < vocab for t in ids):
            raise P.APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        out.append(ids)
    return out


async def _answer(served: Served, body: P._Sampling, prompts: list[list[int]], http: HTTPRequest, chat: bool):
    """Check the request against the model, start one engine request per prompt, answer whole or streamed."""
    if body.n != 1:
        raise P.APIError(400, "only n=1 is supported", param="n")
    name = None if body.model == served.base_name else body.model
    if name is not None and served.engine.table.slot_of(name) is None:
        raise P.model_not_found(body.model)
    limits = []
    for ids in prompts:
        if not ids:
            raise P.APIError(400, "the prompt has no tokens", param="prompt")
        limits.append(body.max_tokens if body.max_tokens is not None else
                      max(served.context - len(ids), 1) if chat else 16)  # OpenAI's defaults
        if len(ids) + limits[-1] > served.context:
            raise P.APIError(400, f"This model's maximum context length is {served.context} tokens; the prompt has "
                             f"{len(ids)} tokens and max_tokens is {limits[-1]}", param="messages" if chat else
                             "prompt", code="context_length_exceeded")
    runs = []
    loop = asyncio.get_running_loop()
    try:
        for ids, max_tokens in zip(prompts, limits):
            runs.append(_start(served, body, name, ids, max_tokens, loop, http))
    except P.APIError:
        for stream in runs:
            stream.req.cancel()
        raise
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        return StreamingResponse(_stream(served, body, runs, rid, chat), media_type="text/event-stream")
    choices = []
    try:
        for stream in runs:
            text, finish = "", None
            async for piece, finish in stream.pieces():
                text += piece
            choices.append((text, finish))
    finally:
        for stream in runs:
            stream.req.cancel()
    used = P.usage(sum(len(p) for p in prompts), sum(len(s.ids) for s in runs))
    return (P.chat_body if chat else P.completion_body)(rid, body.model, choices, used)


def _start(served: Served, body: P._Sampling, name: Optional[str], ids: list[int], max_tokens: int, loop,
           http) -> TextStream:
    """Reserve the adapter's slot and submit one engine request; its TextStream."""
    slot = served.engine.reserve(name)
    if slot is None:  # unloaded since the check above
        raise P.model_not_found(body.model)
    events: asyncio.Queue = asyncio.Queue()
    mailbox = _mailbox(loop)

    def emit(kind, value):  # engine thread → this request's queue on the event loop
        mailbox.post(events, (kind, value))

    temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
    req = Request(prompt=ids, adapter_slot=slot, max_tokens=max_tokens, emit=emit,
                  temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                  stop_ids=frozenset() if body.ignore_eos else served.stop_ids)
    served.engine.submit(req)
    return TextStream(served, req, events, body.stops(), http.is_disconnected)


async def _stream(served: Served, body: P._Sampling, runs: list[TextStream], rid: str, chat: bool):
    """The SSE body: each choice's pieces in turn, a finish chunk, usage if asked, then [DONE]. Leaving early
    (the client went away) cancels every row of the request."""
    try:
        for index, stream in enumerate(runs):
            if chat:
                yield P.sse(P.chat_chunk(rid, body.model, index, {"role": "assistant", "content": ""}, None))
            try:
                async for piece, finish in stream.pieces():
                    if piece or finish:
                        yield P.sse(P.chat_chunk(rid, body.model, index, {"content": piece} if piece else {}, finish)
                                    if chat else P.completion_chunk(rid, body.model, index, piece, finish))
            except P.APIError as e:
                yield P.sse(e.body())
                return
        if body.include_usage():
            used = P.usage(sum(len(s.req.prompt) for s in runs), sum(len(s.ids) for s in runs))
            yield P.sse(P.usage_chunk(rid, body.model, "chat.completion.chunk" if chat else "text_completion", used))
        yield P.sse("[DONE]")
    finally:
        for stream in runs:
            stream.req.cancel()
