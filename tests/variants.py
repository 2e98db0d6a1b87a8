"""The variants and layer types every contract test runs over.

A variant registers a `VariantCase` here: how to build its config for given targets, either at its
default init (`fresh=True`, expected to be a no-op when `noop_at_init`) or randomised so that ΔW ≠ 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import lorakit


@dataclass
class VariantCase:
    name: str
    make: Callable[[list, bool], lorakit.AdapterConfig]  # (targets, fresh) -> config
    layer_kinds: tuple[str, ...]  # which LAYER_CASES it supports
    noop_at_init: bool = True


def _targets(targets) -> dict:
    """A layer case's targets as config fields: module names, or a dict of fields (parameter targets)."""
    return targets if isinstance(targets, dict) else {"target_modules": targets}


def _lora(targets, fresh):
    return lorakit.LoraConfig(r=4, lora_alpha=8, init_lora_weights=True if fresh else False, **_targets(targets))


def _dora(targets, fresh):
    return lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                              init_lora_weights=True if fresh else False)


def _loha(targets, fresh):
    return lorakit.LoHaConfig(r=3, alpha=6, target_modules=targets, init_weights=fresh)


def _lokr(targets, fresh):
    return lorakit.LoKrConfig(r=2, alpha=4, target_modules=targets, init_weights=fresh)


def _adalora(targets, fresh):
    return lorakit.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=0.1 if not fresh else 8, total_step=10,
                                 target_modules=targets,
                                 init_lora_weights=fresh)


VARIANTS: list[VariantCase] = [
    VariantCase("lora", _lora, ("linear", "embedding", "conv1d", "conv2d", "conv3d", "gpt2", "experts")),
    VariantCase("dora", _dora, ("linear", "embedding", "conv1d", "conv2d", "conv3d", "gpt2")),
    VariantCase("loha", _loha, ("linear", "conv1d", "conv2d")),  # PEFT: Linear, Conv1d, Conv2d
    VariantCase("lokr", _lokr, ("linear", "conv1d", "conv2d")),  # PEFT: Linear, Conv1d, Conv2d
    VariantCase("adalora", _adalora, ("linear", "conv2d", "gpt2")),  # PEFT: Linear, Conv1D, Conv2d
]


@dataclass
class LayerCase:
    kind: str
    factory: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    targets: list  # target_modules, or a dict of target fields
    def build(self) -> nn.Module:
        """The same base model (seed 0) on every call."""
        torch.manual_seed(0)
        return self.factory().eval()


def _conv(nd):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    return lambda: nn.Sequential(conv(3, 8, 3, padding=1), nn.ReLU(), conv(8, 4, 1))


def _conv_input(nd):
    return lambda: torch.randn(2, 3, *([6] * nd))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_experts=4,
                         num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=32, initializer_range=0.2)
    return Qwen3MoeForCausalLM(cfg).eval()


class _Logits(nn.Module):
    """Makes an HF model return a plain tensor, so every case can be compared the same way."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


LAYER_CASES: list[LayerCase] = [
    LayerCase("linear", lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), lambda: torch.randn(4, 16),
              ["0", "2"]),
    LayerCase("embedding", lambda: nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 8)), lambda: torch.randint(0, 50, (4, 7)),
              ["0"]),
    LayerCase("conv1d", _conv(1), _conv_input(1), ["0", "2"]),
    LayerCase("conv2d", _conv(2), _conv_input(2), ["0", "2"]),
    LayerCase("conv3d", _conv(3), _conv_input(3), ["0", "2"]),
    LayerCase("gpt2", lambda: _Logits(_gpt2()), lambda: torch.randint(0, 64, (2, 9)), ["c_attn", "c_proj", "c_fc"]),
    # a MoE's fused 3-D expert weights, two parameters of one module (PEFT's target_parameters): only LoRA, as in PEFT
    LayerCase("experts", lambda: _Logits(_moe()), lambda: torch.randint(0, 64, (2, 9)),
              {"target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}),
]


def matrix(without: tuple[str, ...] = ()):
    """(variant, layer case) pairs for pytest.mark.parametrize, with readable ids; `without`: layer kinds left out."""
    import pytest

    return [pytest.param(v, c, id=f"{v.name}-{c.kind}") for v in VARIANTS for c in LAYER_CASES
            if c.kind in v.layer_kinds and c.kind not in without]
