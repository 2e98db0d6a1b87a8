"""QLoRA on lorakit's own NF4 base: NF4Linear, quantize/dequantize, every variant on top, merging honestly."""

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.api import count_parameters
from lorakit.quant import NF4Linear, quantize_nf4
from lorakit.quant.nf4 import dequantize_nf4_reference
from variants import VARIANTS

LINEAR_VARIANTS = [pytest.param(v, id=v.name) for v in VARIANTS if "linear" in v.layer_kinds]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(80, 48), nn.GELU(), nn.Linear(48, 24), nn.GELU(), nn.Linear(24, 6))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _train(model, x, steps=2, lr=1e-2):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(steps):
        loss = model(x, labels=x).loss
        extra = [e for e in (h.extra_loss() for h in lorakit.training_hooks(model)) if e is not None]
        (loss + sum(extra)).backward()  # (no after_step: AdaLoRA's rank schedule is not what these tests are about)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


# --- the layer ------------------------------------------------------------------------------------------------
def test_nf4_linear_forward_and_backward_equal_a_dense_layer_with_the_dequantized_weight():
    torch.manual_seed(0)
    dense = nn.Linear(80, 48)
    q = NF4Linear.from_linear(dense, compute_dtype=torch.float32)
    q.bias.requires_grad_(True)  # bias="all" trains base biases: their gradient must flow too
    ref = nn.Linear(80, 48)
    with torch.no_grad():
        ref.weight.copy_(dequantize_nf4_reference(quantize_nf4(dense.weight)))
        ref.bias.copy_(dense.bias)
    x1 = torch.randn(3, 5, 80, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(3, 5, 48)
    y1, y2 = q(x1), ref(x2)
    assert torch.allclose(y1, y2, atol=1e-6)
    y1.backward(g)
    y2.backward(g)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6)
    assert torch.allclose(q.bias.grad, ref.bias.grad, atol=1e-5)


def test_nf4_linear_with_the_triton_kernel_equals_the_reference_product(kernel_device):
    """The layer dequantizes with the Triton kernel (on CUDA, or in Triton's interpreter on CPU)."""
    dev = kernel_device
    tokens = 64 if dev == "cuda" else 8
    dense = nn.Linear(512, 384, device=dev)
    q = NF4Linear.from_linear(dense, compute_dtype=torch.bfloat16)
    w = dequantize_nf4_reference(q.nf4(), torch.bfloat16)  # the pure-torch reference, on the same device
    x = torch.randn(4, tokens, 512, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4, tokens, 384, device=dev, dtype=torch.bfloat16)
    y = q(x)
    assert torch.equal(y, torch.nn.functional.linear(x.detach(), w, q.bias))
    y.backward(g)
    assert torch.equal(x.grad, g @ w)


def test_backward_keeps_no_dense_copy_of_the_4bit_weight():
    """Autograd must not save W (that would undo the memory saving): the backward dequantizes again."""
    shapes = {(48, 80), (80, 48), (24, 48), (48, 24), (6, 24), (24, 6)}

    def saved_weight_shapes(model):
        seen = []
        x = torch.randn(4, 80, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(tuple(t.shape)) or t, lambda t: t):
            model(x).sum().backward()
        return shapes & set(seen)

    dense = _mlp()
    lorakit.add_adapter(dense, lorakit.LoraConfig(r=4, target_modules=["0", "2", "4"]))
    assert saved_weight_shapes(dense), "the check must see a dense layer's saved weight"
    model = lorakit.quantize(_mlp(), targets=["0", "2", "4"], compute_dtype=torch.float32)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["0", "2", "4"]))
    assert saved_weight_shapes(model) == set()


def test_scales_survive_dtype_casts_copies_and_state_dicts():
    model = lorakit.quantize(_mlp(), targets=["0", "2"])
    want = model[0].dense_weight(torch.float32)
    model.to(torch.float16)  # casts float params; the NF4 scales are stored as bit patterns and must not move
    assert torch.equal(model[0].dense_weight(torch.float32), want)
    assert torch.equal(copy.deepcopy(model)[0].dense_weight(torch.float32), want)
    other = lorakit.quantize(_mlp(), targets=["0", "2"], block_size=64)
    with torch.no_grad():
        other[0].weight.zero_()
    other.load_state_dict(model.state_dict())
    assert torch.equal(other[0].dense_weight(torch.float32), want)


# --- quantize(): which layers ------------------------------------------------------------------------------------
def test_quantize_keeps_heads_embeddings_and_skipped_modules(minilm_cls):
    model = lorakit.quantize(minilm_cls, skip=["attention.output"])
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["classifier"] == "Linear" and kinds["bert.embeddings.word_embeddings"] == "Embedding"
    assert kinds["bert.encoder.layer.0.attention.self.query"] == "NF4Linear"
    assert kinds["bert.encoder.layer.0.attention.output.dense"] == "Linear"  # skipped subtree
    assert kinds["bert.encoder.layer.0.output.dense"] == "NF4Linear"
    assert sum(k == "NF4Linear" for k in kinds.values()) == 6 * 5 + 1  # q,k,v, intermediate, output; + pooler


def test_quantize_targets_can_name_a_head(tiny_llama):
    model = lorakit.quantize(tiny_llama, targets=["lm_head", "q_proj"])
    assert isinstance(model.lm_head, NF4Linear) and isinstance(model.model.layers[1].self_attn.q_proj, NF4Linear)
    assert isinstance(model.model.layers[1].self_attn.k_proj, nn.Linear)


def test_quantize_rejects_bad_options_and_leaves_the_model_alone(tiny_llama, tiny_gpt2):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    for kwargs, match in [({"bits": 8}, "4 bits"), ({"quant_type": "fp4"}, "NF4"), ({"block_size": 100}, "block_size"),
                          ({"compute_dtype": torch.int8}, "compute_dtype")]:
        with pytest.raises(lorakit.ConfigError, match=match):
            lorakit.quantize(tiny_llama, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())
    with pytest.raises(lorakit.TargetError, match="Conv1D"):
        lorakit.quantize(tiny_gpt2)  # GPT-2 has Conv1D layers only (and its head)
    with pytest.raises(lorakit.TargetError, match="no 4-bit layer"):
        lorakit.dequantize(tiny_llama)
    with torch.device("meta"):
        meta = _mlp()
    with pytest.raises(lorakit.ConfigError, match="meta"):
        lorakit.quantize(meta, targets=["0"])


def test_trainable_report_counts_4bit_weights_per_value_as_peft_does(tiny_llama):
    dense_total = sum(p.numel() for p in tiny_llama.parameters())
    lorakit.quantize(tiny_llama)
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    lora = sum(p.numel() for n, p in tiny_llama.named_parameters() if "deltas" in n)
    assert count_parameters(tiny_llama) == (lora, dense_total + lora)
    assert "trainable: 8,192 || all params: 98,624" in lorakit.trainable_report(tiny_llama)


def test_adapters_take_the_dtype_the_layer_had_before_quantization():
    for dtype in (torch.float32, torch.bfloat16):
        model = lorakit.quantize(_mlp().to(dtype), targets=["0", "2"], compute_dtype=torch.bfloat16)
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["0", "2"]))
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {dtype}


# --- every variant on an NF4 base -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
def test_every_variant_trains_saves_and_merges_on_an_nf4_base(variant, tiny_llama, tmp_path):
    x = torch.randint(0, 128, (2, 9))
    original = copy.deepcopy(tiny_llama)
    model = lorakit.quantize(tiny_llama, compute_dtype=torch.float32)
    base_out = _logits(model, x)
    packed = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    lorakit.add_adapter(model, variant.make("all-linear", True))
    if variant.noop_at_init:
        assert torch.allclose(_logits(model, x), base_out, atol=1e-6)
    model, losses = _train(model, x, steps=3, lr=3e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    trained = _logits(model, x)
    assert (trained - base_out).abs().max() > 1e-4, "training must move the adapter"
    assert all(torch.equal(m.weight, packed[n.replace(".base_layer", "")]) for n, m in model.named_modules()
               if isinstance(m, NF4Linear)), "the 4-bit base is frozen"

    lorakit.save_adapter(model, tmp_path / "a")
    fresh = lorakit.quantize(original, compute_dtype=torch.float32)
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(_logits(fresh, x), trained)

    lorakit.dequantize(model)  # exact: the dense weight is the one the 4-bit layer multiplied by
    assert torch.equal(_logits(model, x), trained)
    lorakit.unload(model, merge=True)
    assert not any(isinstance(m, (NF4Linear, lorakit.core.adapted.AdaptedLayer)) for m in model.modules())
    assert torch.allclose(_logits(model, x), trained, atol=1e-5)


# --- merging: refuse by default, dequantize for exact, requantize on request ------------------------------------------
def _trained_qlora(tiny_llama, compute_dtype=torch.float32):
    model = lorakit.quantize(tiny_llama, compute_dtype=compute_dtype)
    torch.manual_seed(3)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    return model


def test_merge_into_a_4bit_base_refuses_and_changes_nothing(tiny_llama):
    x = torch.randint(0, 128, (2, 9))
    model = _trained_qlora(tiny_llama)
    before = _logits(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for op in (lorakit.merge, lambda m: lorakit.unload(m, merge=True)):
        with pytest.raises(lorakit.QuantizedBaseError, match="dequantize"):
            op(model)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert not any(layer.merged for _, layer in lorakit.adapted_layers(model))
        assert torch.equal(_logits(model, x), before)
    with lorakit.disabled(model):  # nothing merged: disabling never writes the base
        assert not torch.equal(_logits(model, x), before)


def test_dequantize_then_unload_gives_a_dense_compute_dtype_model(tiny_llama):
    x = torch.randint(0, 128, (2, 9))
    model = _trained_qlora(tiny_llama.to(torch.bfloat16), compute_dtype=torch.bfloat16)
    adapted = _logits(model, x)
    lorakit.dequantize(model)
    assert torch.equal(_logits(model, x), adapted)  # same weights, same dtype: the same function
    lorakit.unload(model, merge=True)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 15 and all(m.weight.dtype == torch.bfloat16 and type(m) is nn.Linear for m in linears)
    err = (_logits(model, x).float() - adapted.float()).abs().max()
    assert err < 0.03 * adapted.float().abs().max()  # the merged weight is rounded to bf16 once


def test_dequantize_an_fp32_model_keeps_it_runnable_in_fp32(tiny_llama):
    x = torch.randint(0, 128, (2, 9))
    model = _trained_qlora(tiny_llama, compute_dtype=torch.bfloat16)  # fp32 model, bf16 compute
    adapted = _logits(model, x)
    lorakit.dequantize(model)
    assert model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.float32
    assert (_logits(model, x) - adapted).abs().max() < 0.03 * adapted.abs().max()  # fp32 matmuls instead of bf16


def test_merge_requantized_reports_the_rounding_error(tiny_llama):
    x = torch.randint(0, 128, (2, 9))
    model = _trained_qlora(tiny_llama)
    adapted = _logits(model, x)
    base_out = _logits(_base_of(model), x)
    with pytest.warns(UserWarning, match="rounded away"):
        report = lorakit.merge_requantized(model)
    assert len(report) == 14 and all(r.adapter > 0 and r.rounding > 0 for r in report.values())
    assert not any(isinstance(m, lorakit.core.adapted.AdaptedLayer) for m in model.modules())
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 14  # still 4-bit
    merged = _logits(model, x)
    # the requantized model sits near the adapted one, much nearer than the base does (init_lora_weights=False: big ΔW)
    assert (merged - adapted).norm() < 0.5 * (base_out - adapted).norm()


def _base_of(model):
    clone = copy.deepcopy(model)
    lorakit.unload(clone, merge=False)
    return clone


def test_quantize_after_adding_an_adapter_puts_the_adapter_on_the_4bit_base(tiny_llama):
    """E.g. QPiSSA: initialise on the dense weight, then quantize the residual; the adapter stays as it is."""
    x = torch.randint(0, 128, (2, 9))
    torch.manual_seed(1)
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa"))
    a_before = {n: p.clone() for n, p in tiny_llama.named_parameters() if p.requires_grad}
    lorakit.quantize(tiny_llama, compute_dtype=torch.float32)
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, NF4Linear) and layer.deltas["default"].ops.layer is layer.base_layer
    assert all(torch.equal(p, a_before[n]) for n, p in tiny_llama.named_parameters() if p.requires_grad)
    out = _logits(tiny_llama, x)
    with lorakit.disabled(tiny_llama):
        base_out = _logits(tiny_llama, x)
    assert not torch.equal(out, base_out) and torch.isfinite(out).all()
