"""AdaLoRA: an SVD-shaped update ΔW = B·(A ⊙ E) · scaling/ranknum whose ranks are pruned during training.

Tensors in PEFT's names and shapes: lora_A [r, in·k] (right singular vectors), lora_E [r, 1] (singular
values), lora_B [out, r] (left singular vectors); ranknum = init_r is not saved (PEFT neither). Linear,
transformers' Conv1D and Conv2d, as in PEFT.

Training (`RankAllocator`, PEFT's RankAllocator + update_and_allocate, reached through
`lorakit.training_hooks(model)`): the importance of every entry is |w·∇w|, smoothed by an EMA (beta1) and
multiplied by the EMA of its deviation, its uncertainty (beta2). Each rank's score is its E entry's plus
the means of its A row and B column. The rank budget falls from the initial total to target_r per layer
on a cubic schedule between tinit and total_step − tfinal, every deltaT steps; ranks under the budget's
threshold get E = 0. The orthogonality regulariser is PEFT's: orth_reg_weight · mean over all A and B of
‖AAᵀ − I‖_F and ‖BᵀB − I‖_F.

Saving drops the pruned ranks in PEFT's layout: the config's rank_pattern maps "<module>.lora_E" to
init_r booleans and the tensors keep only the True ranks; loading such a file rebuilds those shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import nn

from .lora import LoraConfig
from ..core.config import BOOLEAN, MAX_RANK, Check, integer, list_of, mapping, number, optional
from ..core.delta import Delta
from ..errors import ConfigError, TargetError
from ..core.layers import LayerOps
from ..core.api import adapted_layers, state
from ..core.registry import Variant


# PEFT's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING (AdaLoraConfig's default_target_modules).
PEFT_ADALORA_DEFAULT_TARGETS: dict[str, Union[list[str], str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

MAX_STEPS = 2**31  # the largest step count of the schedule: far beyond any run, so a larger one is a typo


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA's schedule and regulariser on top of LoRA's fields (r is unused: init_r is the rank)."""

    peft_type: ClassVar[str] = "ADALORA"
    # A run's generic options (train/adapter_options.py): --r is the starting rank; the run's optimizer steps
    # fill the budget schedule's length unless the options set it.
    run_option_fields: ClassVar[dict[str, str]] = {"r": "init_r"}
    total_steps_field: ClassVar[Optional[str]] = "total_step"
    rank_field: ClassVar[str] = "init_r"
    default_target_modules: ClassVar[dict] = PEFT_ADALORA_DEFAULT_TARGETS
    field_checks: ClassVar[dict[str, Check]] = {
        "target_r": integer(1, MAX_RANK),
        "init_r": integer(1, MAX_RANK),
        "tinit": integer(0, MAX_STEPS),
        "tfinal": integer(0, MAX_STEPS),
        "deltaT": integer(1, MAX_STEPS),
        "beta1": number(0, 1, open_low=True, open_high=True),
        "beta2": number(0, 1, open_low=True, open_high=True),
        "orth_reg_weight": number(0),
        "total_step": optional(integer(1, MAX_STEPS)),
        "init_lora_weights": BOOLEAN,
        "rank_pattern": optional(mapping(list_of(BOOLEAN, "booleans"))),
    }

    target_r: int = 8
    """Average rank per adapted layer at the end of the budget schedule."""
    init_r: int = 12
    """Rank every layer starts with."""
    tinit: int = 0
    """Steps of warm-up before any rank is pruned."""
    tfinal: int = 0
    """Steps at the end that train with the final ranks fixed."""
    deltaT: int = 1
    """Steps between two budget allocations."""
    beta1: float = 0.85
    """EMA factor of the sensitivity |w·∇w|."""
    beta2: float = 0.85
    """EMA factor of the sensitivity's uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regulariser on A and B."""
    total_step: Optional[int] = None
    """Total number of training steps (required: the schedule is defined over it)."""
    rank_pattern: Optional[dict] = None
    """Set by the allocator: {"<module path>.lora_E": [bool] * init_r}, the ranks kept."""

    @property
    def variant(self) -> str:
        return "ADALORA"

    def validate(self) -> None:
        if self.use_dora or self.use_rslora or self.alpha_pattern:
            raise ConfigError("AdaLoRA does not use use_dora, use_rslora or alpha_pattern "
                              "(PEFT ignores or refuses them)")
        if self.total_step is None:
            raise ConfigError("AdaLoRA needs total_step > 0: its rank budget is scheduled over it")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError("tinit must be smaller than total_step - tfinal (no budgeting phase is left)")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("layers_to_transform cannot be used when target_modules is a regex string")
        for key, kept in (self.rank_pattern or {}).items():
            if len(kept) != self.init_r:
                raise ConfigError(f"rank_pattern[{key!r}] must be a list of init_r={self.init_r} booleans")

    def kept_ranks(self, module_name: str) -> list[bool]:
        """Which of the init_r ranks this module keeps (all before any pruning)."""
        return list((self.rank_pattern or {}).get(f"{module_name}.lora_E", [True] * self.init_r))

    def rank_for(self, module_name: str) -> int:
        return sum(self.kept_ranks(module_name))


class AdaLoraDelta(Delta):
    """AdaLoRA on one layer: A [r, in·k], E [r, 1], B [out, r]; ΔW = B·(A ⊙ E)·scaling/ranknum."""

    def __init__(self, ops: LayerOps, config: AdaLoraConfig, module_name: str):
        if not (ops.kind == "linear" or (ops.kind == "conv" and len(ops.kernel) == 2)):
            raise TargetError(f"AdaLoRA supports Linear, Conv1D and Conv2d layers (as PEFT does), not "
                              f"{type(ops.layer).__name__}")
        super().__init__(ops, config, module_name)
        self.kept = tuple(config.kept_ranks(module_name))  # positions among init_r of the ranks held here
        self.r = r = sum(self.kept)
        self.ranknum = float(config.init_r)  # PEFT keeps ranknum = init_r after resizing to a rank pattern
        self.scaling = config.lora_alpha if config.lora_alpha > 0 else float(r)
        factory = {"device": ops.device, "dtype": ops.dtype}
        fan_in = ops.in_features * int(torch.Size(ops.kernel).numel())
        self.lora_A = nn.Parameter(torch.empty(r, fan_in, **factory))  # [r, in·k]
        self.lora_E = nn.Parameter(torch.empty(r, 1, **factory))  # [r, 1]
        self.lora_B = nn.Parameter(torch.empty(ops.out_features, r, **factory))  # [out, r]
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=ops.device), persistent=False)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        with torch.no_grad():
            if config.init_lora_weights:  # a no-op at step 0: E = 0
                nn.init.zeros_(self.lora_E)
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
            else:
                for p in (self.lora_A, self.lora_E, self.lora_B):
                    nn.init.normal_(p)

    @property
    def factor(self) -> float:
        """scaling / (ranknum + 1e-5), PEFT's scale of B·(A ⊙ E)."""
        return self.scaling / (self.ranknum + 1e-5)  # PEFT's scaling / (ranknum + 1e-5)

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer) -> torch.Tensor:
        ops, r = self.ops, self.r
        a = (self.lora_A * self.lora_E).view(r, ops.in_features, *ops.kernel)  # [r, in, *k]
        h = ops.down(self.dropout(x).to(a.dtype), a) * self.factor  # [..., r]
        b = self.lora_B.view(ops.out_features, r, *(1,) * len(ops.kernel))
        return ops.add_up(y, h.to(y.dtype), b.to(y.dtype))

    def delta_weight(self, layer) -> torch.Tensor:
        w = (self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float())) * self.factor
        return self.ops.to_layer_layout(w.view(self.ops.out_features, self.ops.in_features, *self.ops.kernel))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}

    def peft_tensors_for_save(self) -> dict[str, torch.Tensor]:
        """PEFT's layout: pruned ranks are left out (the config's rank_pattern says which were kept)."""
        keep = self.rank_mask
        if bool(keep.all()):
            return self.peft_tensors()
        return {"lora_A": self.lora_A[keep], "lora_B": self.lora_B[:, keep], "lora_E": self.lora_E[keep]}

    def regularizer(self) -> torch.Tensor:
        """‖AAᵀ − I‖_F + ‖BᵀB − I‖_F (unweighted; the training hook weights and averages it as PEFT does)."""
        a, b = self.lora_A, self.lora_B
        eye = torch.eye(self.r, device=a.device, dtype=a.dtype)
        return torch.linalg.matrix_norm(a @ a.t() - eye) + torch.linalg.matrix_norm(b.t() @ b - eye)

    @torch.no_grad()
    def mask_ranks(self, keep: torch.Tensor) -> None:
        """Zero E where `keep` [r] is False, and remember the mask for saving."""
        self.rank_mask.copy_(keep)
        self.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def rank_pattern(self) -> list[bool]:
        """The kept ranks among init_r, as PEFT's rank_pattern stores them."""
        mask = iter(self.rank_mask.tolist())
        return [bool(k and next(mask)) for k in self.kept]

    def extra_repr(self) -> str:
        return f"r={self.r}, init_r={int(self.ranknum)}, scaling={self.scaling:g}"


class RankAllocator:
    """PEFT's RankAllocator and update_and_allocate for one adapter, as a lorakit training hook.

    The loop adds `extra_loss()` to the loss before backward and calls `after_step(step)` once per optimizer
    step, AFTER optimizer.step() and BEFORE zero_grad(): the importance scores are read from the gradients.
    The allocator counts the optimizer steps itself (1 after the first, PEFT's global_step), so a loop's own
    0- or 1-based numbering does not shift the schedule; the count is part of state_dict() for resuming.
    """

    def __init__(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig):
        self.model, self.name, self.config = model, adapter_name, config
        self.deltas: dict[str, AdaLoraDelta] = {
            path: layer.deltas[adapter_name] for path, layer in adapted_layers(model)
            if isinstance(layer.deltas[adapter_name] if adapter_name in layer.deltas else None, AdaLoraDelta)}
        self.params = [p for d in self.deltas.values() for p in (d.lora_A, d.lora_B, d.lora_E)]
        self.init_bgt = sum(d.r for d in self.deltas.values())
        self.target_bgt = config.target_r * len(self.deltas)
        self.global_step = 0  # optimizer steps seen by after_step
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget the importance EMAs (PEFT does after the final allocation)."""
        self.exp_avg_ipt: Optional[list[torch.Tensor]] = None  # per param, aligned with self.params
        self.exp_avg_unc: Optional[list[torch.Tensor]] = None

    # --- the loss term ---------------------------------------------------------------------------
    def extra_loss(self) -> Optional[torch.Tensor]:
        """The orthogonality regulariser, weighted as PEFT weights it; None when its weight is 0."""
        if self.config.orth_reg_weight == 0 or not self.deltas:
            return None
        terms = torch.stack([d.regularizer() for d in self.deltas.values()])
        return self.config.orth_reg_weight * terms.sum() / (2 * len(self.deltas))

    # --- importance and budget -------------------------------------------------------------------
    @torch.no_grad()
    def update_ipt(self) -> None:
        """EMA of the sensitivity |w·∇w| (beta1) and of its deviation from that EMA (beta2)."""
        if self.exp_avg_ipt is None:
            self.exp_avg_ipt = [torch.zeros_like(p) for p in self.params]
            self.exp_avg_unc = [torch.zeros_like(p) for p in self.params]
        live = [i for i, p in enumerate(self.params) if p.grad is not None and p.numel()]
        if not live:
            return
        b1, b2 = self.config.beta1, self.config.beta2
        ema, unc = [self.exp_avg_ipt[i] for i in live], [self.exp_avg_unc[i] for i in live]
        ipt = torch._foreach_mul([self.params[i] for i in live], [self.params[i].grad for i in live])
        torch._foreach_abs_(ipt)
        torch._foreach_mul_(ema, b1)
        torch._foreach_add_(ema, ipt, alpha=1 - b1)
        dev = torch._foreach_sub(ipt, ema)
        torch._foreach_abs_(dev)
        torch._foreach_mul_(unc, b2)
        torch._foreach_add_(unc, dev, alpha=1 - b2)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether to mask at this step): cubic from init_bgt to target_bgt."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * mul**3 + self.target_bgt), step % c.deltaT == 0

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Keep the `budget` most important ranks over all layers (PEFT's kthvalue threshold)."""
        if self.exp_avg_ipt is None:
            return
        scores = []
        for j, delta in enumerate(self.deltas.values()):
            a, b, e = (self.exp_avg_ipt[3 * j + i] * self.exp_avg_unc[3 * j + i] for i in range(3))
            scores.append(e.view(-1) + a.mean(1) + b.mean(0))  # [r]
        every = torch.cat(scores)
        k = min(self.init_bgt - budget, every.numel())
        threshold = torch.kthvalue(every.float(), k).values.item() if k > 0 else float("-inf")
        for delta, score in zip(self.deltas.values(), scores):
            delta.mask_ranks(score > threshold)
        self._record_rank_pattern()

    def _record_rank_pattern(self) -> None:
        """Store the kept ranks in the adapter's config (a copy: the caller's config object is untouched)."""
        pattern = {f"{path}.lora_E": d.rank_pattern() for path, d in self.deltas.items()}
        configs = state(self.model).configs
        if self.name in configs:
            configs[self.name] = configs[self.name].with_updates(rank_pattern=pattern)

    # --- the hook ---------------------------------------------------------------------------------
    def after_step(self, step: int = -1) -> None:
        """PEFT's update_and_allocate(global_step): call after optimizer.step(), before zero_grad().
        `step` is the loop's own step number (unused: see the class docstring)."""
        self.global_step += 1
        step = self.global_step
        end = self.config.total_step - self.config.tfinal
        if step < end:
            self.update_ipt()
            budget, mask_now = self.budget_schedule(step)
            if mask_now:
                self.mask_to_budget(budget)
        elif step == end:  # the final allocation, then fine-tune with it
            self.mask_to_budget(self.budget_schedule(step)[0])
            self.reset_ipt()
        else:
            for delta in self.deltas.values():
                delta.mask_ranks(delta.rank_mask)

    def state_dict(self) -> dict:
        """Everything the next steps depend on, for checkpoint/resume (the EMAs and the rank masks)."""
        return {"global_step": self.global_step, "exp_avg_ipt": self.exp_avg_ipt, "exp_avg_unc": self.exp_avg_unc,
                "rank_masks": {path: d.rank_mask.clone() for path, d in self.deltas.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict saved (on resume)."""
        if set(state["rank_masks"]) != set(self.deltas):
            raise ConfigError("this AdaLoRA allocator state belongs to a different set of adapted layers")
        self.global_step = int(state["global_step"])
        device = self.params[0].device if self.params else None
        for key in ("exp_avg_ipt", "exp_avg_unc"):
            value = state[key]
            setattr(self, key, None if value is None else [t.to(device) for t in value])
        for path, mask in state["rank_masks"].items():
            self.deltas[path].rank_mask.copy_(mask)
        if not all(bool(d.rank_mask.all()) for d in self.deltas.values()):
            self._record_rank_pattern()

    def on_save(self) -> None:
        """Nothing to do: pruned ranks are dropped by AdaLoraDelta.peft_tensors_for_save."""


VARIANT = Variant("ADALORA", AdaLoraConfig, AdaLoraDelta, training_hook=RankAllocator)
