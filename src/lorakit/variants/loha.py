"""LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/r, a Hadamard product of two rank-r matrices (FedPara).

`LoHaConfig` has PEFT's field names (note `alpha`, not lora_alpha). Tensors in PEFT's names and shapes:
hada_w1_a [out, r], hada_w1_b [r, in·k], hada_w2_a [out, r], hada_w2_b [r, in·k]; with
use_effective_conv2d on a k>1 convolution (CP form): hada_t1/t2 [r, r, kh, kw], hada_w*_a [r, out],
hada_w*_b [r, in]. Linear, Conv1d and Conv2d, as in PEFT.

PEFT materialises ΔW on every forward. The Hadamard product is a rank-r² matrix
    ΔW = U·V,  U = w1a ⊙ᵣ w2a [out, r²] (row-wise Kronecker), V = w1b ⊙꜀ w2b [r², in·k],
so when r²·(in·k + out) < out·in·k, lorakit runs it as a rank-r² LoRA on the activations instead.
Both paths are held to the same result by tests; `delta_weight` is the reference math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.layers import LayerOps
from ..core.registry import Variant
from ..core.config import BOOLEAN, Check
from .lycoris import LycorisConfig, LycorisDelta, check_lycoris_layer, kaiming_


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/r. Field names and defaults as in PEFT."""

    peft_type: ClassVar[str] = "LOHA"
    unsupported_peft_fields: ClassVar[dict[str, Any]] = {}
    field_checks: ClassVar[dict[str, Check]] = {"init_weights": BOOLEAN}

    init_weights: bool = True
    """True: hada_w2_b zero (a no-op at step 0); False: all factors random (for tests)."""


class LoHaDelta(LycorisDelta):
    """LoHa on one layer: ΔW = (w1a·w1b) ⊙ (w2a·w2b)·alpha/r (CP form for k>1 convolutions)."""

    def __init__(self, ops: LayerOps, config: LoHaConfig, module_name: str):
        check_lycoris_layer(ops, "LoHa")
        super().__init__(ops, config, module_name)
        r, out, k = self.r, ops.out_features, ops.kernel
        self.cp = bool(config.use_effective_conv2d) and ops.kind == "conv" and math.prod(k) > 1
        factory = {"device": ops.device, "dtype": ops.dtype}
        if self.cp:  # CP form; Conv1d kernels get a trailing 1 as in PEFT
            kk = k if len(k) == 2 else (k[0], 1)
            for i in (1, 2):
                setattr(self, f"hada_t{i}", nn.Parameter(torch.empty(r, r, *kk, **factory)))
                setattr(self, f"hada_w{i}_a", nn.Parameter(torch.empty(r, out, **factory)))
                setattr(self, f"hada_w{i}_b", nn.Parameter(torch.empty(r, ops.in_features, **factory)))
        else:
            fan_in = ops.in_features * math.prod(k)
            for i in (1, 2):
                setattr(self, f"hada_w{i}_a", nn.Parameter(torch.empty(out, r, **factory)))
                setattr(self, f"hada_w{i}_b", nn.Parameter(torch.empty(r, fan_in, **factory)))
        self._init(config.init_weights)
        # Run on activations when the rank-r² form is cheaper than materialising ΔW (see module doc).
        fan_in = ops.in_features * math.prod(k)
        cheaper = r * r * (fan_in + out) < out * fan_in
        self.path = "activations" if (cheaper and not self.cp) else "weight"

    @torch.no_grad()
    def _init(self, init_weights: bool) -> None:
        kaiming_(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a)
        if init_weights:
            nn.init.zeros_(self.hada_w2_b)  # one zero factor: ΔW = 0 at step 0
        else:
            kaiming_(self.hada_w2_b)
        if self.cp:
            kaiming_(self.hada_t1, self.hada_t2)

    def weight_c(self) -> torch.Tensor:
        if self.cp:  # PEFT's make_weight_cp: [r, r, kh, kw] × [r, in] × [r, out] → [out, in, kh, kw]
            w1 = torch.einsum("i j k l, j r, i p -> p r k l", self.hada_t1, self.hada_w1_b, self.hada_w1_a)
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", self.hada_t2, self.hada_w2_b, self.hada_w2_a)
        else:
            w1, w2 = self.hada_w1_a @ self.hada_w1_b, self.hada_w2_a @ self.hada_w2_b  # [out, in·k]
        w = (w1 * w2) * self.scaling
        return w.reshape(self.ops.out_features, self.ops.in_features, *self.ops.kernel)

    def rank_r2_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW/s = U·V with U [out, r²] = w1a ⊙ᵣ w2a and V [r², in·k] = w1b ⊙꜀ w2b."""
        u = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).flatten(1)
        v = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).flatten(0, 1)
        return u, v

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer) -> torch.Tensor:
        if self.skipped():
            return y
        drop = self.row_drop(y.device, self.hada_w1_a.dtype)
        if self.path == "weight":
            return y + self.weight_forward(x, drop).to(y.dtype)
        u, v = self.rank_r2_factors()
        if drop is not None:
            u = u * drop[:, None]
        ops, r2 = self.ops, v.shape[0]
        h = ops.down(x.to(v.dtype), v.view(r2, ops.in_features, *ops.kernel)) * self.scaling  # [..., r²]
        return ops.add_up(y, h.to(y.dtype), u.view(ops.out_features, r2, *(1,) * len(ops.kernel)).to(y.dtype))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"] + (["hada_t1", "hada_t2"] if self.cp else [])
        return {n: getattr(self, n) for n in names}

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, path={self.path}" + (", cp" if self.cp else "")


VARIANT = Variant("LOHA", LoHaConfig, LoHaDelta)
