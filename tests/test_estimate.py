"""`lorakit estimate`: parameter arithmetic against published counts, and the memory estimate against the
measured peak of a real CPU training run."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import app as cli
from lorakit.errors import ConfigError
from lorakit.train.estimate import NF4_BITS, estimate, shape_of, weights_table
from test_train_support import one_thread  # noqa: F401

GB = 1e9


def test_published_parameter_counts():
    # Llama-2-7B has 6,738,415,616 parameters; PEFT reports 4,194,304 trainable for LoRA r=8 on q_proj,v_proj.
    est = estimate("llama-2-7b", r=8, targets=["q_proj", "v_proj"], bits=16)
    assert est.shape.params == 6_738_415_616
    assert est.trainable == 4_194_304
    assert est.weights_bytes == 2 * 6_738_415_616
    assert est.trainable_bytes == 16 * 4_194_304
    # Mistral-7B: 7,241,732,096 parameters; r=8 on every linear layer of the blocks: 20,971,520
    est = estimate("mistral-7b", r=8, targets=["all-linear"], bits=16)
    assert est.shape.params == 7_241_732_096 and est.trainable == 20_971_520
    assert est.full_ft_bytes > 16 * est.shape.params


def test_weights_by_precision_and_nf4():
    table = dict(weights_table(7_000_000_000))
    assert table["fp32"] / GB == 28 and table["bf16/fp16"] / GB == 14 and table["int8"] / GB == 7
    assert abs(NF4_BITS - 4.127) < 1e-3
    assert abs(table["int4 (NF4)"] / GB - 7 * NF4_BITS / 8) < 1e-9
    e4 = estimate("llama-3-8b", bits=4)
    e16 = estimate("llama-3-8b", bits=16)
    assert e4.weights_bytes == pytest.approx(e16.weights_bytes * NF4_BITS / 16)
    assert e4.activation_bytes == e16.activation_bytes


def test_checkpointing_and_batch_scale_activations():
    base = estimate("smollm2-135m", batch=1, seq=512)
    assert estimate("smollm2-135m", batch=4, seq=512).activation_bytes == pytest.approx(4 * base.activation_bytes)
    big = estimate("llama-2-7b", batch=1, seq=2048)  # blocks, not the loss, dominate here
    assert estimate("llama-2-7b", batch=1, seq=2048, gradient_checkpointing=True).activation_bytes < \
        0.5 * big.activation_bytes


def test_unknown_model_and_targets_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="known shape"):
        estimate("no-such-model")
    with pytest.raises(ConfigError, match="match no linear layer"):
        estimate("gpt2", targets=["q_proj"])
    assert estimate("gpt2", targets=["c_attn"]).trainable == 12 * 8 * (768 + 3 * 768)


def _measured_peak(config: dict, r: int, targets: list[str], batch: int, seq: int) -> int:
    """Peak tensor memory (bytes) of building the model, adding the adapter and two AdamW steps, from torch's
    profiler (allocator-level: what the estimate predicts; the process RSS adds malloc's caching on top)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    torch.manual_seed(0)
    x = torch.randint(0, config["vocab_size"], (batch, seq))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = LlamaForCausalLM(LlamaConfig(**config))
        lorakit.add_adapter(model, lorakit.LoraConfig(r=r, target_modules=targets))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for _ in range(2):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    current = peak = 0
    for _, delta in changes:
        current += delta
        peak = max(peak, current)
    return peak


def test_estimate_matches_a_measured_cpu_run(tmp_path, capsys):
    config = dict(vocab_size=8000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2)
    from transformers import LlamaConfig

    LlamaConfig(**config).save_pretrained(tmp_path)
    est = estimate(str(tmp_path / "config.json"), r=8, targets=["q_proj", "v_proj"], bits=32, batch=8, seq=256)
    measured = _measured_peak(config, 8, ["q_proj", "v_proj"], batch=8, seq=256)
    # stated tolerance: the estimate is within 25% of the measured peak
    assert abs(est.total_bytes - measured) / measured < 0.25, (est.total_bytes, measured)
    # the CLI prints the same figures from the model directory
    code = cli.main(["estimate", "--model", str(tmp_path), "--bits", "32", "--batch", "8", "--seq", "256"])
    out = capsys.readouterr().out
    assert code == 0 and "full fine-tuning" in out and f"{est.total_bytes / 1e6:.1f} MB" in out


def test_shape_from_model_directory_counts_real_parameters(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    real = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert shape_of(str(tmp_path)).params == real
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
