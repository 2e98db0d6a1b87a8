"""Mixed-adapter forwards replayed from CUDA graphs: per_row's result without its host work.

    run = lorakit.PerRowGraphs(model)
    out = run(["a", "b", None, "a"], input_ids)   # = with per_row(model, names): model(input_ids, use_cache=False)

A per_row forward launches, per adapted layer, its base GEMM and one SGMV, and checks the layer's cached plan:
at 32 adapters on a 1B model that is ~24 ms of host time for ~25 ms of device work, so a slower host makes the
forward host-bound. PerRowGraphs captures the routed forward once per call signature (the adapter set, each
tensor argument's shape/dtype/device, the other arguments' values) and then replays it: the inputs are copied
into the graph's static buffers and the rows' adapters into StaticRows' buffers (rows.py), so one graph serves
every arrangement of rows over the same adapters.

What a replay re-checks (anything else changed means a new capture):
- before it: the model's adapted layers are the same objects, none merged, disabled or training, and every base
  parameter and buffer has the storage it had (`param.data = ...`, `.to()`, `.half()` are seen);
- while it runs (the check overlaps the device's work): every layer plan it used is current (layer_plans'
  plan_is_current: the same deltas, their factors unchanged). If one is not, the replay's output is thrown away
  and the call captures again, so a write to an adapter between calls is never missed.
Not seen: hooks or forward patches added to the model after a capture (the graph runs the forward as captured),
global modes other than autocast (which is part of the signature; an `sdpa_kernel` context is not), and writes
through `param.data` to adapter factors (as for per_row: call clear_stacks). Call `clear()` after such changes.
The graphs run in inference (no autograd) and eval mode, on one stream: calls from several streams or threads
must not overlap. A model in training mode, or off CUDA, runs per_row eagerly (with the same static routing, so
CPU runs the same code path as far as it can).
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

from ..core.adapted import AdaptedLayer
from ..errors import ConfigError, MixedBatchError
from .layer_plans import plan_is_current
from .routing import _wrappers, check_names, per_row, rows_block
from .rows import NotStatic, StaticRows

_PLAIN = (torch.Tensor, type(None), bool, int, float, str)


class _Entry:
    """One call signature's static inputs, rows, graph (None until captured; False: cannot be captured) and what
    the capture assumed about the model."""

    def __init__(self, key: tuple, rows: StaticRows, args: tuple, kwargs: dict, device: torch.device):
        self.key = key
        self.rows = rows
        self.device = device  # the model's: where the graph runs
        with torch.inference_mode(False):  # normal tensors, which calls in and out of inference_mode may write
            self.args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            self.kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        self.graph: Any = None
        self.out: Any = None
        self.plans: tuple = ()
        self.model_state: tuple = ()
        self.held: tuple = ()  # aliases of the base tensors' storage: no freed address can come back as the same one

    def load(self, args: tuple, kwargs: dict) -> None:
        """Copy the call's tensors into the static inputs (queued on the device, no host wait)."""
        for mine, theirs in zip(self.args, args):
            if isinstance(mine, torch.Tensor):
                mine.copy_(theirs, non_blocking=True)
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                self.kwargs[k].copy_(v, non_blocking=True)


def _model_state(model: nn.Module) -> tuple[tuple, list]:
    """(what a replay requires unchanged, the base tensors): the adapted layers and their merged/disabled/training
    flags, and the storage of every parameter and buffer outside the adapters (their stacks are the plans' part)."""
    layers, _ = _wrappers(model)
    tensors, todo = [], [model]
    while todo:
        module = todo.pop()
        tensors.extend(t for t in module._parameters.values() if t is not None)
        tensors.extend(t for t in module._buffers.values() if t is not None)
        adapted = isinstance(module, AdaptedLayer)
        todo.extend(c for name, c in module._modules.items() if c is not None and not (adapted and name == "deltas"))
    flags = tuple((bool(m.merged), m.disabled, m.training) for m in layers)
    return (tuple(map(id, layers)), flags, tuple(t.data_ptr() for t in tensors)), tensors


def _signature(args: tuple, kwargs: dict, device: torch.device) -> tuple:
    """The part of a call a graph is specific to: each tensor's shape/dtype/device, every other argument's value,
    and the autocast state of the model's device type (a graph captured under autocast computes in its dtype)."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype, v.device)
        try:
            hash(v)
        except TypeError:
            raise MixedBatchError(f"PerRowGraphs takes tensors and hashable constants as arguments, got a "
                                  f"{type(v).__name__}") from None
        return ("value", type(v), v)
    autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
    return tuple(map(one, args)), tuple((k, one(v)) for k, v in sorted(kwargs.items())), autocast


class PerRowGraphs:
    """Replays per_row forwards of `model` from CUDA graphs, one per call signature (module docstring).

    Args:
        model: an adapted model (eval mode for graphs); it stays as it is, nothing is wrapped.
        max_graphs: signatures kept; the least recently used is dropped beyond it.
    """

    def __init__(self, model: nn.Module, max_graphs: int = 8):
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise ConfigError(f"PerRowGraphs: max_graphs must be an integer ≥ 1, got {max_graphs!r}")
        self.model = model
        self.max_graphs = max_graphs
        self._entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self._pool = None
        self._stream = None  # one capture stream: the pool's blocks are reused across this runner's graphs
        params = inspect.signature(model.forward).parameters
        self._no_cache = "use_cache" in params  # an HF cache made inside a graph would be rewritten by each replay

    def __call__(self, names: Sequence[Optional[str]], *args, **kwargs) -> Any:
        """The model's output on (args, kwargs) with row i through adapter names[i] (None: the base), computed as
        `with per_row(model, names): model(*args, **kwargs)` under torch.no_grad(); its tensors are the call's own
        (copied out of the graph's buffers). HF models get use_cache=False unless the call says otherwise."""
        names = check_names(self.model, names)
        if self._no_cache:
            kwargs.setdefault("use_cache", False)
        with torch.no_grad():
            if self.model.training:
                return self._eager(names, args, kwargs)
            adapters = tuple(sorted({n for n in names if n is not None}))
            device = _device(self.model)
            key = (adapters, len(names), device, _signature(args, kwargs, device))
            entry = self._entry(key, adapters, names, args, kwargs, device)
            if entry.graph is False:
                return self._eager(names, args, kwargs)
            entry.rows.assign(names)
            entry.load(args, kwargs)
            state = _model_state(self.model)[0] if len(self) else None
            if state is not None:  # every graph made for another state goes now, with the base tensors it holds
                self._drop([e for e in self._entries.values() if e.graph and e.model_state != state])
            if entry.graph is None:
                return self._capture(entry)
            entry.graph.replay()
            out = tree_map_only(torch.Tensor, torch.clone, entry.out)
            if all(plan_is_current(layer, lp) for layer, lp in entry.plans):  # checked while the replay runs
                return out
            self._drop([entry])
            return self._capture(entry)

    def clear(self) -> None:
        """Drop every captured graph (after changing the model in a way a replay cannot see)."""
        self._drop(list(self._entries.values()))
        self._entries.clear()
        self._pool = self._stream = None

    def _drop(self, entries: list) -> None:
        """Forget these entries' graphs, once their last replays have run (a graph is not freed in flight)."""
        for device in {e.device for e in entries if e.graph}:
            torch.cuda.synchronize(device)
        for e in entries:
            if e.graph:
                e.graph, e.out, e.plans, e.model_state, e.held = None, None, (), (), ()

    def __len__(self) -> int:
        """The number of captured graphs."""
        return sum(1 for e in self._entries.values() if e.graph)

    def _entry(self, key: tuple, adapters: tuple, names: list, args: tuple, kwargs: dict, device) -> _Entry:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        if len(self._entries) >= self.max_graphs:
            self._drop([self._entries.popitem(last=False)[1]])
        entry = self._entries[key] = _Entry(key, StaticRows(adapters, names), args, kwargs, device)
        return entry

    def _eager(self, names: list, args: tuple, kwargs: dict) -> Any:
        """per_row's own forward (training mode, and signatures that cannot be captured)."""
        with per_row(self.model, names):
            return self.model(*args, **kwargs)

    def _forward(self, entry: _Entry) -> tuple[Any, dict]:
        with rows_block(self.model, entry.rows) as router:
            out = self.model(*entry.args, **entry.kwargs)
        return out, router.used

    def _capture(self, entry: _Entry) -> Any:
        """The call's output, computed eagerly on the static inputs; on CUDA the forward is then captured."""
        try:
            out, _ = self._forward(entry)  # the answer, on the current stream; also makes every buffer and plan
        except NotStatic:
            entry.graph = False  # per_row's grouped rows: this signature runs eagerly from now on
            return self._eager(entry.rows.names, entry.args, entry.kwargs)
        except BaseException:  # a call the model refuses leaves no entry behind
            self._entries.pop(entry.key, None)
            raise
        odd = {type(v).__name__ for v in tree_leaves(out) if not isinstance(v, _PLAIN)}
        if odd:
            self._entries.pop(entry.key, None)
            raise MixedBatchError(f"PerRowGraphs: the model returned {sorted(odd)}, whose tensors a replay would "
                                  "overwrite; call it so that it returns tensors only (HF: use_cache=False)")
        device = entry.device
        if device.type != "cuda":
            return out
        cache = torch.is_autocast_cache_enabled()  # autocast's cached casts are freed when its block ends: a graph
        torch.set_autocast_cache_enabled(False)   # must cast inside itself (as make_graphed_callables requires)
        try:
            return self._capture_on(entry, out, device)
        finally:
            torch.set_autocast_cache_enabled(cache)

    def _capture_on(self, entry: _Entry, out: Any, device: torch.device) -> Any:
        with torch.cuda.device(device):
            if self._stream is None or self._stream.device != device:
                self._stream = torch.cuda.Stream(device)
            stream = self._stream
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # a warm-up on the capture stream (workspaces, lazy initialisation)
                self._forward(entry)
            torch.cuda.current_stream(device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    static_out, used = self._forward(entry)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:  # an operation a graph cannot hold: this signature runs eagerly from now on
                warnings.warn(f"PerRowGraphs: capture failed ({e}); this call signature runs per_row eagerly")
                entry.graph = False
                return out
        entry.model_state, tensors = _model_state(self.model)
        entry.held = tuple(t.detach() for t in tensors)
        entry.graph, entry.out, entry.plans = graph, static_out, tuple(used.values())
        return out


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


__all__ = ["PerRowGraphs"]
