"""The LyCORIS parts LoHa and LoKr share (PEFT's LycorisConfig and LycorisLayer): config fields, rank and
module dropout, the factor init and the supported layer types."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..core.config import BOOLEAN, MAX_RANK, AdapterConfig, Check, integer, number, pattern_value
from ..core.delta import Delta
from ..core.layers import LayerOps
from ..errors import ConfigError, TargetError


@dataclass
class LycorisConfig(AdapterConfig):
    """Fields LoHa and LoKr share (PEFT's LycorisConfig)."""

    # A run's generic options under this config's names (train/adapter_options.py): PEFT calls it alpha here.
    run_option_fields: ClassVar[dict[str, str]] = {"lora_alpha": "alpha"}
    field_checks: ClassVar[dict[str, Check]] = {
        "r": integer(1, MAX_RANK),
        "alpha": number(),
        "rank_dropout": number(0, 1, open_high=True),
        "module_dropout": number(0, 1, open_high=True),
        "use_effective_conv2d": BOOLEAN,
    }

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
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern needs layers_to_transform")

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)


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
