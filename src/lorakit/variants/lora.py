"""LoRA: ΔW_c = s · B·A, with A [r, in, *k], B [out, r, *1s], s = lora_alpha/r (rsLoRA: lora_alpha/√r).

Reference math, one class for every base layer type (the LayerOps do the per-type part). Tensor names
follow PEFT: lora_A.weight / lora_B.weight, or lora_embedding_A / lora_embedding_B for embeddings.
"""

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn

from ..core.config import (BOOLEAN, MAX_RANK, TEXT, AdapterConfig, Check, integer, list_of, number, one_of, optional,
                           pattern_value, shown)
from ..core.delta import Delta
from ..core.layers import LayerOps
from ..core.registry import Variant
from ..errors import ConfigError, ShapeMismatchError


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA: ΔW = B·A · lora_alpha/r (rsLoRA: lora_alpha/√r). Field names and defaults as in PEFT."""

    peft_type: ClassVar[str] = "LORA"
    unsupported_peft_fields: ClassVar[dict[str, Any]] = {
        "alora_invocation_tokens": None, "arrow_config": None, "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "kasa_config": None, "layer_replication": None,
        "loftq_config": {}, "lora_bias": False, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "monteclora_config": None, "qalora_group_size": 16,
        "trainable_token_indices": None, "use_bdlora": None, "use_qalora": False,
        "velora_config": None,
    }
    field_checks: ClassVar[dict[str, Check]] = {
        "r": integer(1, MAX_RANK),
        "lora_alpha": number(),
        "lora_dropout": number(0, 1, open_high=True),
        "use_rslora": BOOLEAN,
        "init_lora_weights": BOOLEAN | one_of("gaussian", "pissa", "olora"),
        "bias": one_of("none", "all", "lora_only"),
        "fan_in_fan_out": BOOLEAN,
        "use_dora": BOOLEAN,
        "target_parameters": optional(list_of(TEXT, "parameter names")),
    }

    r: int = 8
    """Rank of the update."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (or / √r with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input (the base path is never dropped)."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / √r."""
    init_lora_weights: Union[bool, str] = True
    """True: Kaiming-uniform A, zero B (a no-op at step 0); "gaussian"; "pissa" (SVD of W); "olora" (QR of W);
    False: random B too (for tests)."""
    bias: str = "none"
    """Which biases train with the adapter: "none", "all", or "lora_only" (biases of adapted layers)."""
    fan_in_fan_out: bool = False
    """Set for layers storing weight as [in, out] (GPT-2's Conv1D); lorakit detects those layers itself."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    target_parameters: Optional[list[str]] = None
    """Parameters to adapt directly, by full name or `.`-suffix (e.g. ["experts.gate_up_proj", "experts.down_proj"]
    for a MoE's fused 3-D expert weights); set target_modules=[] to adapt nothing else (PEFT's rules)."""

    def validate(self) -> None:
        """PEFT's limits for parameter targets: no dropout, DoRA, fan_in_fan_out or data-dependent init."""
        if not self.target_parameters:
            return
        refused = {"lora_dropout": self.lora_dropout != 0, "use_dora": self.use_dora,
                   "fan_in_fan_out": self.fan_in_fan_out,
                   "init_lora_weights": self.init_lora_weights in ("pissa", "olora")}
        bad = [f"{k}={shown(getattr(self, k))}" for k, on in refused.items() if on]
        if bad:
            raise ConfigError(f"{type(self).__name__} field 'target_parameters' cannot be combined with "
                              f"{', '.join(bad)} (a parameter's update does not see the activations; as in PEFT)")

    @property
    def parameter_targets(self) -> list[str]:
        """target_parameters as a list ([] when unset)."""
        return list(self.target_parameters or [])

    @property
    def variant(self) -> str:
        return "DORA" if self.use_dora else "LORA"

    @property
    def bias_mode(self) -> str:
        """PEFT's bias option in the core's terms ("lora_only": the biases of the adapted layers)."""
        return "adapted" if self.bias == "lora_only" else self.bias

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """LoRA's scale s: alpha / r, or alpha / √r with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraDelta(Delta):
    """ΔW = s·B·A. Answers the whole low-rank protocol; a subclass that overrides forward or delta_weight
    (DoRA) is not s·B·A and reports no factors (`factors_writable` False, see __init_subclass__)."""

    factors_writable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.forward is not LoraDelta.forward or cls.delta_weight is not LoraDelta.delta_weight:
            cls.factors_writable = False

    def __init__(self, ops: LayerOps, config: LoraConfig, module_name: str):
        super().__init__(ops, config, module_name)
        if not ops.single_matrix:  # a stack of experts' ΔW_e is no single product s·B·A
            self.factors_writable = False
        self._linear = self.factors_writable and ops.kind == "linear"  # linear_factors applies
        self.r = config.rank_for(module_name)
        self.scaling = lora_scaling(config.alpha_for(module_name), self.r, config.use_rslora)
        self.init = config.init_lora_weights
        factory = {"device": ops.device, "dtype": ops.dtype}
        a_shape, b_shape = ops.factor_shapes(self.r)  # [r, in, *k], [out, r, *1] (experts: [E·r, in], [out, E·r])
        self.lora_A = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **factory))
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
        h = self.ops.down(self.ops.adapter_input(x, self.dropout, a.dtype), a)  # [..., r]
        return self.ops.add_up(y, (h * self.scaling).to(y.dtype), b.to(y.dtype))

    def delta_weight(self, layer) -> torch.Tensor:
        return self.ops.to_layer_layout(self.ops.factor_product(self.lora_B.float(), self.lora_A.float()) * self.scaling)

    # --- the low-rank protocol (core/delta.py) -------------------------------------------------------
    def low_rank_factors(self):
        """(B [out, r], A [r, in·k], s); None in a subclass whose ΔW is not s·B·A."""
        if not self.factors_writable:
            return None
        return self.lora_B.detach().flatten(1), self.lora_A.detach().flatten(1), self.scaling

    def linear_factors(self):
        """(lora_A [r, in], lora_B [out, r], s, dropout p) on a linear layer. Runs per forward of the fast
        paths: plain dict lookups, no nn.Module.__getattr__."""
        d = self.__dict__
        if not d["_linear"]:
            return None
        p = d["_parameters"]
        drop = d["_modules"]["dropout"]
        if type(drop) is nn.Dropout:
            return p["lora_A"], p["lora_B"], d["scaling"], drop.p
        if type(drop) is nn.Identity:
            return p["lora_A"], p["lora_B"], d["scaling"], 0.0
        return None  # another input transform: not the protocol's form

    @torch.no_grad()
    def set_low_rank_factors(self, b: torch.Tensor, a: torch.Tensor) -> None:
        """lora_B ← [b, 0], lora_A ← [a; 0] (b [out, k], a [k, in·k], k ≤ r), written with copy_."""
        if not self.factors_writable:
            super().set_low_rank_factors(b, a)
        k, fan_in = b.shape[1], self.lora_A[0].numel()
        if k > self.r or tuple(a.shape) != (k, fan_in) or b.shape[0] != self.lora_B.shape[0]:
            raise ShapeMismatchError(f"{self.module_name}: factors {tuple(b.shape)} · {tuple(a.shape)} do not fit "
                                     f"rank {self.r} and ΔW [{self.lora_B.shape[0]}, {fan_in}]")
        full_a = a.new_zeros(self.r, fan_in)
        full_a[:k] = a
        full_b = b.new_zeros(b.shape[0], self.r)
        full_b[:, :k] = b
        self.lora_A.copy_(full_a.view(self.lora_A.shape))
        self.lora_B.copy_(full_b.view(self.lora_B.shape))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        if self.ops.kind == "embedding":
            return {"lora_embedding_A": self.lora_A, "lora_embedding_B": self.lora_B}
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def factored_config(r: int, source: Optional[AdapterConfig] = None, **common: Any) -> LoraConfig:
    """A LoRA config of rank r for factors written with set_low_rank_factors (Variant.factored_config).

    source: a plain LoRA config is kept (alpha, rsLoRA, alpha_pattern: the scale follows the new rank as PEFT
    computes it) with r and `common` changed. Otherwise lora_alpha = r (s = 1) and `common`'s fields; another
    variant's source lends its bias mode (config.bias_mode)."""
    if isinstance(source, LoraConfig) and source.variant == "LORA":
        return source.with_updates(r=r, **common)
    mode = source.bias_mode if source is not None else "none"
    return LoraConfig(r=r, lora_alpha=r, bias="lora_only" if mode == "adapted" else mode, **common)


VARIANT = Variant("LORA", LoraConfig, LoraDelta, factored_config=factored_config)
