"""The public API's behaviour on plain modules and HF models, beyond the contract matrix."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.adapted import AdaptedLayer
from lorakit.core.saved import SavedModule


def _lora(**kw):
    return lorakit.LoraConfig(**({"r": 4, "lora_alpha": 8, "init_lora_weights": False} | kw))


def test_model_stays_what_it_was_and_its_base_keys_load_into_a_plain_model(tiny_llama):
    cls = type(tiny_llama)
    keys = set(tiny_llama.state_dict())
    model = lorakit.add_adapter(tiny_llama, _lora(target_modules=["q_proj", "v_proj", "embed_tokens"]))
    assert model is tiny_llama and type(model) is cls
    adapter_keys = {k for k in model.state_dict() if ".deltas." in k}
    assert set(model.state_dict()) - adapter_keys == keys  # base keys unchanged: no "base_layer." in them
    assert model.model.layers[0].self_attn.q_proj.weight is model.model.layers[0].self_attn.q_proj.base_layer.weight
    plain = cls(model.config)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k not in adapter_keys}, strict=True)
    with lorakit.disabled(model):
        for k, v in plain.state_dict().items():
            assert torch.equal(v, model.state_dict()[k]), k


def test_generate_works_and_uses_the_adapter(tiny_llama):
    ids = torch.tensor([[1, 5, 9, 2]])
    base = tiny_llama.generate(ids, max_new_tokens=6, do_sample=False)
    lorakit.add_adapter(tiny_llama, _lora(r=8, lora_alpha=64, target_modules="all-linear"))
    adapted = tiny_llama.generate(ids, max_new_tokens=6, do_sample=False)
    with lorakit.disabled(tiny_llama):
        assert torch.equal(tiny_llama.generate(ids, max_new_tokens=6, do_sample=False), base)
    assert adapted.shape == base.shape and not torch.equal(adapted, base)


def test_all_linear_skips_the_output_head(tiny_llama):
    lorakit.add_adapter(tiny_llama, _lora(target_modules="all-linear"))
    adapted = {n.rsplit(".", 1)[-1] for n, _ in lorakit.adapted_layers(tiny_llama)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(tiny_llama.lm_head, AdaptedLayer)


def test_list_of_adapters_adds_their_deltas_on_one_layer():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    holder = nn.Sequential(layer)
    x = torch.randn(3, 6)
    base = layer(x)
    lorakit.add_adapter(holder, _lora(target_modules=["0"]), name="a")
    lorakit.add_adapter(holder, _lora(target_modules=["0"]), name="b")
    deltas = {n: d.delta_weight(holder[0]) for n, d in holder[0].deltas.items()}
    lorakit.set_active(holder, ["a", "b"])
    expected = base + x @ (deltas["a"] + deltas["b"]).t()
    assert torch.allclose(holder(x), expected, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_at_the_base_model(init):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16))
    x = torch.randn(5, 24)
    base = model(x)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=init))
    delta = model[0].deltas["default"]
    assert delta.lora_B.abs().sum() > 0 and delta.lora_A.abs().sum() > 0  # principal directions, not zeros
    assert torch.allclose(model(x), base, atol=1e-5)


def test_gaussian_init_and_rslora_scaling():
    model = nn.Sequential(nn.Linear(512, 8))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=16, lora_alpha=8, target_modules=["0"], init_lora_weights="gaussian",
                                                  use_rslora=True))
    delta = model[0].deltas["default"]
    assert abs(delta.lora_A.std().item() - 1 / 16) < 0.01
    assert torch.count_nonzero(delta.lora_B) == 0
    assert delta.scaling == pytest.approx(8 / math.sqrt(16))


def test_bf16_keeps_dtypes_and_merges_in_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32)).to(torch.bfloat16)
    lorakit.add_adapter(model, _lora(target_modules=["0"]))
    delta = model[0].deltas["default"]
    assert delta.lora_A.dtype == delta.lora_B.dtype == torch.bfloat16
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    assert model(x).dtype == torch.bfloat16
    w = model[0].weight.detach().clone()
    expected = (w.float() + delta.delta_weight(model[0])).to(torch.bfloat16)
    lorakit.merge(model)
    assert torch.equal(model[0].weight, expected)


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    lorakit.add_adapter(model, _lora(target_modules=["0"], lora_dropout=0.5))
    x = torch.randn(8, 16)
    model.eval()
    a, b = model(x), model(x)
    model.train()
    c = model(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_disabled_on_a_merged_model_restores_the_merge():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(2, 8)
    base = model(x)
    lorakit.add_adapter(model, _lora(target_modules=["0"]))
    adapted = model(x)
    lorakit.merge(model)
    with lorakit.disabled(model):
        assert torch.allclose(model(x), base, atol=1e-6)
    assert model[0].merged == ["default"]
    assert torch.allclose(model(x), adapted, atol=1e-6)


def test_switching_while_merged_unmerges_with_a_warning():
    model = nn.Sequential(nn.Linear(8, 8))
    lorakit.add_adapter(model, _lora(target_modules=["0"]), name="a")
    lorakit.add_adapter(model, _lora(target_modules=["0"]), name="b")
    lorakit.merge(model)
    with pytest.warns(UserWarning, match="unmerging"):
        lorakit.set_active(model, "b")
    assert model[0].merged == [] and lorakit.active_adapters(model) == ["b"]


def test_modules_to_save_trains_a_copy_and_keeps_the_original(minilm_cls):
    original = minilm_cls.classifier.weight.detach().clone()
    lorakit.add_adapter(minilm_cls, lorakit.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert isinstance(minilm_cls.classifier, SavedModule)
    trainable = {n for n, p in minilm_cls.named_parameters() if p.requires_grad}
    assert {"classifier.copies.default.weight", "classifier.copies.default.bias"} <= trainable
    assert "classifier.original_module.weight" not in trainable
    opt = torch.optim.SGD([p for p in minilm_cls.parameters() if p.requires_grad], lr=0.5)
    minilm_cls.train()
    out = minilm_cls(input_ids=torch.randint(100, 2000, (4, 8)), labels=torch.tensor([0, 1, 0, 1]))
    out.loss.backward()
    opt.step()
    assert torch.equal(minilm_cls.classifier.original_module.weight, original)
    assert not torch.equal(minilm_cls.classifier.copies["default"].weight, original)


def test_unload_merges_or_restores_and_leaves_no_lorakit_module(minilm_cls):
    base = copy.deepcopy(minilm_cls)
    minilm_cls.classifier.weight.requires_grad_(False)  # a user setting that unload must give back
    x = dict(input_ids=torch.randint(100, 2000, (2, 10)))
    lorakit.add_adapter(minilm_cls, _lora(target_modules=["query", "value"], task_type="SEQ_CLS"))
    with torch.no_grad():
        adapted = minilm_cls(**x).logits
    twin = copy.deepcopy(minilm_cls)
    plain = lorakit.unload(minilm_cls, merge=True)
    assert plain is minilm_cls
    assert not any(isinstance(m, (AdaptedLayer, SavedModule)) for m in plain.modules())
    assert set(plain.state_dict()) == set(base.state_dict())
    assert not plain.classifier.weight.requires_grad and plain.bert.embeddings.word_embeddings.weight.requires_grad
    with torch.no_grad():
        assert torch.allclose(plain(**x).logits, adapted, atol=1e-5)
        restored = lorakit.unload(twin, merge=False)
        assert torch.allclose(restored(**x).logits, base(**x).logits, atol=1e-6)
    assert lorakit.list_adapters(plain) == []


def test_deepcopy_and_pickle_of_an_adapted_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    lorakit.add_adapter(model, _lora(target_modules=["0"]))
    x = torch.randn(2, 8)
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(twin(x), model(x)) and torch.equal(loaded(x), model(x))
    assert lorakit.list_adapters(twin) == ["default"]


def test_state_dict_round_trip_of_the_adapted_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    lorakit.add_adapter(model, _lora(target_modules=["0"]))
    twin = nn.Sequential(nn.Linear(8, 8))
    lorakit.add_adapter(twin, _lora(target_modules=["0"]))
    twin.load_state_dict(model.state_dict())  # strict: every key maps back, base keys included
    x = torch.randn(3, 8)
    assert torch.equal(twin(x), model(x))


def test_trainable_report_format():
    model = nn.Sequential(nn.Linear(10, 10))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
    assert lorakit.trainable_report(model) == "trainable: 40 || all params: 150 || trainable%: 26.667"


def test_first_adapter_active_later_ones_not_and_warnings_free():
    model = nn.Sequential(nn.Linear(8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.add_adapter(model, _lora(target_modules=["0"]), name="a")
        lorakit.add_adapter(model, _lora(target_modules=["0"]), name="b")
    assert lorakit.active_adapters(model) == ["a"]
    assert lorakit.list_adapters(model) == ["a", "b"]


def test_adapters_targeting_different_layers_can_be_active_together():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    lorakit.add_adapter(model, _lora(target_modules=["0", "2"]), name="a")
    lorakit.add_adapter(model, _lora(target_modules=["2"]), name="b")
    x = torch.randn(3, 8)
    lorakit.set_active(model, ["a", "b"])
    both = model(x)
    lorakit.merge(model)
    assert torch.allclose(model(x), both, atol=1e-6)


def test_adapters_added_to_an_eval_model_are_in_eval_mode():
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    lorakit.add_adapter(model, _lora(target_modules=["0"], lora_dropout=0.5, task_type=None, modules_to_save=None))
    assert not any(m.training for m in model.modules())
    x = torch.randn(4, 8)
    assert torch.equal(model(x), model(x))


def test_second_adapter_with_modules_to_save_loads(minilm_cls, tmp_path):
    cfg = _lora(target_modules=["query"], task_type="SEQ_CLS")
    lorakit.add_adapter(minilm_cls, cfg, name="a")
    lorakit.save_adapter(minilm_cls, tmp_path / "a", name="a")
    lorakit.load_adapter(minilm_cls, tmp_path / "a", name="b")
    assert set(minilm_cls.classifier.copies) == {"a", "b"}
    assert oct((tmp_path / "a" / "adapter_model.safetensors").stat().st_mode & 0o777) != "0o600"
