"""optimize()'s report: every adapted layer that will not run fused, with its reason (its own state, or what its
last call brought); autocast and trained biases run fused and equal the reference."""

import logging

import pytest
import torch
from torch import nn

import lorakit
import lorakit.fast.lora_linear as ll
from support import one_thread, rel_norm  # noqa: F401


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fused = nn.Linear(16, 16)
        self.conv = nn.Conv1d(16, 16, 3)
        self.emb = nn.Embedding(10, 16)
        self.other = nn.Linear(16, 16)
        self.bf16 = nn.Linear(16, 16)
        self.trained = nn.Linear(16, 16)
        self.loha = nn.Linear(16, 16)


def _mixed():
    torch.manual_seed(0)
    m = Mixed()
    lorakit.add_adapter(m, lorakit.LoraConfig(r=2, target_modules=["fused", "conv", "emb", "bf16", "trained"]))
    lorakit.add_adapter(m, lorakit.LoHaConfig(r=2, target_modules=["loha"]), name="loha")
    lorakit.set_active(m, ["default", "loha"])
    m.bf16.base_layer.to(torch.bfloat16)  # its adapter stays float32
    m.trained.base_layer.weight.requires_grad_(True)
    return m


EXPECTED = [
    ("conv", "not a linear layer (conv)"),
    ("emb", "not a linear layer (embedding)"),
    ("bf16", "adapter 'default' is torch.float32, the base weight torch.bfloat16 (fused under autocast)"),
    ("trained", "the base weight is trained"),
    ("loha", "adapter 'loha' (LoHaDelta) has no fused form in this mode"),
]


def test_the_report_names_every_layer_that_is_not_fused_with_its_reason(caplog):
    m = _mixed()
    with caplog.at_level(logging.INFO, logger="lorakit.fast"):
        counts = lorakit.optimize(m, report=True)
    assert counts["linear"] == 4 and counts["not_fused"] == len(EXPECTED)
    assert sorted(lorakit.fusion_report(m)) == sorted(EXPECTED)
    text = caplog.text
    assert "5 adapted layer(s) take the reference path" in text
    assert all(f"  {path}: {reason}" in text for path, reason in EXPECTED)


def test_before_optimize_every_linear_is_reported_as_not_optimized():
    m = _mixed()
    rows = dict(lorakit.fusion_report(m))
    assert rows["fused"] == "optimize() not applied" and rows["conv"] == "not a linear layer (conv)"


def test_state_changes_show_in_the_report():
    m = nn.Sequential(nn.Linear(8, 8))
    lorakit.add_adapter(m, lorakit.LoraConfig(r=2, target_modules=["0"]))
    lorakit.optimize(m)
    assert lorakit.fusion_report(m) == []
    lorakit.merge(m)
    assert lorakit.fusion_report(m) == [("0", "adapters merged into the base weight")]
    lorakit.unmerge(m)
    lorakit.set_active(m, None)
    assert lorakit.fusion_report(m) == [("0", "no active adapter on this layer")]


def test_an_empty_report_is_logged_at_info(caplog):
    m = nn.Sequential(nn.Linear(8, 8))
    lorakit.add_adapter(m, lorakit.LoraConfig(r=2, target_modules=["0"]))
    with caplog.at_level(logging.INFO, logger="lorakit.fast"):
        assert lorakit.optimize(m, report=True)["not_fused"] == 0
    assert "every adapted layer runs fused" in caplog.text


def test_autocast_runs_fused_casting_as_autocast_does(monkeypatch):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 24))
    lorakit.add_adapter(m, lorakit.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, bias="all"))
    lorakit.optimize(m)
    calls = []
    real = ll.FusedLoraLinears.apply
    monkeypatch.setattr(ll.FusedLoraLinears, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(6, 32, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = m[0].reference_forward(x)
        out = m[0](x)
    assert calls and out.dtype == ref.dtype == torch.bfloat16
    assert rel_norm(out, ref) < 2e-2
    cot = torch.randn(out.shape, dtype=out.dtype)
    for a, b, p in zip(torch.autograd.grad(out, [x, *params], cot), torch.autograd.grad(ref, [x, *params], cot),
                       [x, *params]):
        assert a.dtype == p.dtype == torch.float32 and rel_norm(a, b) < 3e-2  # fp32 gradients, bf16 math
    assert lorakit.fusion_report(m) == []


def test_adapters_in_another_dtype_than_the_base_fuse_under_autocast(monkeypatch):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 24))
    lorakit.add_adapter(m, lorakit.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    m[0].base_layer.to(torch.bfloat16)  # a bf16 base, float32 adapters (master weights), as under mixed precision
    lorakit.optimize(m)
    calls = []
    real = ll.FusedLoraLinears.apply
    monkeypatch.setattr(ll.FusedLoraLinears, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = m[0](x), m[0].reference_forward(x)
    assert calls and rel_norm(out, ref) < 2e-2


def test_autocast_over_a_4bit_base_in_another_dtype_is_reported():
    torch.manual_seed(0)
    m = lorakit.quantize(nn.Sequential(nn.Linear(32, 24)), compute_dtype=torch.float32, targets=["0"])
    lorakit.add_adapter(m, lorakit.LoraConfig(r=4, target_modules=["0"]))
    lorakit.optimize(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randn(2, 32))
    assert lorakit.fusion_report(m) == [
        ("0", "at its last call: autocast to torch.bfloat16 over a 4-bit base computing in torch.float32")]


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_get_their_gradient_from_the_fused_path(bias):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 6))
    lorakit.add_adapter(m, lorakit.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False, bias=bias))
    biases = [p for n, p in m.named_parameters() if n.endswith("bias") and p.requires_grad]
    assert len(biases) == (2 if bias == "all" else 1)
    x = torch.randn(5, 12)
    ref = torch.autograd.grad(m(x).square().sum(), biases)
    lorakit.optimize(m)
    out = torch.autograd.grad(m(x).square().sum(), biases)
    assert all(rel_norm(a, b) < 1e-6 for a, b in zip(out, ref))
