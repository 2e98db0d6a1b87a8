"""The fused linear with an output-scaled delta (DoRA) against the reference: forward and every gradient (x, A, B,
the magnitude, trained biases), alone and grouped; the cases it leaves to the reference name their reason."""

import pytest
import torch
from torch import nn

import lorakit
import lorakit.fast.lora_linear as ll
from lorakit.fast.lora_linear import fused_linears, lora_linear_fast_path
from support import one_thread, randomise_adapters, rel_norm, Siblings  # noqa: F401




def _dora(dtype=torch.float64, targets=("q", "k", "v"), name="default", model=None, **kw):
    torch.manual_seed(0)
    model = model or Siblings(dtype)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), use_dora=True, **kw)
    lorakit.add_adapter(model, config, name=name)
    randomise_adapters(model, seed=2)  # B ≠ 0 and m ≠ ‖W‖: no term is a no-op
    return model


def _grads(outs, inputs):
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    return torch.autograd.grad(outs, inputs, cot, allow_unused=True)


def _assert_close(a, b, tol):
    for u, v in zip(a, b):
        assert (u is None) == (v is None)
        if u is not None:
            assert u.shape == v.shape and rel_norm(u, v) <= tol


@pytest.fixture(params=[True, False], ids=["rank_major", "natural"])
def form(request, monkeypatch):
    monkeypatch.setitem(ll.RANK_MAJOR, "cpu", request.param)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_layer_matches_the_reference(dtype, form):
    m = _dora(dtype, ["q"], bias="all")
    m.q.fast_path = lora_linear_fast_path
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any("magnitude" in n for n in names) and any(n.endswith("q.bias") or "q.base_layer.bias" in n for n in names)
    ref, out = (m.q.reference_forward(x),), (m.q(x),)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    _assert_close(out, ref, tol)
    _assert_close(_grads(out, [x, *params]), _grads(ref, [x, *params]), tol)


def test_grouped_projections_match_the_reference(form):
    m = _dora(bias="lora_only")
    x = torch.randn(4, 6, 24, dtype=torch.float64, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]
    layers = (m.q, m.k, m.v)
    ref = tuple(layer.reference_forward(x) for layer in layers)
    out = fused_linears(x, layers)
    assert out is not None
    _assert_close(out, ref, 1e-12)
    _assert_close(_grads(out, [x, *params]), _grads(ref, [x, *params]), 1e-12)


def test_a_gpt2_conv1d_layer_reads_its_weight_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 20)).double()  # weight stored [in, out]
    lorakit.add_adapter(model, lorakit.LoraConfig(r=3, target_modules=["0"], use_dora=True))
    randomise_adapters(model, seed=3)
    layer = model[0]
    layer.fast_path = lora_linear_fast_path
    x = torch.randn(5, 20, dtype=torch.float64, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    ref, out = (layer.reference_forward(x),), (layer(x),)
    _assert_close(out, ref, 1e-12)
    _assert_close(_grads(out, [x, *params]), _grads(ref, [x, *params]), 1e-12)


def test_dropout_in_training_is_left_to_the_reference_with_its_reason():
    m = _dora(torch.float32, ["q"], lora_dropout=0.1)
    lorakit.optimize(m)
    (path, reason), = lorakit.fusion_report(m)
    assert path == "q" and "no fused form" in reason
    x = torch.randn(4, 24)
    torch.manual_seed(3)
    out = m.q(x)
    torch.manual_seed(3)
    assert torch.equal(out, m.q.reference_forward(x))
    m.eval()  # no dropout outside training: fused
    assert lorakit.fusion_report(m) == []
    assert rel_norm(m.q(x), m.q.reference_forward(x)) < 2e-6


def test_with_another_active_adapter_it_is_left_to_the_reference():
    m = _dora(torch.float32, ["q"])
    lorakit.add_adapter(m, lorakit.LoraConfig(r=2, target_modules=["q"]), name="plain")
    lorakit.set_active(m, ["default", "plain"])
    lorakit.optimize(m)
    assert lorakit.fusion_report(m) == [("q", "an output-scaled adapter (magnitude) is active together with "
                                               "other adapters")]
