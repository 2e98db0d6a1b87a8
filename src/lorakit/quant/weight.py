"""A quantized base is a different weight source, not a different adapted layer.

Two registrations make any adapter work on a 4-bit base with no change to the adapted layer or the deltas:
- `layers.EXTRA_LAYER_OPS`: `QuantLinearOps`, the canonical [out, in] view of a linear whose weight is stored
  packed (shape from in/out_features; adapters in the dtype the weight had before quantization);
- `adapted.WEIGHT_SOURCES`: `QuantizedWeight`, whose get() dequantizes (what DoRA's norm, PiSSA's SVD and
  merging read) and whose set() refuses by default: writing a 4-bit weight requantizes it, and for a typical
  adapter the rounding is as large as the adapter's whole change. `lorakit.dequantize(model)` gives dense
  layers first (then merge/unmerge are exact); `lorakit.merge_requantized(model)` requantizes on request and
  reports the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..core.adapted import WEIGHT_SOURCES
from ..errors import QuantizedBaseError
from ..core.layers import EXTRA_LAYER_OPS, LayerOps
from .dequant import dequantize_nf4_into
from .linear import NF4Linear


class QuantLinearOps(LayerOps):
    """LayerOps of a linear layer with a packed weight: shapes come from in_features / out_features, and adapters
    get the dtype the weight had before quantization, as lorakit gives any layer's adapters its weight's dtype
    (a bf16 model: bf16 adapters, as without quantization; PEFT upcasts adapters to fp32 instead)."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.transposed = False
        self.out_features, self.in_features = layer.out_features, layer.in_features
        self.kernel: tuple[int, ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype adapters are created in (the 4-bit storage is not a float dtype)."""
        return source_dtype(self.layer) or torch.get_default_dtype()


def source_dtype(layer: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the weight before quantization: NF4Linear.source_dtype, or bnb's quant_state.dtype."""
    if isinstance(layer, NF4Linear):
        return layer.source_dtype
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return getattr(state, "original_dtype", None) or getattr(state, "dtype", None)


@dataclass
class Requantization:
    """What requantizing one layer after a merge did, in Frobenius norms over the weight matrix."""

    adapter: float  # ‖W_target − W_before‖: the change the adapter asked for
    rounding: float  # ‖Q(W_target) − W_target‖: the error requantizing added
    kept: float  # ⟨Q(W_target) − W_before, W_target − W_before⟩ / ‖W_target − W_before‖²: share of the change kept
    weight: float = 0.0  # ‖W_target‖, for scale

    @property
    def ratio(self) -> float:
        """rounding / adapter: the requantization error relative to the adapter's change (near 1 or above: 4 bits
        erased most of it)."""
        return self.rounding / self.adapter if self.adapter else float("inf")


_REFUSAL = ("this layer's base weight is 4-bit; writing it (merge, unmerge, PiSSA/OLoRA init) would requantize it, "
            "and rounding to 4 bits erases most of a typical adapter's change. For a merged model call "
            "lorakit.dequantize(model) first: merge / unload(merge=True) then give dense layers in the compute "
            "dtype, exactly. To stay in 4 bits anyway, lorakit.merge_requantized(model) merges, requantizes and "
            "reports the rounding error per layer.")


class QuantizedWeight:
    """Weight source of a quantized base layer (NF4Linear here; bitsandbytes' Linear4bit in bnb.py)."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.allow_requantize = False  # set by merge_requantized only
        self.last_written: Optional[torch.Tensor] = None  # fp32 target of the last set(), for its report

    def get(self) -> torch.Tensor:
        """The dense weight in the compute dtype, dequantised."""
        return self.layer.dense_weight()

    @property
    def dense_shape(self) -> tuple[int, int]:
        """(out, in) of the dense weight."""
        return self.layer.out_features, self.layer.in_features

    @property
    def dense_dtype(self) -> torch.dtype:
        """The dtype get() and write_dense give (the layer's compute dtype)."""
        return self.layer.compute_dtype

    def write_dense(self, out: torch.Tensor) -> torch.Tensor:
        """The dense weight written into `out` ([out, in], contiguous): a fused path's reused buffer, so no dense
        copy is allocated per call."""
        return dequantize_nf4_into(self.layer.nf4(), out)

    def requantize(self, w: torch.Tensor) -> None:
        """Quantise `w` back into the 4-bit storage."""
        self.layer.requantize(w)

    def set(self, w: torch.Tensor) -> None:
        """Requantize `w` into 4 bits, only inside merge_requantized; anywhere else QuantizedBaseError (4 bits would erase
        most of the adapter)."""
        if not self.allow_requantize:
            raise QuantizedBaseError(_REFUSAL)
        self.last_written = w.detach().float()
        self.requantize(w)


def is_nf4_linear(layer: nn.Module) -> bool:
    """True for lorakit's own NF4Linear."""
    return isinstance(layer, NF4Linear)


def register() -> None:
    """Put NF4Linear into lorakit's layer and weight-source registries (idempotent)."""
    if not any(matches is is_nf4_linear for matches, _ in EXTRA_LAYER_OPS):
        EXTRA_LAYER_OPS.append((is_nf4_linear, QuantLinearOps))
    if not any(matches is is_nf4_linear for matches, _ in WEIGHT_SOURCES):
        WEIGHT_SOURCES.append((is_nf4_linear, QuantizedWeight))
