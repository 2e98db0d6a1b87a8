"""modules_to_save: a full trainable copy of a module (e.g. a classifier head) per adapter.

The copy of the first active adapter that has one replaces the original in forward; the original stays
untouched for the base model and the other adapters. Saved in PEFT's names (`<path>.weight`).
"""

from __future__ import annotations

import copy

from torch import nn

from .adapted import KeepsBaseKeys


class SavedModule(KeepsBaseKeys):
    """modules_to_save: the original module plus one trainable copy per adapter; the first active adapter's copy
    runs."""

    inner_name = "original_module"

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False

    def add_copy(self, name: str) -> nn.Module:
        """A trainable deep copy of the original module for adapter `name`."""
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone
        return clone

    def current(self) -> nn.Module:
        """The module that runs: the first active adapter's copy, else the original."""
        if not self.disabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        """Run the current module."""
        return self.current()(*args, **kwargs)

    def extra_repr(self) -> str:
        """Copies and active set, for print(model)."""
        return f"copies={list(self.copies)}, active={list(self.active)}"
