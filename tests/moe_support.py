"""Tiny mixture-of-experts models from configs, for the MoE tests (no tests here). transformers 5 stores each
layer's experts fused: `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I]."""

from __future__ import annotations

import torch

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def tiny_moe(family: str, vocab: int = 64, seed: int = 0):
    """A 2-layer, 4-expert (top-2) Mixtral or Qwen3-MoE with hidden size 32, in eval mode."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.2)
    torch.manual_seed(seed)
    if family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=48, num_local_experts=4, **common))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=24, num_experts=4,
                                                   head_dim=8, norm_topk_prob=True, **common))
    return model.eval()


def randomise(model, marker: str, seed: int = 1, std: float = 0.3) -> None:
    """Random values in every parameter whose name contains `marker` ("lora_" for PEFT, ".deltas." for lorakit)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if marker in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def effect_error(y: torch.Tensor, reference: torch.Tensor, base: torch.Tensor) -> float:
    """max |y − reference| / max |reference − base|: an error relative to the adapter's effect."""
    effect = (reference - base).abs().max()
    assert effect > 1e-3, "the adapter must change the output"
    return float((y - reference).abs().max() / effect)
