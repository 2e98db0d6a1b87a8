"""Models loaded by transformers with bitsandbytes 4-bit (CPU path of bnb ≥ 0.47): lorakit adapts, trains and saves
them in PEFT's layout, and PEFT loads the adapter onto the same bnb model with the same outputs."""

import pytest
import torch

import lorakit
from lorakit.core.api import count_parameters
from lorakit.quant import NF4Linear
from lorakit.quant.bnb import nf4_from_bnb
from lorakit.quant.nf4 import dequantize_nf4_reference

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _load_4bit(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu").eval()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_train_on_bnb_4bit_save_and_peft_loads_it_with_the_same_outputs(llama_dir, tmp_path, use_dora):
    import peft
    from peft import PeftModel, get_peft_model

    x = torch.randint(0, 128, (2, 9))
    model = _load_4bit(llama_dir)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora)
    lorakit.add_adapter(model, config)
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora)
    peft_count = get_peft_model(_load_4bit(llama_dir), peft_config).get_nb_trainable_parameters()
    assert count_parameters(model) == peft_count

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(3):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    lorakit.save_adapter(model, tmp_path / "a")

    peft_model = PeftModel.from_pretrained(_load_4bit(llama_dir), tmp_path / "a")
    # Compared in train mode (no dropout anywhere): in eval mode on an AVX512-bf16 CPU bnb repacks its weights for
    # its own kernel and PEFT's DoRA then dequantizes the repacked bytes as if they were plain (a PEFT bug).
    model.train(), peft_model.train()
    with torch.no_grad():
        ours, theirs = model(x).logits, peft_model(x).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_base_weight_reads_right_after_bnb_repacks_for_its_cpu_kernel(llama_dir):
    model = _load_4bit(llama_dir)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.base_weight().clone()
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 9)))  # eval forward: bnb may repack the bytes in place
    # bnb's repack rounds the absmax to bf16 and its inverse requantizes it: a tiny drift, not scrambled bytes
    assert (layer.base_weight() - before).abs().max() <= 0.01 * before.abs().max()


def test_bnb_weights_read_as_nf4_without_requantizing(llama_dir):
    """Same byte layout: a bnb Params4bit converts to lorakit's NF4Tensor as is, and dequantizes to bnb's values."""
    model = _load_4bit(llama_dir)
    layer = model.model.layers[1].mlp.down_proj  # in_features 128 ≥ block 64: bnb's CPU dequantizer is right here
    ours = dequantize_nf4_reference(nf4_from_bnb(layer), torch.float32)
    assert torch.equal(ours, bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    native = NF4Linear(nf4_from_bnb(layer), compute_dtype=torch.float32)
    x = torch.randn(3, 128)
    with torch.no_grad():  # (bnb's own CPU inference kernel rounds through bf16, so compare with the exact product)
        assert torch.equal(native(x), torch.nn.functional.linear(x, ours))


def test_merging_into_bnb_4bit_refuses_and_dequantize_gives_dense_layers(llama_dir):
    x = torch.randint(0, 128, (2, 9))
    model = _load_4bit(llama_dir)
    torch.manual_seed(2)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()  # bnb's fp32 path (its eval-mode CPU kernel rounds through bf16)
    with torch.no_grad():
        adapted = model(x).logits
    with pytest.raises(lorakit.QuantizedBaseError):
        lorakit.merge(model)
    lorakit.dequantize(model)
    assert type(model.model.layers[0].self_attn.q_proj.base_layer) is torch.nn.Linear
    lorakit.unload(model, merge=True)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, adapted, atol=1e-5)
