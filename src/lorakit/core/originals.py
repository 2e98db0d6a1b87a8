"""Base parameters an adapter overwrote (a loaded or hot-swapped bias), remembered so that removing the adapter
puts the base values back.

The record lives in the model's AdapterState (core/api.py) as `overwritten`: a list of
[base parameter, its value before, names of the adapters that wrote it].
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def keep_originals(model: nn.Module, name: str, params: Sequence[nn.Parameter]) -> None:
    """Remember the values of base parameters that adapter `name` is about to overwrite (a loaded bias), so
    that delete_adapter (once no remaining adapter wrote them) and unload(merge=False) put them back. The model
    must hold adapter `name` already (its bookkeeping is where the values are kept)."""
    from .api import state  # api imports this module for restore_originals

    st = state(model)
    for p in params:
        entry = next((e for e in st.overwritten if e[0] is p), None)
        if entry is None:
            st.overwritten.append([p, p.detach().clone(), {name}])
        else:
            entry[2].add(name)


def restore_originals(st, gone: set[str]) -> None:
    """Put back the base values that only adapters in `gone` had overwritten (`st`: the model's AdapterState)."""
    kept = []
    for entry in st.overwritten:
        entry[2] -= gone
        if entry[2]:
            kept.append(entry)
        else:
            with torch.no_grad():
                entry[0].copy_(entry[1])
    st.overwritten = kept
