"""LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/r, a Hadamard product of two rank-r matrices (FedPara).

`LoHaConfig` has PEFT's field names (note `alpha`, not lora_alpha). Tensors in PEFT's names and shapes:
hada_w1_a [out, r], hada_w1_b [r, in·k], hada_w2_a [out, r], hada_w2_b [r, in·k]; with
use_effective_conv2d on a k>1 convolution (CP form): hada_t1/t2 [r, r, kh, kw], hada_w*_a [r, out],
hada_w*_b [r, in]. Linear, Conv1d and Conv2d, as in PEFT.

PEFT materialises ΔW on every forward. The Hadamard product is a rank-r² matrix
    ΔW = U·V,  U = w1a ⊙ᵣ w2a [out, r²] (row-wise Kronecker), V = w1b ⊙꜀ w2b [r², in·k],
so when r²·(in·k + out) < out·in·k, lorakit runs it as a rank-r² LoRA on the activations instead.
Both paths are held to the same result by tests; `delta_weight` is the reference math.

The shared LyCORIS parts (config fields, rank and module dropout) live here and LoKr reuses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .config import AdapterConfig, pattern_key
from .delta import Delta
from .errors import ConfigError, TargetError
from .layers import LayerOps
from .registry import register


@dataclass
class LycorisConfig(AdapterConfig):
    """Fields LoHa and LoKr share (PEFT's LycorisConfig)."""

    r: int = 8
    """Rank of each factor pair."""
    alpha: float = 8
    """Scale numerator: ΔW is multiplied by alpha / r."""
    rank_dropout: float = 0.0
    """Training only: each output row of ΔW is dropped with this probability."""
    module_dropout: float = 0.0
    """Training only: the whole adapter of a layer is skipped with this probability."""
    use_effective_conv2d: bool = False
    """CP ("Proposition 3", FedPara) decomposition for Conv1d/Conv2d with a kernel larger than 1."""

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name, r in self.rank_pattern.items():
            if not isinstance(r, int) or r <= 0:
                raise ConfigError(f"rank_pattern[{name!r}] must be a positive integer, got {r!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern needs layers_to_transform")

    def rank_for(self, module_name: str) -> int:
        key = pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.alpha


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/r. Field names and defaults as in PEFT."""

    peft_type: ClassVar[str] = "LOHA"
    unsupported_peft_fields: ClassVar[dict[str, Any]] = {}

    init_weights: bool = True
    """True: hada_w2_b zero (a no-op at step 0); False: all factors random (for tests)."""

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True or False, got {self.init_weights!r}")


def kaiming_(*params: torch.Tensor) -> None:
    """PEFT's (and nn.Linear's) default init for LyCORIS factors."""
    for p in params:
        nn.init.kaiming_uniform_(p, a=math.sqrt(5))


def check_lycoris_layer(ops: LayerOps, variant: str) -> None:
    """PEFT's LyCORIS adapters support nn.Linear, nn.Conv1d and nn.Conv2d only."""
    if not (ops.kind == "linear" and not ops.transposed) and not (ops.kind == "conv" and len(ops.kernel) in (1, 2)):
        raise TargetError(f"{variant} supports Linear, Conv1d and Conv2d layers (as PEFT does), "
                          f"not {type(ops.layer).__name__}")


class LycorisDelta(Delta):
    """Module dropout and rank (output-row) dropout, shared by LoHa and LoKr."""

    rank_dropout_scale = True  # LoHa always rescales the kept rows; LoKr makes it an option

    def __init__(self, ops: LayerOps, config: LycorisConfig, module_name: str):
        super().__init__(ops, config, module_name)
        self.r = config.rank_for(module_name)
        self.alpha = config.alpha_for(module_name)
        self.scaling = self.alpha / self.r
        self.rank_dropout = float(config.rank_dropout)
        self.module_dropout = float(config.module_dropout)

    def skipped(self) -> bool:
        """Module dropout: in training the adapter is left out with probability module_dropout."""
        return self.training and self.module_dropout > 0 and bool(torch.rand(1) <= self.module_dropout)

    def row_drop(self, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Rank dropout: a 0/1 multiplier per output row of ΔW [out] (rescaled to mean 1), or None."""
        if not (self.training and self.rank_dropout > 0):
            return None
        drop = (torch.rand(self.ops.out_features, device=device) > self.rank_dropout).to(dtype)
        if self.rank_dropout_scale:
            drop = drop / drop.mean().clamp_min(1e-12)  # PEFT divides by the mean (NaN if all rows drop)
        return drop

    def weight_forward(self, x: torch.Tensor, drop: Optional[torch.Tensor]) -> torch.Tensor:
        """PEFT's way: materialise ΔW (canonical layout) and apply it with the base layer's own op."""
        w = self.weight_c()
        if drop is not None:
            w = w * drop.view(-1, *(1,) * (w.dim() - 1))
        return self.ops.down(x.to(w.dtype), w)

    def weight_c(self) -> torch.Tensor:
        """ΔW in the canonical layout [out, in, *k], in the parameters' dtype, differentiable."""
        raise NotImplementedError

    def delta_weight(self, layer) -> torch.Tensor:
        with torch.no_grad():
            return self.ops.to_layer_layout(self.weight_c().float())


class LoHaDelta(LycorisDelta):
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


register("LOHA", LoHaConfig, LoHaDelta)
