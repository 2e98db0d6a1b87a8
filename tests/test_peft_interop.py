"""Files interchangeable with PEFT 0.21, both directions, on real models (MiniLM) and GPT-2 (Conv1D, Embedding)."""

import copy
import json

import peft
import pytest
import torch
from torch import nn

import lorakit

CASES = {
    "query_value": dict(r=8, lora_alpha=16, target_modules=["query", "value"]),
    "all_linear_rslora_bias": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True, bias="lora_only"),
    "patterns_layers": dict(r=4, lora_alpha=8, target_modules=["query", "key", "dense"], layers_to_transform=[0, 2],
                            rank_pattern={"key": 2}, alpha_pattern={"dense": 3}, exclude_modules=["output.dense"]),
    "regex_bias_all": dict(r=2, lora_alpha=4, target_modules=r".*\.attention\.self\.(query|value)", bias="all"),
}


def _randomise(model, seed=3):
    """Give every adapter tensor non-trivial values, so equal outputs mean equal math."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or ("bias" in n and p.requires_grad):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _inputs():
    torch.manual_seed(0)
    return dict(input_ids=torch.randint(100, 20000, (3, 16)), attention_mask=torch.ones(3, 16, dtype=torch.long))


@pytest.mark.parametrize("case", CASES)
def test_peft_directory_loads_into_lorakit(minilm_cls, tmp_path, case):
    base = copy.deepcopy(minilm_cls)
    pm = peft.get_peft_model(minilm_cls, peft.LoraConfig(task_type="SEQ_CLS", **CASES[case]))
    _randomise(pm)
    pm.save_pretrained(tmp_path)
    pm.eval()
    lorakit.load_adapter(base, tmp_path)
    x = _inputs()
    with torch.no_grad():
        expected, got = pm(**x).logits, base(**x).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (got - expected).abs().max()


@pytest.mark.parametrize("case", CASES)
def test_lorakit_directory_loads_into_peft(minilm_cls, tmp_path, case):
    base = copy.deepcopy(minilm_cls)
    lorakit.add_adapter(minilm_cls, lorakit.LoraConfig(task_type="SEQ_CLS", **CASES[case]))
    _randomise(minilm_cls)
    lorakit.save_adapter(minilm_cls, tmp_path)
    pm = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    x = _inputs()
    with torch.no_grad():
        expected, got = minilm_cls(**x).logits, pm(**x).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (got - expected).abs().max()


def test_config_json_has_exactly_peft_fields(minilm_cls, tmp_path):
    cfg = dict(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    peft.get_peft_model(copy.deepcopy(minilm_cls), peft.LoraConfig(**cfg)).save_pretrained(tmp_path / "peft")
    lorakit.add_adapter(minilm_cls, lorakit.LoraConfig(**cfg))
    lorakit.save_adapter(minilm_cls, tmp_path / "lk")
    theirs = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    ours = json.loads((tmp_path / "lk/adapter_config.json").read_text())
    assert set(ours) == set(theirs)
    for key in ("r", "lora_alpha", "peft_type", "task_type", "bias", "use_rslora", "init_lora_weights", "lora_dropout"):
        assert ours[key] == theirs[key], key
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    assert sorted(ours["modules_to_save"]) == sorted(theirs["modules_to_save"])


def test_same_keys_and_shapes_as_peft(minilm_cls, tmp_path):
    from safetensors.torch import load_file

    cfg = dict(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS", bias="lora_only")
    peft.get_peft_model(copy.deepcopy(minilm_cls), peft.LoraConfig(**cfg)).save_pretrained(tmp_path / "peft")
    lorakit.add_adapter(minilm_cls, lorakit.LoraConfig(**cfg))
    lorakit.save_adapter(minilm_cls, tmp_path / "lk")
    theirs = load_file(tmp_path / "peft/adapter_model.safetensors")
    ours = load_file(tmp_path / "lk/adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_trainable_counts_equal_peft(minilm_cls):
    cfg = dict(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    pm = peft.get_peft_model(copy.deepcopy(minilm_cls), peft.LoraConfig(**cfg))
    trainable, total = pm.get_nb_trainable_parameters()
    lorakit.add_adapter(minilm_cls, lorakit.LoraConfig(**cfg))
    report = lorakit.trainable_report(minilm_cls)
    assert report == f"trainable: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.3f}"


def test_gpt2_conv1d_and_embedding_both_directions(tiny_gpt2, tmp_path):
    base = copy.deepcopy(tiny_gpt2)
    cfg = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc", "wte"], fan_in_fan_out=True)
    pm = peft.get_peft_model(copy.deepcopy(tiny_gpt2), peft.LoraConfig(**cfg))
    _randomise(pm)
    pm.save_pretrained(tmp_path / "peft")
    pm.eval()
    ids = torch.randint(0, 128, (2, 12))
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-5)
    lorakit.add_adapter(tiny_gpt2, lorakit.LoraConfig(**cfg))
    _randomise(tiny_gpt2, seed=5)
    lorakit.save_adapter(tiny_gpt2, tmp_path / "lk")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk").eval()
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, tiny_gpt2(ids).logits, rtol=1e-5, atol=1e-5)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def test_plain_module_conv2d_both_directions(tmp_path):
    torch.manual_seed(0)
    base = _ConvNet().eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "head"]))
    _randomise(pm)
    pm.save_pretrained(tmp_path / "peft")
    x = torch.randn(2, 3, 8, 8)
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(ours(x), pm.eval()(x), rtol=1e-5, atol=1e-6)
    lorakit.save_adapter(ours, tmp_path / "lk")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk").eval()
    with torch.no_grad():
        assert torch.allclose(back(x), ours(x), rtol=1e-5, atol=1e-6)


def test_pickle_bin_is_read_with_weights_only(minilm_cls, tmp_path):
    cfg = lorakit.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False)
    model = copy.deepcopy(minilm_cls)
    lorakit.add_adapter(model, cfg)
    lorakit.save_adapter(model, tmp_path)
    tensors = {k: v.clone() for k, v in lorakit.adapter_state_dict(model).items()}
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    lorakit.load_adapter(minilm_cls, tmp_path)
    for k, v in lorakit.adapter_state_dict(minilm_cls).items():
        assert torch.equal(v, tensors[k])
