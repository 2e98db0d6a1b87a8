"""lorakit.combine, lorakit.weighted and lorahub_search, and the `lorakit compose` command function.

combine's ΔW is compared in float64-backed fp32 with the dense weighted sum and with a dense truncated
SVD computed here independently (within 1e-5 relative; the factored path never forms ΔW, so the sums
round differently).
"""

import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit.cli.compose import ComposeOptions, compose


def _lora(**kw):
    return lorakit.LoraConfig(**({"r": 4, "lora_alpha": 8, "init_lora_weights": False} | kw))


@torch.no_grad()
def _dense(layer, weights):
    """Σ w·ΔW in canonical [out, in·k] layout, float64."""
    total = 0
    for name, w in weights.items():
        if name in layer.deltas:
            total = total + w * layer.ops.from_layer_layout(layer.deltas[name].delta_weight(layer)).double().flatten(1)
    return total


@pytest.fixture
def model(tiny_llama):
    lorakit.add_adapter(tiny_llama, _lora(target_modules="all-linear"), "a")
    lorakit.add_adapter(tiny_llama, _lora(r=6, lora_alpha=3, use_rslora=True,
                                          target_modules=["q_proj", "v_proj", "embed_tokens"]), "b")
    return tiny_llama


WEIGHTS = {"a": 0.7, "b": -0.3}


def test_exact_combination_reproduces_the_weighted_sum(model):
    report = lorakit.combine(model, WEIGHTS, name="ab")
    assert report.relative_error < 1e-6 and report.rank == 10  # 4 + 6: the sum's rank where both adapt
    model.requires_grad_(False)
    for path, layer in lorakit.adapted_layers(model):
        got = layer.ops.from_layer_layout(layer.deltas["ab"].delta_weight(layer)).double().flatten(1)
        want = _dense(layer, WEIGHTS)
        assert float((got - want).norm() / want.norm()) < 1e-5, path
    ids = torch.randint(0, 128, (3, 8))
    with torch.no_grad(), lorakit.weighted(model, WEIGHTS):
        expected = model(ids).logits
    lorakit.set_active(model, "ab")
    with torch.no_grad():
        out = model(ids).logits
    assert float((out - expected).abs().max() / expected.abs().max()) < 1e-5


@pytest.mark.parametrize("mixed_variant", [False, True], ids=["lora-factored", "with-dora-dense"])
def test_truncation_is_the_best_rank_k_approximation(model, mixed_variant):
    weights = dict(WEIGHTS)
    if mixed_variant:
        lorakit.add_adapter(model, _lora(r=3, use_dora=True, target_modules=["q_proj", "o_proj"]), "d")
        weights["d"] = 0.5
    report = lorakit.combine(model, weights, name="k3", rank=3)
    model.requires_grad_(False)
    lost = total = 0.0
    for path, layer in lorakit.adapted_layers(model):
        dense = _dense(layer, weights)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        got = layer.ops.from_layer_layout(layer.deltas["k3"].delta_weight(layer)).double().flatten(1)
        assert float((got - best).norm() / best.norm()) < 1e-5, path
        err = float(s[3:].square().sum().sqrt() / s.square().sum().sqrt())
        assert report.layer_errors[path] == pytest.approx(err, rel=1e-4, abs=1e-7), path
        lost, total = lost + float(s[3:].square().sum()), total + float(s.square().sum())
    assert report.relative_error == pytest.approx((lost / total) ** 0.5, rel=1e-4)
    assert 0 < report.relative_error < 1


def test_combine_bad_input(model):
    with pytest.raises(lorakit.AdapterNameError):
        lorakit.combine(model, {"a": 1.0, "zz": 1.0}, name="x")
    with pytest.raises(lorakit.AdapterNameError):
        lorakit.combine(model, WEIGHTS, name="a")
    for bad in (0, -1, 2.5):
        with pytest.raises(lorakit.ConfigError):
            lorakit.combine(model, WEIGHTS, name="x", rank=bad)
    for bad in ({}, {"a": float("nan")}):
        with pytest.raises(lorakit.ConfigError):
            lorakit.combine(model, bad, name="x")
    assert lorakit.list_adapters(model) == ["a", "b"]


def test_lorahub_search_recovers_known_weights(model):
    """The examples are labelled by a hidden mixture 0.8·a + 0.4·b; the search finds it again."""
    ids = torch.randint(0, 128, (4, 8))
    truth = {"a": 0.8, "b": 0.4}
    with torch.no_grad(), lorakit.weighted(model, truth):
        target = model(ids).logits

    def loss_fn(m: nn.Module) -> float:
        return float((m(ids).logits - target).square().mean())

    result = lorakit.lorahub_search(model, ["a", "b"], loss_fn, max_evals=80, l1=0.0)
    assert result.evaluations <= 80 and len(result.history) == result.evaluations
    assert result.loss < 0.01 * result.history[0][1]  # from the base model (all zeros) to near the truth
    for name, w in truth.items():
        assert abs(result.weights[name] - w) < 0.05


def _tiny_model_dir(path, minilm_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return LlamaForCausalLM.from_pretrained(path)


def test_compose_command_searches_combines_and_saves(tmp_path, minilm_path):
    base = _tiny_model_dir(tmp_path / "base", minilm_path)
    dirs = []
    for i, r in enumerate((2, 4)):
        torch.manual_seed(i)
        lorakit.add_adapter(base, _lora(r=r, target_modules=["q_proj", "v_proj"]), f"t{i}")
        dirs.append(f"task{i}={lorakit.save_adapter(base, tmp_path / f't{i}', f't{i}')}")
    data = tmp_path / "few.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}) for i in range(4)))
    summary = compose(ComposeOptions(adapters=dirs, model=str(tmp_path / "base"), data=str(data), max_evals=6,
                                     output=str(tmp_path / "out"), device="cpu"))
    assert set(summary["weights"]) == {"task0", "task1"} and summary["evaluations"] <= 6
    nonzero = sum(r for r, w in zip((2, 4), summary["weights"].values()) if w != 0)
    assert summary["rank"] == nonzero and summary["relative_error"] < 1e-6  # exact: the ranks of the used adapters
    assert summary["search_loss"] <= summary["base_loss"]  # the search starts at the base (all zeros)
    assert summary["composed_loss"] == pytest.approx(summary["search_loss"], rel=1e-4)
    saved = json.loads((tmp_path / "out" / "compose.json").read_text())
    assert saved == summary
    assert lorakit.read_config(tmp_path / "out").r == nonzero

    fixed = compose(ComposeOptions(adapters=dirs, model=str(tmp_path / "base"), weights=[1.0, -2.0], rank=3,
                                   output=str(tmp_path / "fixed"), device="cpu"))
    assert fixed["weights"] == {"task0": 1.0, "task1": -2.0} and fixed["rank"] == 3
    with pytest.raises(lorakit.ConfigError):
        compose(ComposeOptions(adapters=dirs, model=str(tmp_path / "base"), output=str(tmp_path / "none")))
