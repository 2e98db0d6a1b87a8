"""The weight-delta protocol: what every variant (LoRA, DoRA, LoHa, LoKr, AdaLoRA) implements.

A `Delta` is one adapter's change to one base layer. The adapted layer only ever calls the methods
below, so a variant is one file that subclasses Delta and registers itself (see registry.py).
The base weight reaches a delta only through `layer.base_weight()` / `layer.set_base_weight()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from .config import AdapterConfig
from .layers import LayerOps

if TYPE_CHECKING:
    from .adapted import AdaptedLayer


class Delta(nn.Module):
    def __init__(self, ops: LayerOps, config: AdapterConfig, module_name: str):
        super().__init__()
        self.ops = ops
        self.module_name = module_name

    # --- the math -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor, layer: "AdaptedLayer") -> torch.Tensor:
        """x: the layer's input; y: the output so far. Returns y with this adapter applied."""
        raise NotImplementedError

    def delta_weight(self, layer: "AdaptedLayer") -> torch.Tensor:
        """ΔW in the base weight's layout, in float32 (merging in bf16 adds it in fp32 first)."""
        raise NotImplementedError

    # --- merging: W' = W + ΔW by default; variants with a non-additive form override both ----------
    @torch.no_grad()
    def merge(self, layer: "AdaptedLayer") -> None:
        w = layer.base_weight()
        layer.set_base_weight((w.float() + self.delta_weight(layer)).to(w.dtype))

    @torch.no_grad()
    def unmerge(self, layer: "AdaptedLayer") -> None:
        w = layer.base_weight()
        layer.set_base_weight((w.float() - self.delta_weight(layer)).to(w.dtype))

    # --- state in PEFT's names --------------------------------------------------------------------
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """{PEFT key suffix (e.g. "lora_A.weight"): parameter}; the suffix follows the module path."""
        raise NotImplementedError

    def peft_tensors_for_save(self) -> dict[str, torch.Tensor]:
        """What save_adapter writes; the same as peft_tensors() unless the variant drops state at save
        time (AdaLoRA leaves out its pruned ranks, as PEFT does)."""
        return self.peft_tensors()

    @torch.no_grad()
    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy already-validated tensors (same keys and shapes as peft_tensors()) into this delta."""
        for key, param in self.peft_tensors().items():
            param.copy_(tensors[key])

    def low_rank_factors(self) -> Optional[tuple[torch.Tensor, torch.Tensor, float]]:
        """(B [out, r], A [r, in·k], s) with canonical ΔW_c = s·B·A (flattened to [out, in·k]), when ΔW
        is exactly that product; None otherwise. Lets analysis take ΔW's SVD from the factors."""
        return None

    def regularizer(self) -> Optional[torch.Tensor]:
        """An extra training loss term for this delta (AdaLoRA's orthogonality), or None."""
        return None

    def on_attach(self, layer: "AdaptedLayer") -> None:
        """Called once when a freshly initialised delta joins its layer (data-dependent inits use it)."""
