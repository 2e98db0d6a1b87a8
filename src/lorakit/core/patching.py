"""Instance-level forward patches: the one way lorakit replaces a module's `forward`.

A patch sets `module.forward` on the instance (never the class, so other models in the process keep their
own code) to `functools.partial(fn, module, original, *extra)`, where `original` is the bound forward the
module had just before. The instance forward it displaced (or None) is kept in `module.__dict__` under a
per-slot key, so unpatching puts back exactly what was there.

Slots let independent patches stack on one module: the HF family patches use the default slot, the
activation-checkpointing wrapper of a repeated block uses slot "checkpoint". Patches stacked on one module
must be removed in the reverse order they were installed (the newest first).
"""

from __future__ import annotations

import functools
from typing import Callable

from torch import nn

DEFAULT_SLOT = "default"
_KEY = "_lorakit_patch"  # module.__dict__[key] = {"prior": the instance forward it replaced, or None}


def _key(slot: str) -> str:
    return _KEY if slot == DEFAULT_SLOT else f"{_KEY}_{slot}"


def patch_forward(module: nn.Module, fn: Callable, *extra, slot: str = DEFAULT_SLOT) -> bool:
    """Replace `module.forward` with `fn(module, original_forward, *extra, *args, **kwargs)`.

    Args:
        module: the module to patch (its instance `forward`; the class is untouched).
        fn: the new forward; it receives the module, the forward it replaces, then `extra`, then the call's
            own arguments.
        extra: fixed arguments placed between `original_forward` and the call's arguments.
        slot: which patch this is; one patch per slot per module.

    Returns:
        True when patched, False when `module` already has a patch in this slot (nothing is changed).
    """
    key = _key(slot)
    if key in module.__dict__:
        return False
    original = module.forward
    module.__dict__[key] = {"prior": module.__dict__.get("forward"), "original": original}
    module.__dict__["forward"] = functools.partial(fn, module, original, *extra)
    return True


def unpatch_forward(module: nn.Module, slot: str = DEFAULT_SLOT) -> bool:
    """Remove the patch in `slot`, restoring the instance forward it replaced; returns whether one was there."""
    info = module.__dict__.pop(_key(slot), None)
    if info is None:
        return False
    module.__dict__.pop("forward", None)
    if info["prior"] is not None:
        module.__dict__["forward"] = info["prior"]
    return True


def is_patched(module: nn.Module, slot: str = DEFAULT_SLOT) -> bool:
    """Whether `module` has a patch in `slot`."""
    return _key(slot) in module.__dict__


def patched_original(module: nn.Module, slot: str = DEFAULT_SLOT):
    """The forward that the patch in `slot` replaced (what its `original` runs), or None without that patch."""
    info = module.__dict__.get(_key(slot))
    return info.get("original") if info is not None else None


# --- re-stored parameters ----------------------------------------------------------------------------------------
RESTORED_ATTR = "_lorakit_restored"  # on a Parameter whose storage a fast path changed (values kept); its value is
# the fast path's own mark


def pack_parameters(model: nn.Module) -> int:
    """Give every parameter whose storage a fast path changed (fast/wide.py: spare columns) contiguous storage of
    its own again, values unchanged; returns how many. Called when the fast paths or the adapters go (unoptimize,
    unload), so that what stays is a plain model (safetensors' save_file takes contiguous tensors only)."""
    count = 0
    for p in model.parameters():
        if p.__dict__.pop(RESTORED_ATTR, None) is not None:
            p.data = p.data.contiguous()
            count += 1
    return count
