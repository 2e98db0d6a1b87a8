"""The fused linear with lora_dropout > 0 against the reference. With nn.Dropout's own kernel as the mask source
(CUDA's default) the same RNG state gives the same mask, so the forward and every gradient (x, A, B, trained
biases) match, grouped q/k/v drawing their masks in the reference's order; with the CPU's random-bits masks
both paths are given the same fixed masks, and the masks themselves are checked for their keep rate."""

import pytest
import torch
import torch.nn.functional as F

import lorakit
import lorakit.fast.lora_linear as ll
from lorakit.fast import dropout as fast_dropout
from lorakit.fast.lora_linear import fused_linears, lora_linear_fast_path
from support import one_thread, rel_norm, Siblings  # noqa: F401




def _adapted(dtype, targets=("q", "k", "v"), name="default", model=None, **kw):
    torch.manual_seed(0)
    model = model or Siblings(dtype)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, **kw)
    lorakit.add_adapter(model, config, name=name)
    return model


def _run(fn, seed, x, params):
    torch.manual_seed(seed)  # the dropout masks come from this RNG state
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    return outs, torch.autograd.grad(outs, [x, *params], cot, allow_unused=True)


def _assert_close(a_outs, a_grads, b_outs, b_grads, tol):
    for a, b in zip((*a_outs, *a_grads), (*b_outs, *b_grads)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and rel_norm(a, b) <= tol


@pytest.fixture(params=[True, False], ids=["rank_major", "natural"])
def form(request, monkeypatch):
    monkeypatch.setitem(ll.RANK_MAJOR, "cpu", request.param)


@pytest.fixture(autouse=True)
def native_masks(monkeypatch):
    """nn.Dropout's own kernel on the CPU too (CUDA's default): masks equal the reference's for one RNG state."""
    monkeypatch.setitem(fast_dropout.MASK_SOURCE, "cpu", "native")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_layer_with_dropout_matches_the_reference(dtype, form):
    m = _adapted(dtype, ["q"], lora_dropout=0.1, bias="all")
    m.q.fast_path = lora_linear_fast_path
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]
    assert len(params) == 4  # A, B and the biases of q and v (v's gets no gradient here)
    ref = _run(m.q.reference_forward, 7, x, params)
    out = _run(m.q, 7, x, params)
    _assert_close(*out, *ref, 1e-12 if dtype == torch.float64 else 1e-6)
    assert ref[0][0].ne(_run(m.q.reference_forward, 8, x, params)[0][0]).any()  # the mask matters


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_projections_draw_masks_in_the_reference_order(dtype, form):
    m = _adapted(dtype, lora_dropout=0.25, bias="lora_only")
    x = torch.randn(4, 6, 24, dtype=dtype, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]
    layers = (m.q, m.k, m.v)
    ref = _run(lambda t: tuple(layer.reference_forward(t) for layer in layers), 3, x, params)
    out = _run(lambda t: fused_linears(t, layers), 3, x, params)
    _assert_close(*out, *ref, 1e-12 if dtype == torch.float64 else 1e-6)


def test_terms_with_and_without_dropout_in_one_call(form):
    m = _adapted(torch.float64, lora_dropout=0.2)
    _adapted(torch.float64, ["q", "v"], name="plain", model=m)  # no dropout: reads x itself
    lorakit.set_active(m, ["default", "plain"])
    x = torch.randn(10, 24, dtype=torch.float64, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]
    layers = (m.q, m.k, m.v)
    ref = _run(lambda t: tuple(layer.reference_forward(t) for layer in layers), 11, x, params)
    out = _run(lambda t: fused_linears(t, layers), 11, x, params)
    _assert_close(*out, *ref, 1e-12)


def test_outside_training_dropout_is_off_and_the_layer_still_fuses(monkeypatch):
    m = _adapted(torch.float32, ["q"], lora_dropout=0.5).eval()
    lorakit.optimize(m)
    calls = []
    real = ll.FusedLoraLinears.apply
    monkeypatch.setattr(ll.FusedLoraLinears, "apply", lambda *a: calls.append(a[5]) or real(*a))
    x = torch.randn(4, 24)
    assert torch.allclose(m.q(x), m.q.reference_forward(x), atol=1e-6, rtol=1e-6)
    assert calls and calls[0][0][5] == (False,)  # layout: the term reads x itself, no mask drawn
    assert lorakit.fusion_report(m) == []


@pytest.mark.parametrize("source", ["native", "bits"])
def test_the_mask_is_kept_as_bool_not_as_a_float_copy(source, monkeypatch):
    monkeypatch.setitem(fast_dropout.MASK_SOURCE, "cpu", source)
    m = _adapted(torch.float32, ["q"], lora_dropout=0.1)
    lorakit.optimize(m)
    x = torch.randn(64, 24, requires_grad=True)
    y = m.q(x)
    seen, stack = [], [y.grad_fn]
    while stack:  # every tensor autograd keeps for the dropout
        n = stack.pop()
        if n is None:
            continue
        if "NativeDropout" in type(n).__name__:
            seen.append(n._saved_result1)
        elif "MaskedScale" in type(n).__name__:
            seen += n.saved_tensors
        stack += [f for f, _ in n.next_functions]
    assert len(seen) == 1 and seen[0].dtype == torch.bool and seen[0].shape == x.shape


def test_random_bits_masks_keep_each_element_with_probability_one_minus_p():
    x = torch.empty(400, 500)
    torch.manual_seed(0)
    a = fast_dropout.bits_mask(x, 0.1)
    torch.manual_seed(0)
    assert torch.equal(a, fast_dropout.bits_mask(x, 0.1))  # from torch's RNG: seeded runs repeat
    b = fast_dropout.bits_mask(x, 0.1)
    assert not torch.equal(a, b)
    for p in (0.05, 0.1, 0.5):
        rate = fast_dropout.bits_mask(x, p).float().mean().item()
        assert abs(rate - (1 - p)) < 5 * ((p * (1 - p) / x.numel()) ** 0.5)  # 5 standard deviations
    odd = fast_dropout.bits_mask(torch.empty(3, 7), 0.3)  # an odd element count
    assert odd.shape == (3, 7) and odd.dtype == torch.bool


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_random_bits_masks_give_the_reference_math_for_the_same_masks(dtype, monkeypatch):
    monkeypatch.setitem(fast_dropout.MASK_SOURCE, "cpu", "bits")
    m = _adapted(dtype, lora_dropout=0.2, bias="all")
    x = torch.randn(4, 6, 24, dtype=dtype, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(9)
    masks = [torch.rand(x.shape, generator=g) >= 0.2 for _ in range(3)]  # q, k, v in the reference's order
    queue = []
    monkeypatch.setattr(fast_dropout, "bits_mask", lambda t, p: queue.pop(0))
    real_dropout = F.dropout

    def fixed_dropout(t, p=0.5, training=True, inplace=False):
        return t * queue.pop(0) / (1 - p) if training and p > 0 else real_dropout(t, p, training, inplace)

    monkeypatch.setattr(F, "dropout", fixed_dropout)
    layers = (m.q, m.k, m.v)
    queue[:] = list(masks)
    ref = _run(lambda t: tuple(layer.reference_forward(t) for layer in layers), 0, x, params)
    queue[:] = list(masks)
    out = _run(lambda t: fused_linears(t, layers), 0, x, params)
    assert not queue
    _assert_close(*out, *ref, 1e-12 if dtype == torch.float64 else 1e-6)
