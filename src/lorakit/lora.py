"""LoRA: ΔW_c = s · B·A, with A [r, in, *k], B [out, r, *1s], s = lora_alpha/r (rsLoRA: lora_alpha/√r).

Reference math, one class for every base layer type (the LayerOps do the per-type part). Tensor names
follow PEFT: lora_A.weight / lora_B.weight, or lora_embedding_A / lora_embedding_B for embeddings.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import LoraConfig
from .delta import Delta
from .layers import LayerOps
from .registry import register


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraDelta(Delta):
    def __init__(self, ops: LayerOps, config: LoraConfig, module_name: str):
        super().__init__(ops, config, module_name)
        self.r = config.rank_for(module_name)
        self.scaling = lora_scaling(config.alpha_for(module_name), self.r, config.use_rslora)
        self.init = config.init_lora_weights
        factory = {"device": ops.device, "dtype": ops.dtype}
        unit = (1,) * len(ops.kernel)
        self.lora_A = nn.Parameter(torch.empty(self.r, ops.in_features, *ops.kernel, **factory))  # [r, in, *k]
        self.lora_B = nn.Parameter(torch.empty(ops.out_features, self.r, *unit, **factory))  # [out, r, *1]
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self._init_factors()

    @torch.no_grad()
    def _init_factors(self) -> None:
        if self.ops.kind == "embedding":  # PEFT's embedding init is the other way round (A zero, B normal)
            nn.init.normal_(self.lora_A) if self.init is False else nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
            return
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if self.init is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))  # not a no-op: for tests and experiments
        else:
            nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def on_attach(self, layer) -> None:
        """PiSSA / OLoRA: start from W's principal directions and leave the residual in the base."""
        if self.init not in ("pissa", "olora") or self.ops.kind != "linear":
            return
        w = self.ops.from_layer_layout(layer.base_weight()).float()  # [out, in]
        if self.init == "pissa":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            sr = s[: self.r] / self.scaling
            a, b = torch.diag(sr.sqrt()) @ vh[: self.r], u[:, : self.r] @ torch.diag(sr.sqrt())
        else:
            q, r_ = torch.linalg.qr(w)
            a, b = r_[: self.r], q[:, : self.r]
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        residual = w - self.scaling * (b @ a)
        layer.set_base_weight(self.ops.to_layer_layout(residual).to(layer.base_weight().dtype))

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer) -> torch.Tensor:
        a, b = self.lora_A, self.lora_B
        h = self.ops.down(self.dropout(x).to(a.dtype) if self.ops.kind != "embedding" else x, a)  # [..., r]
        return self.ops.add_up(y, (h * self.scaling).to(y.dtype), b.to(y.dtype))

    def delta_weight(self, layer) -> torch.Tensor:
        b, a = self.lora_B.float().flatten(1), self.lora_A.float().flatten(1)  # [out, r], [r, in·k]
        w_c = (b @ a).view(self.ops.out_features, self.ops.in_features, *self.ops.kernel) * self.scaling
        return self.ops.to_layer_layout(w_c)

    def low_rank_factors(self):
        """(B [out, r], A [r, in·k], s); None in a subclass whose ΔW is not s·B·A (it overrides delta_weight)."""
        if type(self).delta_weight is not LoraDelta.delta_weight:
            return None
        return self.lora_B.detach().flatten(1), self.lora_A.detach().flatten(1), self.scaling

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        if self.ops.kind == "embedding":
            return {"lora_embedding_A": self.lora_A, "lora_embedding_B": self.lora_B}
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


register("LORA", LoraConfig, LoraDelta)
