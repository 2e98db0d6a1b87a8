"""DoRA, LoHa and LoKr against their reference math: every fast path equals the plain formula (outputs and
gradients), dropouts behave as PEFT's; config errors and registration of every variant. AdaLoRA's schedule and
allocator: test_variants_adalora.py."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.variants.adalora import AdaLoraDelta
from lorakit.variants.dora import DoraDelta
from lorakit.variants.loha import LoHaDelta
from lorakit.variants.lokr import LoKrDelta
from support import randomise_adapters


def _adapt(layer, config):
    """A one-layer model with the adapter; returns (model, its adapted layer, the delta)."""
    model = nn.Sequential(layer)
    lorakit.add_adapter(model, config).eval()
    randomise_adapters(model)
    return model, model[0], model[0].deltas["default"]


def _grads(module, out):
    module.zero_grad()
    out.pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same_grads(a, b):
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6), n


LYCORIS_LAYERS = {
    "linear": (lambda: nn.Linear(24, 40), lambda: torch.randn(3, 5, 24)),
    "conv1d": (lambda: nn.Conv1d(6, 10, 3, padding=1, stride=2), lambda: torch.randn(2, 6, 9)),
    "conv2d": (lambda: nn.Conv2d(6, 10, 3, padding=1, dilation=2), lambda: torch.randn(2, 6, 7, 7)),
}


def _delta_out(layer, delta, x, y):
    return delta(x, y, layer) - y


# --- LoHa -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LYCORIS_LAYERS)
def test_loha_activation_path_equals_reference(kind):
    make, inputs = LYCORIS_LAYERS[kind]
    torch.manual_seed(0)
    _, layer, delta = _adapt(make(), lorakit.LoHaConfig(r=2, alpha=3, target_modules=["0"]))
    x = inputs()
    y = layer.base_layer(x)
    w1 = delta.hada_w1_a @ delta.hada_w1_b  # reference: PEFT's make_weight
    w2 = delta.hada_w2_a @ delta.hada_w2_b
    ref_w = ((w1 * w2) * 1.5).reshape(layer.base_layer.weight.shape)
    ref = layer.base_layer._conv_forward(x, ref_w, None) if kind != "linear" else F.linear(x, ref_w)
    assert torch.allclose(delta.delta_weight(layer), ref_w, rtol=1e-5, atol=1e-6)
    results = {}
    for path in ("activations", "weight"):
        delta.path = path
        out = _delta_out(layer, delta, x, y)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), path
        results[path] = _grads(delta, out)
    _assert_same_grads(results["activations"], results["weight"])


def test_loha_picks_the_cheaper_path():
    small_r = lorakit.LoHaConfig(r=4, target_modules=["0"])
    assert _adapt(nn.Linear(384, 384), small_r)[2].path == "activations"  # 16·768 < 384·384
    big_r = lorakit.LoHaConfig(r=16, target_modules=["0"])
    assert _adapt(nn.Linear(64, 64), big_r)[2].path == "weight"  # 256·128 > 64·64


def test_loha_effective_conv_matches_peft_einsum():
    torch.manual_seed(0)
    cfg = lorakit.LoHaConfig(r=2, alpha=2, target_modules=["0"], use_effective_conv2d=True)
    _, layer, delta = _adapt(nn.Conv2d(4, 6, 3), cfg)
    assert delta.cp and delta.path == "weight" and delta.hada_t1.shape == (2, 2, 3, 3)
    rebuild = [torch.einsum("ijkl,jr,ip->prkl", getattr(delta, f"hada_t{i}"), getattr(delta, f"hada_w{i}_b"),
                            getattr(delta, f"hada_w{i}_a")) for i in (1, 2)]
    assert torch.allclose(delta.delta_weight(layer), rebuild[0] * rebuild[1], rtol=1e-5, atol=1e-6)


# --- LoKr ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims,kwargs", [
    ((24, 40), dict(r=2)),  # w2 factored; (w1·X)·w2ᵀ order
    ((40, 24), dict(r=8)),  # w2 whole; the other order
    ((36, 28), dict(r=1, decompose_both=True, decompose_factor=4)),
    ((13, 20), dict(r=2)),  # a prime input dimension: c = 1
])
def test_lokr_activation_path_equals_kron(dims, kwargs):
    torch.manual_seed(0)
    _, layer, delta = _adapt(nn.Linear(*dims), lorakit.LoKrConfig(alpha=3, target_modules=["0"], **kwargs))
    assert delta.path == "activations"
    x = torch.randn(2, 3, dims[0])
    y = layer.base_layer(x)
    ref_w = torch.kron(delta.w1(), delta.w2()) * delta.scaling  # PEFT's make_kron
    assert ref_w.shape == (dims[1], dims[0])
    assert torch.allclose(delta.delta_weight(layer), ref_w, rtol=1e-5, atol=1e-6)
    results = {}
    for path in ("activations", "weight"):
        delta.path = path
        out = _delta_out(layer, delta, x, y)
        assert torch.allclose(out, F.linear(x, ref_w), rtol=1e-4, atol=1e-5), path
        results[path] = _grads(delta, out)
    _assert_same_grads(results["activations"], results["weight"])


@pytest.mark.parametrize("kind", ["conv1d", "conv2d"])
def test_lokr_conv_uses_peft_s_kron_layout(kind):
    make, inputs = LYCORIS_LAYERS[kind]
    _, layer, delta = _adapt(make(), lorakit.LoKrConfig(r=4, target_modules=["0"]))
    w1, w2 = delta.w1(), delta.w2()
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    ref_w = (torch.kron(w1, w2) * delta.scaling).reshape(layer.base_layer.weight.shape)
    x = inputs()
    out = _delta_out(layer, delta, x, layer.base_layer(x))
    assert torch.allclose(out, layer.base_layer._conv_forward(x, ref_w, None), rtol=1e-4, atol=1e-5)


# --- rank and module dropout (training only) ------------------------------------------------------------
@pytest.mark.parametrize("cls,scaled", [(lorakit.LoHaConfig, True), (lorakit.LoKrConfig, False)])
def test_rank_dropout_drops_output_rows(cls, scaled):
    torch.manual_seed(0)
    model, layer, delta = _adapt(nn.Linear(16, 24), cls(r=2, target_modules=["0"], rank_dropout=0.5))
    x = torch.randn(4, 16)
    with torch.no_grad():
        full = model(x) - layer.base_layer(x)  # eval: no dropout
        model.train()
        dropped = model(x) - layer.base_layer(x)
    ratio = dropped / full  # per output row: 0 (dropped) or one common factor (kept)
    kept = ratio.abs().amax(0) > 1e-6
    assert 0 < kept.sum() < 24
    factor = ratio[:, kept]
    assert torch.allclose(factor, factor[0, 0].expand_as(factor), rtol=1e-4)
    expected = 24 / kept.sum().item() if scaled else 1.0  # LoHa rescales by 1/mean(kept); LoKr by default not
    assert factor[0, 0].item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("cls", [lorakit.LoHaConfig, lorakit.LoKrConfig])
def test_module_dropout_skips_whole_adapter_in_training(cls):
    torch.manual_seed(0)
    model, layer, _ = _adapt(nn.Linear(16, 24), cls(r=2, target_modules=["0"], module_dropout=0.5))
    x = torch.randn(4, 16)
    with torch.no_grad():
        base, full = layer.base_layer(x), model(x)
        assert all(torch.equal(model(x), full) for _ in range(5))  # eval: always applied
        model.train()
        outs = [model(x) for _ in range(40)]
    skipped = sum(torch.equal(o, base) for o in outs)
    applied = sum(torch.allclose(o, full) for o in outs)
    assert skipped + applied == 40 and 0 < skipped < 40


# --- DoRA -------------------------------------------------------------------------------------------------
def _gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    return Conv1D(20, 12)  # weight [in=12, out=20]


DORA_LAYERS = {
    "linear": (lambda: nn.Linear(12, 20), lambda: torch.randn(3, 4, 12)),
    "linear_no_bias": (lambda: nn.Linear(12, 20, bias=False), lambda: torch.randn(3, 12)),
    "gpt2_conv1d": (_gpt2_conv1d, lambda: torch.randn(2, 5, 12)),
    "embedding": (lambda: nn.Embedding(30, 10), lambda: torch.randint(0, 30, (2, 7))),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), lambda: torch.randn(2, 4, 5, 5)),
}


def _dora_reference(layer, delta, x):
    """m ⊙ (W + s·BA)x / ‖W + s·BA‖_row + b, the norm detached, in the plain materialised form."""
    base = layer.base_layer
    w_c = delta.ops.from_layer_layout(base.weight)
    lora = (delta.lora_B.flatten(1) @ delta.lora_A.flatten(1)).view(w_c.shape) * delta.scaling
    merged = w_c + lora
    norm = merged.detach().flatten(1).norm(dim=1)
    scaled = merged * (delta.lora_magnitude_vector.flatten() / norm).view(-1, *(1,) * (merged.dim() - 1))
    if delta.ops.kind == "embedding":
        return F.embedding(x, scaled.t())
    if delta.ops.kind == "conv":
        return base._conv_forward(x, scaled, base.bias)
    return F.linear(x, scaled, base.bias)


@pytest.mark.parametrize("kind", DORA_LAYERS)
def test_dora_equals_reference_outputs_and_gradients(kind):
    make, inputs = DORA_LAYERS[kind]
    torch.manual_seed(0)
    model, layer, delta = _adapt(make(), lorakit.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_dora=True))
    x = inputs()
    w_c = delta.ops.from_layer_layout(layer.base_layer.weight)
    lora = (delta.lora_B.flatten(1) @ delta.lora_A.flatten(1)) * delta.scaling
    direct_norm = torch.linalg.norm(w_c.flatten(1) + lora, dim=1)
    assert torch.allclose(delta.weight_norm(w_c), direct_norm, rtol=1e-5)  # without materialising B·A
    ours, ref = model(x), _dora_reference(layer, delta, x)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5)
    _assert_same_grads(_grads(delta, ours), _grads(delta, ref))


def test_dora_magnitude_starts_at_the_row_norm_and_on_disk_shapes():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(6 * 9, 5))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["0", "2"], use_dora=True))
    mag_conv = model[0].deltas["default"].lora_magnitude_vector
    mag_lin = model[2].deltas["default"].lora_magnitude_vector
    assert mag_conv.shape == (1, 6, 1, 1) and mag_lin.shape == (5,)
    assert torch.allclose(mag_conv.flatten(), conv.weight.flatten(1).norm(dim=1))
    keys = lorakit.adapter_state_dict(model)
    assert "base_model.model.0.lora_magnitude_vector" in keys and not any(k.endswith("vector.weight") for k in keys)


def test_dora_dropout_path_feeds_the_dropped_input_to_w_as_peft():
    torch.manual_seed(0)
    cfg = lorakit.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_dora=True, lora_dropout=0.5)
    model, layer, delta = _adapt(nn.Linear(12, 20), cfg)
    mask = (torch.rand(3, 12) > 0.5).float() * 2

    class FixedDropout(nn.Dropout):
        def forward(self, x):
            return x * mask

    delta.dropout = FixedDropout(0.5)
    model.train()
    x = torch.randn(3, 12)
    xd = x * mask
    w = layer.base_layer.weight
    f = delta.lora_magnitude_vector / torch.linalg.norm(w + delta.scaling * delta.lora_B @ delta.lora_A, dim=1).detach()
    lora = xd @ delta.lora_A.t() @ delta.lora_B.t()
    expected = layer.base_layer(x) + (f - 1) * (xd @ w.t()) + f * delta.scaling * lora
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)


def test_dora_norm_follows_base_weight_changes():
    torch.manual_seed(0)
    model, layer, delta = _adapt(nn.Linear(12, 20), lorakit.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    x = torch.randn(4, 12)
    model(x)  # fills the ‖W‖² cache
    with torch.no_grad():
        layer.set_base_weight(layer.base_weight() * 1.5)
        assert torch.allclose(model(x), _dora_reference(layer, delta, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first", ["lora", "dora"])
def test_dora_merge_after_another_merged_adapter(first):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20)).eval()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["0"], use_dora=first == "dora"), name="a")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=3, target_modules=["0"], use_dora=True), name="b")
    randomise_adapters(model)
    w0 = model[0].base_weight().clone()
    lorakit.set_active(model, ["a", "b"])
    x = torch.randn(5, 12)
    with torch.no_grad():
        parallel = model(x)
        lorakit.merge(model)  # b's norm must come from W without a merged in, as in forward
        assert torch.allclose(model(x), parallel, rtol=1e-5, atol=1e-6)
        lorakit.unmerge(model)
    assert torch.allclose(model[0].base_weight(), w0, rtol=1e-5, atol=1e-6)


# --- configs and unsupported layers -----------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", [
    (lorakit.LoHaConfig, dict(r=0)),
    (lorakit.LoHaConfig, dict(rank_dropout=1.0)),
    (lorakit.LoHaConfig, dict(init_weights="lycoris")),
    (lorakit.LoKrConfig, dict(init_weights="gaussian")),
    (lorakit.LoKrConfig, dict(decompose_factor=0)),
    (lorakit.LoKrConfig, dict(module_dropout=-0.1)),
    (lorakit.AdaLoraConfig, dict()),  # total_step is required
    (lorakit.AdaLoraConfig, dict(total_step=10, tinit=6, tfinal=4)),
    (lorakit.AdaLoraConfig, dict(total_step=10, use_dora=True)),
    (lorakit.AdaLoraConfig, dict(total_step=10, init_lora_weights="pissa")),
    (lorakit.AdaLoraConfig, dict(total_step=10, init_r=4, rank_pattern={"0.lora_E": [True, False]})),
])
def test_invalid_configs_raise_config_error(cls, kwargs):
    with pytest.raises(lorakit.ConfigError):
        cls(target_modules=["0"], **kwargs)


@pytest.mark.parametrize("config", [
    lorakit.LoraConfig(target_modules=["0"], use_dora=True),
    lorakit.LoHaConfig(target_modules=["0"], r=2, alpha=4, rank_dropout=0.1, use_effective_conv2d=True),
    lorakit.LoKrConfig(target_modules=["0"], decompose_both=True, decompose_factor=4, init_weights="lycoris"),
    lorakit.AdaLoraConfig(target_modules=["0"], total_step=100, tinit=10, beta1=0.9),
])
def test_config_peft_dict_round_trip(config):
    data = config.to_peft_dict()
    assert data["peft_type"] == config.peft_type
    assert lorakit.core.registry.config_from_peft_dict(data) == config


@pytest.mark.parametrize("config,layer", [
    (lorakit.LoHaConfig(target_modules=["0"]), nn.Embedding(10, 4)),
    (lorakit.LoKrConfig(target_modules=["0"]), nn.Conv3d(2, 2, 1)),
    (lorakit.AdaLoraConfig(target_modules=["0"], total_step=5), nn.Embedding(10, 4)),
    (lorakit.AdaLoraConfig(target_modules=["0"], total_step=5), nn.Conv1d(2, 2, 1)),
])
def test_unsupported_layers_raise_and_leave_the_model_untouched(config, layer):
    model = nn.Sequential(layer)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lorakit.TargetError):
        lorakit.add_adapter(model, config)
    assert isinstance(model[0], type(layer)) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_variant_classes_are_registered():
    from lorakit.core.registry import DELTAS

    assert (DELTAS["DORA"], DELTAS["LOHA"], DELTAS["LOKR"], DELTAS["ADALORA"]) == (
        DoraDelta, LoHaDelta, LoKrDelta, AdaLoraDelta)
    cfg = lorakit.LoHaConfig(target_modules=["0"], r=4, alpha=8, rank_pattern={"y": 2}, alpha_pattern={"x": 2})
    assert math.isclose(cfg.alpha_for("a.x"), 2) and cfg.alpha_for("a.y") == 8 and cfg.rank_for("a.y") == 2
