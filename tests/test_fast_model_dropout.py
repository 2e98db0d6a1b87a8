"""The model's own dropout on CPU under optimize(): nn.Dropout modules and the sdpa attention dropout draw the
seeded hash masks (lorakit.fast.model_dropout), held to the math they replace: forward and every gradient equal
to x ⊙ m / (1 − p) with the same mask, attention equal to scaled_dot_product_attention's where dropout is the only
difference, the keep rate 1 − p, seeded runs repeated, checkpoint recompute drawing the same masks, and nothing
touched outside the optimized model's training forwards."""

import copy

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.fast import model_dropout
from lorakit.fast.dropout import draw_seed
from lorakit.fast.dropout_hash import keep_masks
from support import rel_norm


def _mask_of(seed_state: int, shape, p):
    """The 0/1 mask hash_dropout draws after torch.manual_seed(seed_state)."""
    torch.manual_seed(seed_state)
    return keep_masks(draw_seed(), [0], shape, p, torch.float32, "cpu")[0]


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 4, 33, 17), (70000,)])
def test_hash_dropout_is_x_times_its_mask_forward_and_backward(shape):
    p = 0.3
    x = torch.randn(shape, requires_grad=True)
    torch.manual_seed(11)
    y = model_dropout.hash_dropout(x, p)
    m = _mask_of(11, shape, p)
    torch.testing.assert_close(y, x.detach() * m * (1 / (1 - p)), rtol=0, atol=0)  # the kernel's rounding
    g = torch.randn(shape)
    (dx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(dx, m * g * (1 / (1 - p)), rtol=0, atol=0)


def test_hash_dropout_keeps_one_minus_p_and_each_call_draws_anew():
    x = torch.ones(200_000)
    a, b = model_dropout.hash_dropout(x, 0.1), model_dropout.hash_dropout(x, 0.1)
    for y in (a, b):
        kept = (y != 0).float().mean().item()
        assert abs(kept - 0.9) < 0.004  # ~6 standard deviations
        assert torch.all((y == 0) | ((y - 1 / 0.9).abs() < 1e-6))
    assert (a != b).float().mean() > 0.1  # a second call is another mask


@pytest.mark.parametrize("case", ["none", "bool", "float", "causal", "gqa", "empty_row"])
def test_hash_attention_equals_sdpa_but_for_the_dropout(monkeypatch, case):
    # with the mask engine made the identity, hash_attention must be sdpa with dropout_p=0 (masking, causal,
    # grouped heads, rows with nothing to attend) — forward and the gradients of q, k and v
    monkeypatch.setattr(model_dropout, "hash_dropout", lambda probs, p: probs)
    g = torch.Generator().manual_seed(0)
    hq, hkv = (4, 2) if case == "gqa" else (4, 4)
    q = torch.randn(2, hq, 6, 8, generator=g, requires_grad=True)
    k = torch.randn(2, hkv, 6, 8, generator=g, requires_grad=True)
    v = torch.randn(2, hkv, 6, 8, generator=g, requires_grad=True)
    mask, causal = None, False
    if case in ("bool", "empty_row"):
        mask = torch.rand(2, 1, 6, 6, generator=g) > 0.3
        mask[..., 0] = True
        if case == "empty_row":
            mask[1, 0, 2] = False  # query 2 of batch 1 attends to nothing: sdpa gives zeros there
    elif case == "float":
        mask = torch.randn(2, 1, 6, 6, generator=g)
    module = torch.nn.Module()
    module.is_causal = case == "causal"
    causal = case == "causal"
    out, weights = model_dropout.hash_attention(module, q, k, v, mask, 0.1, scaling=0.3)
    assert weights is None and out.shape == (2, 6, hq, 8)
    kr, vr = (k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)) if case == "gqa" else (k, v)
    want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, is_causal=causal, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    dy = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dy), torch.autograd.grad(want, (q, k, v), dy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_hash_attention_drops_the_probabilities_with_the_drawn_mask():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, requires_grad=True) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = False
    torch.manual_seed(5)
    out, _ = model_dropout.hash_attention(module, q, k, v, None, 0.25)
    m = _mask_of(5, (2, 3, 5, 5), 0.25)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    want = ((probs * m / 0.75) @ v).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    dy = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dy), torch.autograd.grad(want, (q, k, v), dy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.2,
                     attention_probs_dropout_prob=0.2, num_labels=2)
    model = BertForSequenceClassification(cfg)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  lora_dropout=0.1, task_type="SEQ_CLS", init_lora_weights=False))
    return model.train()


def _step(model, seed=3):
    batch = {"input_ids": torch.randint(1, 100, (4, 10), generator=torch.Generator().manual_seed(0)),
             "labels": torch.tensor([0, 1, 1, 0])}
    torch.manual_seed(seed)
    loss = model(**batch).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


def test_optimize_patches_the_models_own_dropout_and_attention(monkeypatch):
    ref = _tiny_bert()
    fast = copy.deepcopy(ref)
    taken = []
    real = model_dropout.hash_attention
    monkeypatch.setattr(model_dropout, "hash_attention", lambda *a, **k: taken.append(1) or real(*a, **k))
    counts = lorakit.optimize(fast)
    own = [m for n, m in fast.named_modules() if type(m) is torch.nn.Dropout and ".deltas." not in n]
    assert counts["dropout"] == len(own) == 3 * 2 + 2  # per layer: attention (its p), attention output, output;
    # the embeddings' and the head's
    assert all("forward" in m.__dict__ for m in own)
    assert not any("forward" in m.__dict__ for n, m in fast.named_modules() if ".deltas." in n)  # the reference's
    l1, g1 = _step(fast)
    assert len(taken) == 2  # each layer's attention
    l2, g2 = _step(fast)  # a seeded run repeats itself
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert len(taken) == 4
    l0, _ = _step(ref)
    assert len(taken) == 4  # the plain model's sdpa is transformers' own
    assert l0 != l1  # other masks (same distribution)
    ref.eval(), fast.eval()
    with torch.no_grad():
        ids = torch.randint(1, 100, (2, 7))
        torch.testing.assert_close(fast(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert len(taken) == 4  # no dropout in eval: nothing taken
    lorakit.unoptimize(fast)
    assert not any("forward" in m.__dict__ for m in fast.modules() if type(m) is torch.nn.Dropout)


def test_checkpoint_recompute_draws_the_same_masks():
    plain = _tiny_bert()
    ckpt = copy.deepcopy(plain)
    lorakit.optimize(plain)
    lorakit.optimize(ckpt, checkpoint=True)
    l0, g0 = _step(plain)
    l1, g1 = _step(ckpt)
    assert rel_norm(l1, l0) <= 1e-6
    for a, b in zip(g1, g0):
        assert rel_norm(a, b) <= 1e-5


def test_switched_off_the_models_dropout_is_torchs():
    model = _tiny_bert()
    counts = lorakit.optimize(model, dropout=False)
    assert counts["dropout"] == 0
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m) is torch.nn.Dropout)
    x = torch.ones(1000)
    assert model_dropout.takes_hash(x, 0.1) and not model_dropout.takes_hash(x, 0.0)
    assert not model_dropout.takes_hash(x, 1.0) and not model_dropout.takes_hash(x.long(), 0.1)


def test_the_wrapped_sdpa_function_is_transformers_own_for_every_call_it_does_not_take():
    from transformers import AttentionInterface

    lorakit.optimize(_tiny_bert())  # wraps the function (once per process)
    wrapped = AttentionInterface._global_mapping["sdpa"]
    original = wrapped.lorakit_original
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = False
    calls = [((), {"dropout": 0.0}), ((), {"dropout": 0.2, "position_bias": torch.zeros(1, 2, 4, 4)}),
             ((0.2,), {}), ((), {"dropout": 0.2, "output_attentions": True})]
    for args, kwargs in calls:
        with model_dropout.attention_scope():
            torch.manual_seed(0)
            got = wrapped(module, q, k, v, None, *args, **kwargs)[0]
        torch.manual_seed(0)
        want = original(module, q, k, v, None, *args, **kwargs)[0]
        assert torch.equal(got, want), (args, kwargs)
    torch.manual_seed(0)  # outside the scope: transformers' own, dropout or not
    got = wrapped(module, q, k, v, None, dropout=0.5)[0]
    torch.manual_seed(0)
    assert torch.equal(got, original(module, q, k, v, None, dropout=0.5)[0])


def test_torch_func_transforms_get_torchs_own_dropout():
    drop = torch.nn.Dropout(0.3).train()
    lorakit.optimize(torch.nn.Sequential(drop))
    assert "forward" in drop.__dict__
    x = torch.randn(50)
    torch.manual_seed(0)
    dx = torch.func.grad(lambda t: drop(t).sum())(x)  # HashDropout has no setup_context: torch's dropout serves
    assert torch.all((dx == 0) | ((dx - 1 / 0.7).abs() < 1e-6)) and (dx == 0).any() and (dx != 0).any()


def test_half_precision_attention_runs_in_float32_and_takes_a_float32_mask():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    mask = torch.randn(2, 1, 5, 5, generator=g)  # a float32 additive mask, as transformers may pass with bf16
    module = torch.nn.Module()
    module.is_causal = False
    torch.manual_seed(4)
    want, _ = model_dropout.hash_attention(module, q, k, v, mask, 0.2)
    torch.manual_seed(4)
    got, _ = model_dropout.hash_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 0.2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)  # bf16 inputs, float32 softmax


def test_without_safe_softmax_the_call_goes_to_transformers(monkeypatch):
    monkeypatch.setattr(model_dropout, "_SAFE_SOFTMAX", None)
    taken = []
    monkeypatch.setattr(model_dropout, "hash_attention", lambda *a, **k: taken.append(1))
    model = _tiny_bert()
    lorakit.optimize(model)
    _step(model)
    assert not taken
