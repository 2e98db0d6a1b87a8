"""The OpenAI wire format the server speaks: request schemas, response and stream-chunk bodies, error bodies.

Field names, defaults and error bodies follow the OpenAI API (`{"error": {"message", "type", "param", "code"}}`)
and vLLM's adapter endpoints (`{"lora_name", "lora_path"}`), so the official `openai` client and tools written
for vLLM work unchanged. Unknown request fields are accepted and ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(default=None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None
    n: Optional[int] = Field(default=1, ge=1)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever the model's end token

    def stops(self) -> list[str]:
        """The stop strings, as a list (empty strings dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk (stream_options.include_usage)."""
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    """POST /v1/completions: a text prompt (or token ids; or a list of either, one choice each)."""

    prompt: Union[str, list[str], list[int], list[list[int]]]


class ChatMessage(BaseModel):
    """One chat turn; content is text or a list of OpenAI content parts (their text parts are used)."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        """The turn's text (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    """POST /v1/chat/completions: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)


class LoadAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's name and fields)."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's name and fields)."""

    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(min_length=1)


class APIError(Exception):
    """An error answered with its HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        """{"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def model_not_found(name: str) -> APIError:
    """404 for a `model` that names neither the base nor a loaded adapter."""
    return APIError(404, f"The model `{name}` does not exist (not the base model or a loaded adapter).",
                    param="model", code="model_not_found")


def new_id(prefix: str) -> str:
    """A response id: prefix-<hex>."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, choices: list[tuple[str, str]], used: dict) -> dict:
    """A /v1/completions answer; choices are (text, finish_reason)."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                        for i, (t, f) in enumerate(choices)], "usage": used}


def chat_body(rid: str, model: str, choices: list[tuple[str, str]], used: dict) -> dict:
    """A /v1/chat/completions answer; choices are (content, finish_reason)."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                         "finish_reason": f} for i, (t, f) in enumerate(choices)], "usage": used}


def completion_chunk(rid: str, model: str, index: int, text: str, finish: Optional[str]) -> dict:
    """One streamed /v1/completions chunk."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish: Optional[str]) -> dict:
    """One streamed /v1/chat/completions chunk (delta: {"role"} first, then {"content"} pieces)."""
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, obj: str, used: dict) -> dict:
    """The last chunk of a stream that asked for usage (stream_options.include_usage): no choices."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": used}


def sse(payload: Union[dict, str]) -> str:
    """One server-sent event: `data: {...}` and a blank line (`data: [DONE]` for the string "[DONE]")."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def models_body(base: str, adapters: list[str], created: int) -> dict:
    """GET /v1/models: the base model, then each loaded adapter (parent: the base)."""
    data = [{"id": base, "object": "model", "created": created, "owned_by": "lorakit", "root": base, "parent": None}]
    data += [{"id": a, "object": "model", "created": created, "owned_by": "lorakit", "root": a, "parent": base}
             for a in adapters]
    return {"object": "list", "data": data}
