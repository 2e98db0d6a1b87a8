"""Models loaded through transformers with bitsandbytes 4-bit (`bnb.nn.Linear4bit`): lorakit adapts them as they are.

Nothing here imports bitsandbytes: the layer check looks only at modules already imported (as layers.py does
for transformers' Conv1D). The base layer keeps its own forward (bnb's 4-bit matmul); lorakit reads the weight
through bnb's own dequantization (as PEFT does, so DoRA norms and merges see the same numbers), and counts
`Params4bit` per weight value in trainable_report, as PEFT does.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..core.adapted import WEIGHT_SOURCES
from ..errors import ConfigError
from ..core.layers import EXTRA_LAYER_OPS
from .nf4 import NF4Tensor
from .weight import QuantizedWeight, QuantLinearOps


def _bnb():
    return sys.modules.get("bitsandbytes")


def _count_like_peft(param) -> int:
    """PEFT's get_nb_trainable_parameters: a Params4bit counts numel · 2 · bytes per storage element."""
    return 2 * param.element_size()


def is_bnb_linear4bit(layer: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit layer (checked by class name: bitsandbytes need not be importable)."""
    bnb = _bnb()
    if bnb is None or not isinstance(layer, bnb.nn.Linear4bit):
        return False
    mark_params4bit()
    return True


def mark_params4bit() -> None:
    """Give bnb's Params4bit the `lorakit_numel_factor` that model.count_parameters reads (idempotent)."""
    bnb = _bnb()
    if bnb is not None and not hasattr(bnb.nn.Params4bit, "lorakit_numel_factor"):
        bnb.nn.Params4bit.lorakit_numel_factor = property(_count_like_peft)


def plain_layout(layer: nn.Module) -> nn.Parameter:
    """The layer's Params4bit in bnb's standard byte layout. On a CPU with AVX512-bf16, bnb repacks the weight in
    place for its own kernel at the first eval-mode forward (and un-nests the absmax); reading those bytes with
    dequantize_4bit gives garbage (PEFT's dequantize_bnb_weight does just that). Undo it, as bnb's state_dict does;
    bnb repacks again at its next eval forward."""
    w = layer.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        w.data, w.quant_state = _bnb().functional._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    return w


def bnb_dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight as bnb's own forward sees it, in the dtype it was quantized from (quant_state.dtype)."""
    w = plain_layout(layer)
    return _bnb().functional.dequantize_4bit(w.data, w.quant_state)


def nf4_from_bnb(layer: nn.Module) -> NF4Tensor:
    """The layer's weight as an NF4Tensor, without requantizing (both use bitsandbytes' byte layout)."""
    w = plain_layout(layer)
    qs = w.quant_state
    if qs is None or qs.quant_type != "nf4":
        raise ConfigError(f"only NF4 bitsandbytes weights convert to lorakit's NF4, got {getattr(qs, 'quant_type', None)}")
    q = NF4Tensor(w.data.view(torch.uint8).reshape(-1), qs.absmax, tuple(qs.shape), qs.blocksize, qs.dtype)
    if qs.nested:
        q.absmax2, q.code2, q.offset = qs.state2.absmax, qs.state2.code, qs.offset.reshape(())
    return q


class BnbWeight(QuantizedWeight):
    """Weight source of a bnb Linear4bit: dequantize with bnb; requantize (on request only) as PEFT does."""

    write_dense = None  # no dequantisation into a caller's buffer: the fused linear takes the reference path

    def get(self) -> torch.Tensor:
        """The dense weight, dequantised from the layer's 4-bit storage."""
        return bnb_dense_weight(self.layer)

    @torch.no_grad()
    def requantize(self, w: torch.Tensor) -> None:
        """Quantise `w` back into the layer's 4-bit storage (merge_requantized)."""
        old = plain_layout(self.layer)
        kwargs = {k: v for k, v in old.__dict__.items() if k != "data" and not k.startswith("_")}  # as PEFT does
        kwargs.update(requires_grad=False, bnb_quantized=False)
        dtype = old.quant_state.dtype
        new = _bnb().nn.Params4bit(w.to("cpu", dtype), **kwargs).to(old.device)
        self.layer.weight = new


def register() -> None:
    """Teach lorakit bitsandbytes' Linear4bit: its LayerOps and its weight source."""
    if not any(matches is is_bnb_linear4bit for matches, _ in EXTRA_LAYER_OPS):
        EXTRA_LAYER_OPS.insert(0, (is_bnb_linear4bit, QuantLinearOps))
    if not any(matches is is_bnb_linear4bit for matches, _ in WEIGHT_SOURCES):
        WEIGHT_SOURCES.insert(0, (is_bnb_linear4bit, BnbWeight))
    mark_params4bit()
