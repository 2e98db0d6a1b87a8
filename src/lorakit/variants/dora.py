"""DoRA, weight-decomposed LoRA: W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row, the norm detached (paper §4.3).

Built by `LoraConfig(use_dora=True)`. Tensors in PEFT's names: LoRA's lora_A / lora_B plus
`lora_magnitude_vector` (no `.weight` suffix), shaped [out] for Linear / Conv1D / Embedding and
[1, out, 1, ...] for ConvNd, exactly as PEFT 0.21 stores it.

As a transform of the layer output y = Wx + b (+ the adapters applied before this one, as in PEFT):
    y' = f ⊙ (y − b + s·BAx) + b = f ⊙ (y + s·BAx) + (1 − f) ⊙ b,     f = m / ‖W + s·BA‖_row
With lora_dropout active in training PEFT feeds the dropped input to W as well:
    y' = y + (f − 1) ⊙ W·drop(x) + f ⊙ s·BA·drop(x)
The row norm never materialises B·A (an [out, in] matrix):
    ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s⟨B_i, (WAᵀ)_i⟩ + s²⟨B_i, (B·AAᵀ)_i⟩,   ‖W_i‖² cached while W is unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoraConfig
from ..core.layers import LayerOps
from .lora import LoraDelta
from ..core.registry import Variant

# id(layer) → its unmerged base weight while `unmerged_base_weight` replays the merged adapters.
_UNMERGED: dict[int, torch.Tensor] = {}


@contextlib.contextmanager
def unmerged_base_weight(layer) -> Iterator[torch.Tensor]:
    """The base weight with the adapters merged so far taken out (PEFT's `_unmerged_base_weight`).

    DoRA's norm is defined on the unmerged W, the weight `forward` sees. Merged adapters are unmerged,
    W is copied, and they are merged again on exit; nested calls during that re-merge reuse the copy.
    """
    key = id(layer)
    if key in _UNMERGED:
        yield _UNMERGED[key]
        return
    merged = list(layer.merged)
    if not merged:
        yield layer.base_weight()
        return
    layer.unmerge()
    try:
        _UNMERGED[key] = layer.base_weight().detach().clone()
        yield _UNMERGED[key]
    finally:
        try:
            layer.merge(tuple(merged))
        finally:
            _UNMERGED.pop(key, None)


class DoraDelta(LoraDelta):
    """DoRA on one layer: LoRA's factors plus the magnitude vector m (see the module docstring)."""

    def __init__(self, ops: LayerOps, config: LoraConfig, module_name: str):
        super().__init__(ops, config, module_name)
        # PEFT's shapes: a row vector for linear-like layers, [1, out, 1, ...] for convolutions.
        shape = (1, ops.out_features, *(1,) * len(ops.kernel)) if ops.kind == "conv" else (ops.out_features,)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(shape, device=ops.device, dtype=ops.dtype))
        self.register_buffer("merged_norm", None, persistent=False)  # the norm used by merge, for unmerge
        self._w_sq_cache: tuple = (None, None)  # (key of W, ‖W‖²_row)

    # --- the norm ---------------------------------------------------------------------------------
    def _w_sq_norm(self, w: torch.Tensor) -> torch.Tensor:
        """‖W_i‖² per row, fp32 [out]; recomputed only when W is another tensor or was written in place."""
        key = (w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape))
        if self._w_sq_cache[0] != key:
            self._w_sq_cache = (key, w.float().pow(2).sum(1))
        return self._w_sq_cache[1]

    @torch.no_grad()
    def weight_norm(self, w_c: torch.Tensor) -> torch.Tensor:
        """‖W + s·BA‖ per output row in fp32 [out]; w_c is the canonical base weight [out, in, *k]."""
        w = w_c.flatten(1)  # [out, in·k]
        a = self.lora_A.detach().flatten(1).float()  # [r, in·k]
        b = self.lora_B.detach().flatten(1).float()  # [out, r]
        wa = F.linear(w.float(), a)  # W·Aᵀ [out, r]
        bat = b @ F.linear(a, a)  # B·(A·Aᵀ) [out, r]
        s = self.scaling
        sq = self._w_sq_norm(w) + (2 * s) * (b * wa).sum(1) + (s * s) * (bat * b).sum(1)
        return sq.clamp_min(0).sqrt()

    def _factor(self, w_c: torch.Tensor) -> torch.Tensor:
        """f = m / ‖W + s·BA‖ in the magnitude's shape; gradients reach m only."""
        m = self.lora_magnitude_vector
        return m / self.weight_norm(w_c).view(m.shape).to(m.dtype)

    @torch.no_grad()
    def on_attach(self, layer) -> None:
        super().on_attach(layer)  # PiSSA / OLoRA first, as PEFT initialises DoRA after the factors
        w_c = self.ops.from_layer_layout(layer.base_weight())
        m = self.lora_magnitude_vector
        m.copy_(self.weight_norm(w_c).view(m.shape))

    # --- the math -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor, layer) -> torch.Tensor:
        w_c = self.ops.from_layer_layout(layer.base_weight())
        f = self._factor(w_c)
        a, b = self.lora_A, self.lora_B
        if self.training and isinstance(self.dropout, nn.Dropout) and self.ops.kind != "embedding":
            xd = self.dropout(x)
            base = self.ops.down(xd.to(w_c.dtype), w_c)  # W·drop(x), no bias
            lora = self.ops.up(self.ops.down(xd.to(a.dtype), a), b) * self.scaling
            return y + ((f - 1) * base + f * lora).to(y.dtype)
        h = self.ops.down(x if self.ops.kind == "embedding" else x.to(a.dtype), a) * self.scaling  # [..., r]
        t = self.ops.add_up(y, h.to(y.dtype), b.to(y.dtype))  # y + s·BAx, one GEMM
        f = f.to(y.dtype)
        bias = getattr(layer.base_layer, "bias", None)
        if bias is None:
            return t * f
        return torch.addcmul((1 - f) * bias.view(f.shape).to(y.dtype), t, f)

    def scaled_linear_factors(self, w: torch.Tensor, row_norm=None):
        """((lora_A, lora_B, s, 0.0), m, ‖W + s·BA‖_row) on a linear layer, W = `w` [out, in]: the forward is then
        f ⊙ (y − b + s·BAx) + b, f = m / norm. None with dropout in training, where PEFT's form feeds the dropped
        input to W as well (see the module docstring). The norm by the caller's `row_norm` where it offers one."""
        d = self.__dict__
        if d["ops"].kind != "linear":
            return None
        drop = d["_modules"]["dropout"]
        if type(drop) is not nn.Identity and (type(drop) is not nn.Dropout or d["training"]):
            return None
        p = d["_parameters"]
        a, b, s = p["lora_A"], p["lora_B"], d["scaling"]
        norm = row_norm(w, a, b, s) if row_norm is not None else None
        return (a, b, s, 0.0), p["lora_magnitude_vector"], norm if norm is not None else self.weight_norm(w)

    def _lora_weight(self) -> torch.Tensor:
        """s·BA, canonical [out, in, *k], fp32."""
        b, a = self.lora_B.float().flatten(1), self.lora_A.float().flatten(1)
        return ((b @ a) * self.scaling).view(self.ops.out_features, self.ops.in_features, *self.ops.kernel)

    def _row_view(self, f: torch.Tensor) -> torch.Tensor:
        return f.reshape(-1, *(1,) * (1 + len(self.ops.kernel)))  # broadcasts over canonical [out, in, *k]

    def delta_weight(self, layer) -> torch.Tensor:
        """The effective additive change f ⊙ (W + s·BA) − W for the current base weight (fp32, layer layout)."""
        w_c = self.ops.from_layer_layout(layer.base_weight()).float()
        f = self._row_view(self._factor(w_c).float())
        return self.ops.to_layer_layout(f * (w_c + self._lora_weight()) - w_c)

    # --- merging: W' = f ⊙ (W + s·BA), with f taken on the unmerged W as in forward ------------------
    @torch.no_grad()
    def merge(self, layer) -> None:
        with unmerged_base_weight(layer) as w0:
            norm = self.weight_norm(self.ops.from_layer_layout(w0))
        self.merged_norm = norm
        w = layer.base_weight()
        f = self._row_view(self.lora_magnitude_vector.float().flatten() / norm)
        new = f * (self.ops.from_layer_layout(w).float() + self._lora_weight())
        layer.set_base_weight(self.ops.to_layer_layout(new).to(w.dtype))

    @torch.no_grad()
    def unmerge(self, layer) -> None:
        w = layer.base_weight()
        f = self._row_view(self.lora_magnitude_vector.float().flatten() / self.merged_norm)
        old = self.ops.from_layer_layout(w).float() / f - self._lora_weight()
        layer.set_base_weight(self.ops.to_layer_layout(old).to(w.dtype))
        self.merged_norm = None

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().peft_tensors(), "lora_magnitude_vector": self.lora_magnitude_vector}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dora"


VARIANT = Variant("DORA", LoraConfig, DoraDelta, selector={"use_dora": True})
