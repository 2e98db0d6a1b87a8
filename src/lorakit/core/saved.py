"""modules_to_save: a full trainable copy of a module (e.g. a classifier head) per adapter.

The copy of the first active adapter that has one replaces the original in forward; the original stays
untouched for the base model and the other adapters. Saved in PEFT's names (`<path>.weight`).
"""

from __future__ import annotations

import copy

from torch import nn

from .adapted import KeepsBaseKeys


class SavedModule(KeepsBaseKeys):
    inner_name = "original_module"

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False

    def add_copy(self, name: str) -> nn.Module:
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone
        return clone

    def current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"copies={list(self.copies)}, active={list(self.active)}"
