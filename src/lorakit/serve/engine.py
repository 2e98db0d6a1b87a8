"""The batch scheduler: one background thread owns the model and runs one continuous batch.

Between two decode steps the thread (1) runs adapter loads/unloads queued by the HTTP side, (2) drops rows
whose request was cancelled (client gone, stop string seen), (3) admits waiting requests into free cache slots
with one prefill, and (4) runs one decode step for every running row, each row with its own adapter slot
(per-row routing), sampling settings and generator. Each new token is handed to the request's `emit` callback
(the HTTP side turns it into text, stop strings and SSE); nothing a request does reaches another row: a
failing prefill or step fails only the rows it ran.

Steps run one ahead of the host (on CPU in the same order, where waiting costs nothing): a step's samples stay
on the device (Steps.tokens), where the next step reads them, and reach the host through a pinned copy that is
read only after the next step is launched.
So the device never waits for the host's per-token work (emit, stop checks, the HTTP side), and the host waits
for the device without holding the GIL. The price: a row that samples a stop token runs one more step, whose
token is dropped; rows are launched at most max_tokens times and never past the cache.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .adapters import AdapterTable
from .cache import Steps, on_device


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
    position: int = 0  # tokens in the cache after the steps launched so far
    launched: int = 0  # samples launched (prefill and decode steps)
    produced: int = 0  # samples delivered to emit
    finished: bool = False
    generator: Optional[torch.Generator] = None

    def cancel(self) -> None:
        """Ask the engine to drop this row at the next step (thread-safe)."""
        self.cancelled.set()


@dataclass
class Launched:
    """A launched step's samples on their way to the host: reqs[i] takes host[index[i]] once `ready` is done."""

    reqs: list
    index: list
    host: torch.Tensor
    ready: Optional[Any]  # a CUDA event (None on CPU, where the copy is done at once)


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
        self._launched: list[Launched] = []  # oldest first; at most three (decode, prefill, decode)
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
        if self._stopping.is_set():
            raise RuntimeError(SHUTTING_DOWN)
        answer: "queue.Queue" = queue.Queue(maxsize=1)
        self._calls.put((fn, answer))
        self._wake.set()
        try:
            ok, value = answer.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the engine did not answer in {timeout:g} s") from None
        if not ok:
            raise value
        return value

    # --- the loop ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.steps.device.type == "cuda":  # a new thread starts on GPU 0: its current streams, the events
            torch.cuda.set_device(self.steps.device)  # and graph captures follow the model's GPU (--device cuda:1)
        while not self._stopping.is_set():
            try:
                if not self._calls.empty():
                    self._deliver(keep=0)  # adapter loads run after the steps launched so far are handed out
                self._run_calls()
                self._drop_cancelled()
                self._admit()
                self._drop_cancelled()  # also rows cancelled at their first token
                launched = self._decode() if self.running else False
                self._deliver(keep=1 if launched else 0)
                if not self.running and not self._launched:
                    self._wake.wait(0.05)
                    self._wake.clear()
            except Exception as e:  # noqa: BLE001 (sampling, a sink): the running rows fail, the thread lives on
                self._launched.clear()
                for req in list(self.running.values()):
                    _quietly(self._finish, req, "error", f"engine step failed: {e}")  # a failing sink too
        for req in list(self.running.values()) + self._held + _drain(self._waiting):
            _quietly(req.emit, "error", SHUTTING_DOWN)
        for _, answer in _drain(self._calls):  # adapter loads that were waiting for a step boundary
            answer.put((False, RuntimeError(SHUTTING_DOWN)))

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
        if req.finished:
            return
        req.finished = True
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
            for req in batch:
                if req.seed is not None:
                    req.generator = torch.Generator(device=logits.device).manual_seed(req.seed)
            chosen = sample_on_device(logits, batch)  # [B]
            self.steps.write_samples(chosen, [r.cache_row for r in batch])
        except Exception as e:  # noqa: BLE001 (out of memory, a model error): only these rows fail
            for req in batch:
                with self.table_lock:
                    self.table.release(req.adapter_slot)
                req.emit("error", f"prefill failed: {e}")
            return
        for req in batch:
            req.position, req.launched = len(req.prompt), 1
            self.running[req.cache_row] = req
        self._launch(batch, list(range(len(batch))), chosen)

    def _can_run(self, req: Request) -> bool:
        """Another decode step for req: samples left to launch and a cache column to write."""
        return not req.finished and req.launched < req.max_tokens and req.position < self.steps.cache.sink

    def _decode(self) -> bool:
        """Launch one decode step for every running row that can take one; False when none can."""
        live = [r for r in self.running.values() if self._can_run(r)]
        if not live:
            return False
        n = max(r.cache_row for r in live) + 1
        rows: list[Optional[Request]] = [None] * n
        for req in live:
            rows[req.cache_row] = req
        positions = [r.position if r else -1 for r in rows]
        slots = [r.adapter_slot if r else self.table.none_slot for r in rows]
        try:
            logits = self.steps.decode(None, positions, slots)  # tokens: each row's latest sample, on the device
            chosen = sample_on_device(logits, live, [r.cache_row for r in live])  # [n], indexed by cache row
            self.steps.write_samples(chosen)
        except Exception as e:  # noqa: BLE001 (as in _admit)
            for req in live:
                self._finish(req, "error", f"decode failed: {e}")
            return False
        for req in live:
            req.position += 1
            req.launched += 1
        self._launch(live, [r.cache_row for r in live], chosen)
        return True

    def _launch(self, reqs: list, index: list, chosen: torch.Tensor) -> None:
        """Start the copy of a step's samples to the host; _deliver hands them out later."""
        if chosen.is_cuda:
            host = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
            host.copy_(chosen, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(chosen.device))  # the stream of the copy, not GPU 0's
        else:
            host, ready = chosen, None
        self._launched.append(Launched(reqs, index, host, ready))

    def _deliver(self, keep: int) -> None:
        """Hand out the samples of every launched step but the newest `keep`: emit tokens, finish rows at an end
        token, at max_tokens or at the end of the cache."""
        while len(self._launched) > keep:
            step = self._launched.pop(0)
            if step.ready is not None:
                step.ready.synchronize()  # releases the GIL while the device works
            values = step.host.tolist()
            for req, i in zip(step.reqs, step.index):
                if req.finished:  # cancelled, or an end token in an earlier step: this sample is dropped
                    continue
                token = values[i]
                req.produced += 1
                if token in req.stop_ids:
                    self._finish(req, "done", "stop")
                    continue
                req.emit("token", token)
                if req.produced >= req.max_tokens or (req.produced == req.launched and not self._can_run(req)):
                    self._finish(req, "done", "length")


SHUTTING_DOWN = "the server is shutting down"

# Temperatures below this sample greedily (their limit, as vLLM does): logits / 1e-40 overflow to inf, softmax gives
# NaN, and multinomial would fail the whole step, every other request's row included.
GREEDY_BELOW = 1e-5


def sample(logits: torch.Tensor, reqs: Sequence[Request], rows: Optional[Sequence[int]] = None) -> list[int]:
    """Next token of each request as a list (see sample_on_device): reqs[i] reads logits[rows[i]]."""
    rows = list(range(len(reqs))) if rows is None else list(rows)
    chosen = sample_on_device(logits, reqs, rows).tolist()
    return [chosen[r] for r in rows]


def sample_on_device(logits: torch.Tensor, reqs: Sequence[Request], rows: Optional[Sequence[int]] = None):
    """Next token of every logits row, on the device ([n] long; rows no request reads get their argmax):
    argmax for temperature 0 (and below GREEDY_BELOW), else temperature and top-p (nucleus) sampling, all sampled
    rows at once; a row with a seed draws from its own generator (no other request consumes its random numbers).
    reqs[i] reads logits[rows[i]] (rows default 0..)."""
    rows = list(range(len(reqs))) if rows is None else list(rows)
    chosen = logits.argmax(-1)  # [n]: one reduction over every row, idle ones included, no gather
    hot = [i for i, r in enumerate(reqs) if r.temperature >= GREEDY_BELOW]
    if not hot:
        return chosen
    device = logits.device
    at = on_device([rows[i] for i in hot], device)
    temperature = on_device([reqs[i].temperature for i in hot], device, logits.dtype)
    probs = torch.softmax(logits[at] / temperature[:, None], -1)
    if any(reqs[i].top_p < 1.0 for i in hot):
        top_p = on_device([reqs[i].top_p for i in hot], device, probs.dtype)
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
    return chosen.index_copy(0, at, picked)


def _quietly(fn: Callable, *args) -> None:
    """fn(*args), an exception of it ignored: a request's sink that fails must not end the engine thread."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        pass


def _drain(q: "queue.Queue") -> list:
    items = []
    for _ in itertools.count():
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
    return items
