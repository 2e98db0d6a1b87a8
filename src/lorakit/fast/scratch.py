"""One reused buffer per (device, dtype) for dense weights that a fused path builds on the fly (a 4-bit base).

A weight source that offers `write_dense(out)` (core/adapted.py) dequantises into a view of this buffer, in
forward and again in backward, so a training step allocates no dense copy of any layer: the buffer grows to
the largest layer once and is reused by every layer after that. Uses are strictly one after another on the
device's stream (each GEMM that reads the view is queued before the next layer writes it).

Inside `kept_dense()` (a checkpointed block's forward, and its recompute and backward, in the offload mode:
checkpoint.py) each source's dense weight is written once into a tensor of its own instead, shared by every call
in the block (an MLP's sequence tiles too); the fused calls keep it for their backward, which then dequantises
nothing: two dequantisations a step instead of three, for one block's dense weights held during its backward
(~0.4 GiB at 8B).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.autograd.graph import increment_version

_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def scratch(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least `numel` elements on `device` in `dtype` (the same tensor until a larger one is asked)."""
    key = (device, dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor even when first asked under inference_mode
            buf = _BUFFERS[key] = torch.empty(numel, device=device, dtype=dtype)
    return buf


_KEPT = threading.local()  # .dense: id(source) → (source, its dense weight) while kept_dense() is entered


@contextlib.contextmanager
def kept_dense(enabled: bool = True):
    """Within the block, dense_from_source gives each source's dense weight in a tensor of its own, written once
    (see the module docstring); nested entries share the outer one's tensors. enabled=False: no effect."""
    if not enabled:
        yield
        return
    outer = getattr(_KEPT, "dense", None)
    _KEPT.dense = {} if outer is None else outer
    try:
        yield
    finally:
        _KEPT.dense = outer


def keeping_dense() -> bool:
    """Whether this thread is inside kept_dense()."""
    return getattr(_KEPT, "dense", None) is not None


def dense_from_source(source, device: torch.device) -> torch.Tensor:
    """The source's dense weight [out, in] written into the shared scratch buffer (a view of it; valid until the
    next call). Its version counter is bumped, so caches keyed by (pointer, version) see a new tensor. Inside
    kept_dense(): the source's own tensor, written at its first call there."""
    out_f, in_f = source.dense_shape
    kept = getattr(_KEPT, "dense", None)
    if kept is not None:
        got = kept.get(id(source))
        if got is None or got[0] is not source:
            got = kept[id(source)] = (source, torch.empty(out_f, in_f, device=device, dtype=source.dense_dtype))
            source.write_dense(got[1])
        return got[1]
    w = scratch(out_f * in_f, device, source.dense_dtype)[:out_f * in_f].view(out_f, in_f)
    source.write_dense(w)
    increment_version(w)
    return w


def held() -> list:
    """The scratch buffers as they are now: a CUDA graph that writes into them keeps them, so a buffer replaced
    by a larger one is not freed under the graph."""
    return list(_BUFFERS.values())


def release() -> None:
    """Free every scratch buffer (they are allocated again on the next use)."""
    _BUFFERS.clear()


def base_weight(params, w_idx, sources, j, device, kept: tuple = ()) -> torch.Tensor:
    """Output j of a fused call: its base weight Parameter, else its source's dense weight (from `kept`, the dense
    weights a call took inside kept_dense(), where given; else in the scratch buffer)."""
    if w_idx is not None:
        return params[w_idx]
    return kept[j] if kept else dense_from_source(sources[j], device)
