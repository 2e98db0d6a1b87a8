"""Training forwards without a host-device synchronisation in transformers' mask code.

With no attention mask and no key/value cache, transformers (5.x) checks a forward's position_ids for packed
sequences: `masking_utils.find_packed_sequence_indices` reads a device tensor back to the host, and the device then
idles until the host has queued the forward's kernels again. The causal-LM training forward that lorakit runs itself
(families.causal_lm_forward) passes the default positions 0..T-1, marked as such; the wrapper installed here answers
"not packed" for marked positions (or views of them) without reading them, and calls transformers' own function for
anything else.
"""

from __future__ import annotations

import torch

MARK = "_lorakit_default_positions"


def default_positions(length: int, device: torch.device) -> torch.Tensor:
    """Positions 0..length-1 as [1, length] int64, marked as the default (never packed)."""
    pos = torch.arange(length, device=device)
    setattr(pos, MARK, True)  # on the base: every view of it (unsqueeze, transformers' expand) has it as _base
    return pos.unsqueeze(0)


def _marked(t) -> bool:
    base = t._base if isinstance(t, torch.Tensor) else None  # views of views share one root _base
    return isinstance(base, torch.Tensor) and base.__dict__.get(MARK, False)


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
        if _marked(position_ids):
            return None
        return original(position_ids, *args, **kwargs)

    find_packed_sequence_indices.lorakit_original = original
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
