"""One reused buffer per (device, dtype) for dense weights that a fused path builds on the fly (a 4-bit base).

A weight source that offers `write_dense(out)` (core/adapted.py) dequantises into a view of this buffer, in
forward and again in backward, so a training step allocates no dense copy of any layer: the buffer grows to
the largest layer once and is reused by every layer after that. Uses are strictly one after another on the
device's stream (each GEMM that reads the view is queued before the next layer writes it).
"""

from __future__ import annotations

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


def dense_from_source(source, device: torch.device) -> torch.Tensor:
    """The source's dense weight [out, in] written into the shared scratch buffer (a view of it; valid until the
    next call). Its version counter is bumped, so caches keyed by (pointer, version) see a new tensor."""
    out_f, in_f = source.dense_shape
    w = scratch(out_f * in_f, device, source.dense_dtype)[:out_f * in_f].view(out_f, in_f)
    source.write_dense(w)
    increment_version(w)
    return w


def release() -> None:
    """Free every scratch buffer (they are allocated again on the next use)."""
    _BUFFERS.clear()


def base_weight(params, w_idx, sources, j, device) -> torch.Tensor:
    """Output j of a fused call: its base weight Parameter, or its source's dense weight in the scratch buffer."""
    return params[w_idx] if w_idx is not None else dense_from_source(sources[j], device)
