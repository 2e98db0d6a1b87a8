"""The batch scheduler: one background thread owns the model and runs one continuous batch.

Between two decode steps the thread (1) runs adapter loads/unloads queued by the HTTP side, (2) drops rows
whose request was cancelled (client gone, stop string seen), (3) admits waiting requests into free cache slots
with one prefill, and (4) runs one decode step for every running row, each row with its own adapter slot
(per-row routing), sampling settings and generator. Each new token is handed to the request's `emit` callback
(the HTTP side turns it into text, stop strings and SSE); nothing a request does reaches another row: a
failing prefill or step fails only the rows it ran.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .adapters import AdapterTable
from .cache import Steps


@dataclass
class Request:
    """One generation: prompt ids, limits, sampling, and where its tokens go.

    emit(kind, value) is called from the engine thread: ("token", id), ("done", "stop" | "length"),
    ("error", message)."""

    prompt: list[int]
    adapter_slot: int
    max_tokens: int
    emit: Callable[[str, Any], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_ids: frozenset = frozenset()
    cancelled: threading.Event = field(default_factory=threading.Event)
    # engine-side state
    cache_row: int = -1
    position: int = 0  # tokens in the cache: the position `last` runs at
    last: int = 0
    produced: int = 0
    generator: Optional[torch.Generator] = None

    def cancel(self) -> None:
        """Ask the engine to drop this row at the next step (thread-safe)."""
        self.cancelled.set()


class Engine:
    """The scheduler thread (see the module docstring). `submit`, `call` and `stop` are thread-safe."""

    def __init__(self, steps: Steps, table: AdapterTable, slots: int, max_prefill_tokens: int = 8192):
        self.steps = steps
        self.table = table
        self.slots = slots
        self.max_prefill_tokens = max_prefill_tokens
        self.running: dict[int, Request] = {}  # cache row → request
        self._waiting: "queue.Queue[Request]" = queue.Queue()
        self._calls: "queue.Queue[tuple[Callable[[], Any], queue.Queue]]" = queue.Queue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lorakit-serve-engine", daemon=True)
        self._held: list[Request] = []
        self.table_lock = threading.Lock()  # the HTTP side reads table.slots while the engine changes them

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (waiting at most `timeout` seconds) and fail what it still held."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    def reserve(self, name: Optional[str]) -> Optional[int]:
        """The adapter slot for a new request (the none slot for the base model, None: no such adapter), counted
        as in use until the request ends (an unload meanwhile waits for it)."""
        with self.table_lock:
            slot = self.table.none_slot if name is None else self.table.slot_of(name)
            if slot is not None:
                self.table.acquire(slot)
            return slot

    def submit(self, request: Request) -> None:
        """Queue a request; it joins the batch between two decode steps."""
        self._waiting.put(request)
        self._wake.set()

    def call(self, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
        """Run fn() on the engine thread between steps (adapter loads); returns its result or raises its error."""
        answer: "queue.Queue" = queue.Queue(maxsize=1)
        self._calls.put((fn, answer))
        self._wake.set()
        ok, value = answer.get(timeout=timeout)
        if not ok:
            raise value
        return value

    # --- the loop ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._run_calls()
                self._drop_cancelled()
                self._admit()
                self._drop_cancelled()  # also rows cancelled at their first token
                if self.running:
                    self._decode()
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
            except Exception as e:  # noqa: BLE001 (sampling, a sink): the running rows fail, the thread lives on
                for req in list(self.running.values()):
                    self._finish(req, "error", f"engine step failed: {e}")
        for req in list(self.running.values()) + self._held + _drain(self._waiting):
            req.emit("error", "the server is shutting down")

    def _run_calls(self) -> None:
        while True:
            try:
                fn, answer = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                with self.table_lock:
                    answer.put((True, fn()))
            except Exception as e:  # handed to the caller, who answers its HTTP request with it
                answer.put((False, e))

    def _finish(self, req: Request, kind: str, value: Any) -> None:
        self.running.pop(req.cache_row, None)
        with self.table_lock:
            self.table.release(req.adapter_slot)
        req.emit(kind, value)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.running.values() if r.cancelled.is_set()]:
            self._finish(req, "done", "cancelled")

    def _admit(self) -> None:
        """Move waiting requests into free rows (lowest first, so decode runs a short prefix) and prefill them."""
        free = [row for row in range(self.slots) if row not in self.running]
        batch: list[Request] = []
        tokens = 0
        while free and (self._held or not self._waiting.empty()):
            req = self._held.pop(0) if self._held else self._waiting.get_nowait()
            if req.cancelled.is_set():
                with self.table_lock:
                    self.table.release(req.adapter_slot)
                req.emit("done", "cancelled")
                continue
            if batch and tokens + len(req.prompt) > self.max_prefill_tokens:
                self._held.insert(0, req)
                break
            req.cache_row = free.pop(0)
            batch.append(req)
            tokens += len(req.prompt)
        if not batch:
            return
        try:
            logits = self.steps.prefill([r.prompt for r in batch], [r.cache_row for r in batch],
                                        [r.adapter_slot for r in batch])
        except Exception as e:  # noqa: BLE001 (out of memory, a model error): only these rows fail
            for req in batch:
                with self.table_lock:
                    self.table.release(req.adapter_slot)
                req.emit("error", f"prefill failed: {e}")
            return
        for req in batch:
            req.position = len(req.prompt)
            self.running[req.cache_row] = req
            if req.seed is not None:
                req.generator = torch.Generator(device=logits.device).manual_seed(req.seed)
        self._take(batch, logits, list(range(len(batch))))

    def _decode(self) -> None:
        n = max(self.running) + 1
        rows = [self.running.get(i) for i in range(n)]
        tokens = [r.last if r else 0 for r in rows]
        positions = [r.position if r else -1 for r in rows]
        slots = [r.adapter_slot if r else self.table.none_slot for r in rows]
        try:
            logits = self.steps.decode(tokens, positions, slots)
        except Exception as e:  # noqa: BLE001 (as in _admit)
            for req in [r for r in rows if r is not None]:
                self._finish(req, "error", f"decode failed: {e}")
            return
        live = [r for r in rows if r is not None]
        for req in live:
            req.position += 1
        self._take(live, logits, [r.cache_row for r in live])  # idle rows' logits are never gathered

    def _take(self, reqs: Sequence[Request], logits: torch.Tensor, rows: list[int]) -> None:
        """Sample each row's next token, hand it over, and finish rows at an end token or max_tokens."""
        chosen = sample(logits, reqs, rows)
        for req, token in zip(reqs, chosen):
            req.last = token
            req.produced += 1
            if token in req.stop_ids:
                self._finish(req, "done", "stop")
                continue
            req.emit("token", token)
            if req.produced >= req.max_tokens or req.position >= self.steps.cache.sink:  # no column left to run it
                self._finish(req, "done", "length")


# Temperatures below this sample greedily (their limit, as vLLM does): logits / 1e-40 overflow to inf, softmax gives
# NaN, and multinomial would fail the whole step, every other request's row included.
GREEDY_BELOW = 1e-5


def sample(logits: torch.Tensor, reqs: Sequence[Request], rows: Optional[Sequence[int]] = None) -> list[int]:
    """Next token of each request (reqs[i] reads logits[rows[i]]; rows default 0..): argmax for temperature 0 (and
    below GREEDY_BELOW), else temperature and top-p (nucleus) sampling, all sampled rows at once; a row with a seed
    draws from its own generator (no other request consumes its random numbers)."""
    rows = list(range(len(reqs))) if rows is None else list(rows)
    greedy = logits.argmax(-1)  # [n]: one reduction over every row, idle ones included, no gather
    hot = [i for i, r in enumerate(reqs) if r.temperature >= GREEDY_BELOW]
    if hot:
        device = logits.device
        temperature = torch.tensor([reqs[i].temperature for i in hot], device=device, dtype=logits.dtype)
        probs = torch.softmax(logits[torch.tensor([rows[i] for i in hot], device=device)] / temperature[:, None], -1)
        if any(reqs[i].top_p < 1.0 for i in hot):
            top_p = torch.tensor([reqs[i].top_p for i in hot], device=device, dtype=probs.dtype)
            sorted_p, order = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p[:, None]  # keep the smallest head whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
        picked = torch.empty(len(hot), dtype=torch.long, device=device)
        free = [j for j, i in enumerate(hot) if reqs[i].generator is None]
        if free:
            picked[free] = torch.multinomial(probs[free], 1)[:, 0]
        for j, i in enumerate(hot):
            if reqs[i].generator is not None:
                picked[j] = torch.multinomial(probs[j], 1, generator=reqs[i].generator)[0]
        greedy = greedy.clone()
        greedy[torch.tensor([rows[i] for i in hot], device=device)] = picked
    chosen = greedy.tolist()  # the step's one device → host transfer
    return [chosen[r] for r in rows]


def _drain(q: "queue.Queue") -> list:
    items = []
    for _ in itertools.count():
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
    return items
