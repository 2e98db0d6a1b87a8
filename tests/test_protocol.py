"""The low-rank protocol of core/delta.py: a variant defined here, in this test module only, with its own
config and parameter names ("down" / "up"), gets the fused linear of lorakit.optimize, the stacked per_row
path, exact combine and hot_swap without anything in lorakit.fast or lorakit.multi knowing it."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
import lorakit.fast.lora_linear as ll
from lorakit.fast import dropout as fast_dropout
from lorakit.fast import spec as fast_spec
import lorakit.multi.layer_plans as layer_plans
import lorakit.multi.routing as routing
from lorakit.core import registry
from lorakit.core.config import AdapterConfig
from lorakit.core.delta import Delta
from lorakit.core.registry import Variant, register
from lorakit.errors import TargetError


@dataclass
class ToyConfig(AdapterConfig):
    """ΔW = (gain / rank) · up · down."""

    peft_type: ClassVar[str] = "TOY_LOW_RANK"

    rank: int = 3
    gain: float = 2.0
    drop: float = 0.0

    def rank_for(self, module_name: str) -> int:
        return self.rank


class ToyDelta(Delta):
    factors_writable = True

    def __init__(self, ops, config: ToyConfig, module_name: str):
        if ops.kind != "linear" or ops.transposed:
            raise TargetError("the toy variant adapts nn.Linear only")
        super().__init__(ops, config, module_name)
        self.rank, self.gain = config.rank, config.gain / config.rank
        factory = {"device": ops.device, "dtype": ops.dtype}
        self.down = nn.Parameter(torch.randn(self.rank, ops.in_features, **factory) * 0.3)  # [rank, in]
        self.up = nn.Parameter(torch.randn(ops.out_features, self.rank, **factory) * 0.3)  # [out, rank]
        self.drop = float(config.drop)

    def forward(self, x, y, layer):
        x = F.dropout(x, self.drop, self.training) if self.drop else x
        return y + (self.gain * F.linear(F.linear(x.to(self.down.dtype), self.down), self.up)).to(y.dtype)

    def delta_weight(self, layer):
        return self.gain * (self.up.float() @ self.down.float())

    def peft_tensors(self):
        return {"down.weight": self.down, "up.weight": self.up}

    def low_rank_factors(self):
        return self.up.detach(), self.down.detach(), self.gain

    def linear_factors(self):
        return self.down, self.up, self.gain, self.drop

    @torch.no_grad()
    def set_low_rank_factors(self, b, a):
        k = b.shape[1]
        self.up.zero_()[:, :k] = b.to(self.up.dtype)
        self.down.zero_()[:k] = a.to(self.down.dtype)


TOY = Variant(ToyConfig.peft_type, ToyConfig, ToyDelta)


@pytest.fixture
def toy(monkeypatch):
    """The toy variant in the registry for one test (monkeypatch takes it out again)."""
    for table, key, value in ((registry.VARIANTS, TOY.name, TOY), (registry.DELTAS, TOY.name, ToyDelta),
                              (registry.CONFIGS, ToyConfig.peft_type, ToyConfig)):
        monkeypatch.setitem(table, key, value)
    register(TOY)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(12, 10)
        self.v = nn.Linear(12, 6, bias=False)
        self.out = nn.Linear(16, 5)
        self.double()

    def forward(self, x):
        return self.out(torch.cat([self.q(x), self.v(x)], -1))


def _model(names=("a",), seed=0, **kw):
    torch.manual_seed(seed)
    model = Tiny()
    for i, name in enumerate(names):
        torch.manual_seed(seed + 1 + i)
        config = ToyConfig(**({"target_modules": ["q", "v", "out"], "rank": 3 + i, "gain": 2.0 + i} | kw))
        lorakit.add_adapter(model, config, name)
    return model


def _spy_fused(monkeypatch):
    calls = []
    real = ll.FusedLoraLinears.apply

    def apply(*args):
        calls.append(len(args))
        return real(*args)

    monkeypatch.setattr(ll.FusedLoraLinears, "apply", apply)
    return calls


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def test_optimize_fuses_the_new_variant_with_equal_output_and_gradients(toy, monkeypatch):
    model = _model()
    x = torch.randn(4, 7, 12, dtype=torch.float64, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 6  # down and up of three layers
    ref = model(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *params])
    calls = _spy_fused(monkeypatch)
    assert lorakit.optimize(model)["linear"] == 3
    spec = fast_spec.layer_spec(model.q)
    assert spec is not None and spec[2][0][0] is model.q.deltas["a"].down  # the live parameters
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    assert len(calls) == 3
    assert _rel(out, ref) < 1e-12
    assert all(_rel(g, r) < 1e-12 for g, r in zip(grads, ref_grads))


def test_a_delta_with_dropout_is_fused_with_the_reference_mask(toy, monkeypatch):
    monkeypatch.setitem(fast_dropout.MASK_SOURCE, "cpu", "native")  # nn.Dropout's kernel: the reference's mask
    model = _model(drop=0.1)
    lorakit.optimize(model)
    calls = _spy_fused(monkeypatch)
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.manual_seed(5)
    ref = model.q.reference_forward(x)
    torch.manual_seed(5)
    out = model.q(x)
    assert len(calls) == 1 and _rel(out, ref) < 1e-12  # the same RNG draw: the same dropout mask
    model.eval()  # outside training the dropout is off: the same output on every call
    assert _rel(model.q(x), model.q.reference_forward(x)) < 1e-12 and len(calls) == 2


def _alone(model, name, x):
    lorakit.set_active(model, name)
    return model(x)


def test_per_row_stacks_the_new_variant_and_matches_each_adapter_alone(toy, monkeypatch):
    build = routing.build_stack
    model = _model(("a", "b"))
    names = ["a", "b", None, "b", "a"]
    x = torch.randn(5, 4, 12, dtype=torch.float64)
    with torch.no_grad():
        expected = torch.stack([_alone(model, n, x)[i] for i, n in enumerate(names)])
        with lorakit.per_row(model, names):
            out = model(x)
    assert model.q in layer_plans._STACKS and layer_plans._STACKS[model.q].stack.a.shape[0] == 3  # a, b, none
    assert _rel(out, expected) < 1e-6  # the stack keeps each scale in float32
    # training through a differentiable stack: each adapter's gradient comes from its own rows only
    stacked = []
    monkeypatch.setattr(routing, "build_stack", lambda deltas: stacked.append(len(deltas)) or build(deltas))
    with lorakit.per_row(model, names, impl="torch"):
        loss = model(x).square().sum()
    assert stacked == [2, 2, 2]
    grads = torch.autograd.grad(loss, [model.q.deltas["a"].down, model.q.deltas["b"].up])
    mine = [0, 4]
    lorakit.set_active(model, "a")
    ref_a = torch.autograd.grad(model(x[mine]).square().sum(), model.q.deltas["a"].down)[0]
    lorakit.set_active(model, "b")
    ref_b = torch.autograd.grad(model(x[[1, 3]]).square().sum(), model.q.deltas["b"].up)[0]
    assert _rel(grads[0], ref_a) < 1e-6 and _rel(grads[1], ref_b) < 1e-6


def test_combine_gives_the_exact_weighted_sum(toy):
    model = _model(("a", "b"))
    weights = {"a": 0.7, "b": -0.4}
    report = lorakit.combine(model, weights, name="ab")
    assert report.relative_error < 1e-12
    for layer in (model.q, model.v, model.out):
        want = sum(w * layer.deltas[n].delta_weight(layer) for n, w in weights.items())
        assert _rel(layer.deltas["ab"].delta_weight(layer), want) < 1e-6  # delta_weight is float32
    x = torch.randn(3, 12, dtype=torch.float64)
    with torch.no_grad(), lorakit.weighted(model, weights):
        expected = model(x)
    assert _rel(_alone(model, "ab", x), expected) < 1e-10


def test_hot_swap_writes_the_new_variant_in_place(toy, tmp_path):
    model = _model(seed=0)
    identity = {k: id(p) for k, p in model.named_parameters()}
    other = _model(seed=5, rank=2, gain=0.5, target_modules=["q", "out"])  # smaller rank, other scale, fewer layers
    directory = lorakit.save_adapter(other, tmp_path / "new", "a")
    x = torch.randn(3, 12, dtype=torch.float64)
    before = model(x)
    lorakit.hot_swap(model, "a", directory)
    torch.manual_seed(0)  # the same base as _model(seed=0)
    fresh = lorakit.load_adapter(Tiny(), directory)
    after = model(x)
    assert not torch.equal(after, before) and _rel(after, fresh(x)) < 1e-6  # the scale ratio is folded in fp32
    assert identity == {k: id(p) for k, p in model.named_parameters()}
    delta = model.q.deltas["a"]
    assert delta.down.shape[0] == 3 and not delta.down[2:].any()  # still the loaded rank, zero-padded
    assert not model.v.deltas["a"].up.any()  # a layer the new adapter skips: ΔW = 0
