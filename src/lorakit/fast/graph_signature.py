"""The signature of a block's call that a CUDA graph replay must match (block_graphs.py, checkpoint_graphs.py): what
the block's host code decides on. Two calls with one signature run the same kernels on the same memory."""

from __future__ import annotations

import torch
from torch import nn

from .. import triton_gate
from ..core.adapted import AdaptedLayer, DenseWeight
from .checkpoint import _DTENSOR, autocast_state
from .families import TILE_ATTR

PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)  # values a signature holds as they are


def signature(block: nn.Module, leaves: list, spec):
    """What a replay must match (block_graphs.py's docstring), or None where the block cannot run from a graph."""
    parts = [spec, autocast_state(torch.device("cuda")), triton_gate.enabled(), torch.get_float32_matmul_precision(),
             torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
             torch.are_deterministic_algorithms_enabled()]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type != "cuda" or (_DTENSOR is not None and isinstance(leaf, _DTENSOR)):
                return None
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad))
        elif type(leaf) in PLAIN:
            parts.append((type(leaf), leaf))
        else:
            return None
    if _global_hooks_set():
        return None
    for m in block.modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m.__dict__.get(TILE_ATTR):
            return None  # hooks would fire only when captured; a tiled MLP reads the generator's state
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                if _DTENSOR is not None and isinstance(t, _DTENSOR):
                    return None
                parts.append((t.data_ptr(), t.shape, t.stride(), t.dtype, t.requires_grad,
                              id(t) if t.requires_grad else t._version))
        if isinstance(m, AdaptedLayer):
            d = m.__dict__
            source = d["weight_source"]
            dense = type(source) is DenseWeight or callable(getattr(source, "write_dense", None))
            if d["routing"] is not None or not dense:  # a 4-bit base writes its dense weight into a buffer
                return None
            parts.append((tuple(m.active), d["disabled"], tuple(m.merged), d["training"]))
            for delta in d["_modules"]["deltas"]._modules.values():
                parts.append(_settings(delta))
                parts.extend(_settings(sub) for sub in delta._modules.values() if sub is not None)
    return tuple(parts)


def _global_hooks_set() -> bool:
    """Whether nn.Module's process-wide forward or backward hooks are set (they would fire only when captured)."""
    mod = nn.modules.module
    return bool(mod._global_forward_hooks or mod._global_forward_pre_hooks or mod._global_backward_hooks)


def _settings(module: nn.Module) -> tuple:
    """A module's plain settings (scaling, dropout p, training, ...): what its host code decides on."""
    return tuple((k, v) for k, v in module.__dict__.items() if type(v) in PLAIN)
