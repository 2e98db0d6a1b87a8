"""Training forwards without a host-device synchronisation in transformers' mask code.

With no attention mask and no key/value cache, transformers (5.x) checks a forward's position_ids for packed
sequences: `masking_utils.find_packed_sequence_indices` reads a device tensor back to the host, and the device then
idles until the host has queued the forward's kernels again. Where the key/value cache is on (transformers' default
config without gradient checkpointing), the check is skipped. lorakit's fused-loss training forward
(families.causal_lm_forward) turns that cache off when the caller did not ask for one (it copied every layer's keys
and values), and runs the model inside `no_packed_check()` when the caller passed no position_ids and no attention
mask either, so the check answers "not packed" as the cache made it do, without reading the device. Positions the
model computes itself are never packed, and it still computes them (M-RoPE models included). Any other call gets
transformers' own check.
"""

from __future__ import annotations

import torch

from .thread_scope import ThreadScope

_SCOPE = ThreadScope()


def no_packed_check():
    """Within (a context manager): transformers' packed-sequence check answers "not packed" (this thread, eager
    mode only)."""
    return _SCOPE.entered()


def install() -> None:
    """Wrap transformers' packed-sequence check once (a no-op where transformers has none)."""
    try:
        from transformers import masking_utils
    except ImportError:
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None or getattr(original, "lorakit_original", None) is not None:
        return

    def find_packed_sequence_indices(position_ids, *args, **kwargs):
        if not torch.compiler.is_compiling() and _SCOPE.active():
            return None
        return original(position_ids, *args, **kwargs)

    find_packed_sequence_indices.lorakit_original = original
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
