"""LoRA on MoE experts' fused 3-D parameters (target_parameters): PEFT's files both ways, merging, rank and alpha
patterns, the parameter count, a transposed expert layout and a 2-D parameter, and what is refused."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.errors import ConfigError, MixedBatchError, TargetError
from moe_support import EXPERTS, effect_error, randomise, tiny_moe
from support import one_thread, rel_max  # noqa: F401

# PEFT 0.21.2 checks rank_pattern / alpha_pattern keys against targeted modules only, not parameters, and warns
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")

FAMILIES = ["mixtral", "qwen3_moe"]
PATTERNS = dict(rank_pattern={"layers.1.mlp.experts.down_proj": 2}, alpha_pattern={"gate_up_proj": 3.0})


def _config(**kw) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(**({"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": EXPERTS} | kw))


def _peft_config(**kw):
    from peft import LoraConfig

    return LoraConfig(**({"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": EXPERTS} | kw))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_a_peft_adapter_loads_with_peft_outputs_and_lorakit_saves_peft_files(family, tmp_path):
    from peft import PeftModel, get_peft_model

    base = tiny_moe(family)
    x = torch.randint(0, 64, (2, 9))
    y_base = _logits(base, x)
    theirs = get_peft_model(copy.deepcopy(base), _peft_config(**PATTERNS))
    randomise(theirs, "lora_")
    theirs.eval().save_pretrained(tmp_path / "peft")
    y_peft = _logits(theirs, x)

    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    y_ours = _logits(ours, x)
    assert effect_error(y_ours, y_peft, y_base) <= 1e-5

    lorakit.save_adapter(ours, tmp_path / "ours")
    peft_file = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_file = safetensors.torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert our_file.keys() == peft_file.keys()
    assert all(torch.equal(our_file[k], peft_file[k]) for k in our_file)
    # the rank pattern reached the second layer's down_proj: A [E·2, I], B [H, E·2]
    experts = "base_model.model.model.layers.1.mlp.experts"
    assert our_file[f"{experts}.lora_A.weight"].shape[0] == 4 * 2 and our_file[f"{experts}.lora_B.weight"].shape[1] == 8
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert effect_error(_logits(back, x), y_ours, y_base) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lorakit_adapter_gives_its_outputs_in_peft_and_counts_as_peft_does(family, tmp_path):
    from peft import PeftModel, get_peft_model

    base = tiny_moe(family)
    x = torch.randint(0, 64, (2, 9))
    model = lorakit.add_adapter(copy.deepcopy(base), _config(**PATTERNS))
    assert lorakit.count_parameters(model) == get_peft_model(copy.deepcopy(base), _peft_config(**PATTERNS)) \
        .get_nb_trainable_parameters()
    assert "trainable: " in lorakit.trainable_report(model)
    randomise(model, ".deltas.")
    lorakit.save_adapter(model, tmp_path / "a")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    assert effect_error(_logits(theirs, x), _logits(model, x), _logits(base, x)) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_unmerge_unload_and_delete_are_exact(family):
    base = tiny_moe(family)
    x = torch.randint(0, 64, (2, 9))
    y_base = _logits(base, x)
    model = lorakit.add_adapter(copy.deepcopy(base), _config())
    randomise(model, ".deltas.")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    y = _logits(model, x)
    lorakit.merge(model)
    assert effect_error(_logits(model, x), y, y_base) <= 1e-5
    lorakit.unmerge(model)
    with lorakit.disabled(model):
        state = model.state_dict()
        assert all((state[k] - v).abs().max() <= 1e-6 for k, v in before.items())  # base keys kept as they were
    merged = lorakit.unload(copy.deepcopy(model), merge=True)
    assert type(merged.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)
    assert effect_error(_logits(merged, x), y, y_base) <= 1e-5
    lorakit.delete_adapter(model, "default")
    assert type(model.model.layers[1].mlp.experts) is type(base.model.layers[1].mlp.experts)
    assert rel_max(_logits(model, x), y_base) <= 1e-5  # one merge/unmerge cycle's fp32 rounding


def test_the_model_state_dict_keeps_base_keys_and_loads_into_an_adapted_copy():
    base = tiny_moe("mixtral")
    x = torch.randint(0, 64, (2, 9))
    trained = lorakit.add_adapter(copy.deepcopy(base), _config())
    randomise(trained, ".deltas.")
    state = trained.state_dict()
    assert set(base.state_dict()) <= set(state)  # experts.gate_up_proj, not experts.base_layer.base_layer...
    assert {k for k in state if ".deltas." in k} == {f"model.layers.{i}.mlp.experts.{inner}deltas.default.lora_{f}"
                                                     for i in (0, 1) for inner in ("", "base_layer.") for f in "AB"}
    fresh = lorakit.add_adapter(copy.deepcopy(base), _config())
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(_logits(fresh, x), _logits(trained, x))


@pytest.mark.parametrize("family", FAMILIES)
def test_without_target_modules_peft_defaults_for_the_model_type_are_adapted_too(family, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_moe(family)
    get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_parameters=EXPERTS)).save_pretrained(tmp_path)
    ours = lorakit.add_adapter(copy.deepcopy(base), lorakit.LoraConfig(r=2, target_parameters=EXPERTS))
    peft_keys = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors").keys()
    assert set(lorakit.adapter_state_dict(ours)) == set(peft_keys)
    assert not any("q_proj" in k for k in peft_keys)  # PEFT's Mixtral defaults do not apply next to parameters


def test_the_moe_model_types_peft_converts_are_those_lorakit_lists():
    from peft.utils import transformers_weight_conversion as conversion

    from lorakit.core.default_targets import PEFT_MOE_CONVERTED_TYPES

    fused = {base for base, targets in conversion._MOE_FUSED_TARGETS.items() if targets}
    converted = {t for t, base in conversion._MODEL_TO_CONVERSION_PATTERN.items()
                 if base in fused and conversion._MOE_TARGET_MODULE_MAPPING.get(base)}
    assert PEFT_MOE_CONVERTED_TYPES == converted


def test_the_router_stays_frozen_unless_modules_to_save_names_it(tmp_path):
    from peft import PeftModel

    base = tiny_moe("mixtral")
    x = torch.randint(0, 64, (2, 9))
    model = lorakit.add_adapter(copy.deepcopy(base), _config())
    model.train()
    model(x).logits.pow(2).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".deltas." in n for n in trained)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".gate." in n)

    routed = lorakit.add_adapter(copy.deepcopy(base), _config(modules_to_save=["gate"]))
    randomise(routed, ".deltas.")
    with torch.no_grad():
        for n, p in routed.named_parameters():
            if ".gate.copies." in n:
                assert p.requires_grad
                p.add_(torch.randn_like(p) * 0.5)
    lorakit.save_adapter(routed, tmp_path / "r")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "r").eval()
    assert effect_error(_logits(theirs, x), _logits(routed.eval(), x), _logits(base, x)) <= 1e-5


class TransposedExperts(nn.Module):
    """Experts stored [E, in, out] (`is_transposed`, as gpt-oss's are); every expert runs, weighted by a softmax."""

    is_transposed = True

    def __init__(self, experts: int = 3, hidden: int = 8, inner: int = 6):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, hidden, 2 * inner) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(experts, inner, hidden) * 0.3)
        self.router = nn.Linear(hidden, experts, bias=False)

    def forward(self, x):
        gate, up = torch.einsum("th,ehk->etk", x, self.gate_up_proj).chunk(2, -1)
        out = torch.einsum("etk,ekh->eth", F.silu(gate) * up, self.down_proj)
        return torch.einsum("eth,te->th", out, self.router(x).softmax(-1))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.moe = TransposedExperts()

    def forward(self, x):
        return self.moe(self.proj(x))


def test_transposed_experts_and_a_2d_parameter_match_peft_both_ways(tmp_path):
    from peft import PeftModel, get_peft_model

    torch.manual_seed(0)
    base = Toy().eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        y_base = base(x)
    targets = dict(target_parameters=["moe.gate_up_proj", "moe.down_proj", "proj.weight"], r=2)
    theirs = get_peft_model(copy.deepcopy(base), _peft_config(**targets))
    randomise(theirs, "lora_")
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        y_peft, y_ours = theirs(x), ours(x)
        assert effect_error(y_ours, y_peft, y_base) <= 1e-5
        lorakit.merge(ours)
        assert effect_error(ours(x), y_peft, y_base) <= 1e-5
        lorakit.unmerge(ours)
    lorakit.save_adapter(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert effect_error(back(x), y_ours, y_base) <= 1e-5


def test_what_parameter_targets_refuse_is_refused_before_anything_changes():
    for bad in ({"lora_dropout": 0.1}, {"use_dora": True}, {"init_lora_weights": "pissa"}):
        with pytest.raises(ConfigError, match="target_parameters"):
            _config(**bad)
    model = tiny_moe("mixtral")
    with pytest.raises(TargetError, match="match no parameter"):
        lorakit.add_adapter(model, _config(target_parameters=["experts.no_such_weight"]))
    with pytest.raises(TargetError, match="adapt it one way only"):
        lorakit.add_adapter(model, _config(target_modules=["q_proj"], target_parameters=["q_proj.weight"]))
    assert not list(lorakit.adapted_layers(model))
    lorakit.add_adapter(model, _config(init_lora_weights=False), name="a")
    with pytest.raises(TargetError, match="same parameters"):
        lorakit.add_adapter(model, _config(target_parameters=["experts.down_proj"]), name="b")
    lorakit.add_adapter(model, _config(init_lora_weights=False), name="b")  # the same set shares the wrappers
    assert len(list(lorakit.adapted_layers(model))) == 4
    with pytest.raises(MixedBatchError, match="target_parameters"):
        with lorakit.per_row(model, ["a", "b"]):
            pass
    with pytest.raises(ConfigError, match="target_parameters"):
        lorakit.combine(model, {"a": 1.0, "b": 1.0}, "ab")
    assert lorakit.list_adapters(model) == ["a", "b"]
