"""optimize(checkpoint=...) on transformers models: T5's position bias and encoder output as inputs of each block's
node, Llama with dropout replayed, a MoE's auxiliary loss, the fused loss's chunks, and what the recompute may write
over (the SwiGLU's and the down projection's activations, not where a hook could keep them). CPU, float32."""

import copy
import importlib

import pytest
import torch
from torch import nn

import lorakit
from support import one_thread, rel_norm  # noqa: F401
from test_fast_checkpoint import MODES


def _tiny_t5(decoder_layers: int):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=decoder_layers, num_heads=4, d_kv=8,
                   vocab_size=100, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(cfg)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "wi", "wo"],
                                                  init_lora_weights=False))
    for name, p in model.named_parameters():
        if "relative_attention_bias" in name:
            p.requires_grad_(True)  # trained like a modules_to_save tensor: block 0's position bias carries grad
    return model.train()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("decoder_layers", [2, 3])
def test_t5_blocks_take_the_position_bias_and_encoder_output_into_their_node(mode, decoder_layers, fallbacks):
    """Encoder blocks 1.. read block 0's position bias; decoder blocks read the encoder's output (and the cross
    attention's bias after block 0): inputs of each block's node, not torch's checkpoint. Both stacks are
    checkpointed (the layers transformers checkpoints itself), each block once."""
    ref = _tiny_t5(decoder_layers)
    fast = copy.deepcopy(ref)
    assert lorakit.optimize(fast, checkpoint=mode)["checkpoint"] == 2 + decoder_layers
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    losses = [model(input_ids=ids, labels=labels).loss for model in (ref, fast)]
    for loss in losses:
        loss.backward()
    assert rel_norm(losses[1].detach(), losses[0].detach()) <= 1e-6
    trained = 0
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        if b.requires_grad:
            assert b.grad.abs().sum() > 0 and rel_norm(a.grad, b.grad) <= 1e-5, name
            trained += 1
    assert trained == 2 + 2 * (2 * 4) + decoder_layers * (3 * 4)  # the two biases, A and B of each target linear
    assert fallbacks == []


def test_loss_backward_through_checkpointed_llama_blocks_with_dropout(tiny_llama):
    """An HF model with dropout in its blocks: the recompute draws the forward's masks again."""
    tiny_llama.config.attention_dropout = 0.2
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       lora_dropout=0.1, init_lora_weights=False))
    for layer in tiny_llama.model.layers:
        layer.self_attn.attention_dropout = 0.2
    ref = tiny_llama.train()
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast, checkpoint=True)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    fast(input_ids=ids, labels=ids).loss.backward()
    lorakit.unoptimize(fast)  # the same model, no checkpointing, the same draws from the same seed
    grads = {n: p.grad.clone() for n, p in fast.named_parameters() if p.grad is not None}
    fast.zero_grad(set_to_none=True)
    lorakit.optimize(fast)
    torch.manual_seed(1)
    fast(input_ids=ids, labels=ids).loss.backward()
    assert len(grads) == 2 * 7 * 2
    for n, p in fast.named_parameters():
        if n in grads:
            assert rel_norm(grads[n], p.grad) <= 1e-5, n


def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        output_router_logits=True, router_aux_loss_coef=1.0)
    model = MixtralForCausalLM(cfg)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    return model.train()


@pytest.mark.parametrize("mode", [False, True, "offload"])
def test_a_moe_auxiliary_loss_keeps_its_gradient(mode):
    """Mixtral with output_router_logits: the loss includes the router's load-balancing loss, whose router logits
    transformers records inside each block. The fused loss leaves that forward to the model, and checkpointed
    blocks whose outputs are being recorded run under torch's checkpoint, so the recorded logits carry gradients."""
    ref = _tiny_mixtral()
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast, checkpoint=mode)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    got = []
    for model in (ref, fast):
        out = model(input_ids=ids, labels=ids)
        assert out.aux_loss > 0
        params = [p for p in model.parameters() if p.requires_grad]
        got.append((out.loss.detach(), torch.autograd.grad(out.loss, params)))
    (l0, g0), (l1, g1) = got
    assert rel_norm(l1, l0) <= 1e-5
    for a, b in zip(g1, g0):
        assert rel_norm(a, b) <= 1e-5


def test_router_logits_left_to_the_config_keep_the_auxiliary_loss():
    """output_router_logits=None in the call means the config's setting, as in transformers."""
    ref = _tiny_mixtral()
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    want = ref(input_ids=ids, labels=ids, output_router_logits=None).loss
    got = fast(input_ids=ids, labels=ids, output_router_logits=None).loss
    assert rel_norm(got, want) <= 1e-5


def test_a_checkpointed_model_takes_smaller_loss_chunks_until_unoptimized(tiny_llama, monkeypatch):
    """checkpoint=True puts memory first: the fused loss's chunks shrink to CHECKPOINTED_CHUNK_BYTES (the loss is
    the same), and unoptimize() takes that back with the rest."""
    families = importlib.import_module("lorakit.fast.families")
    ce = importlib.import_module("lorakit.fast.cross_entropy")
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["chunk_bytes"])
        return ce.linear_cross_entropy(*args, **kwargs)

    monkeypatch.setattr(families, "linear_cross_entropy", spy)
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model = tiny_llama.train()
    losses = []
    for checkpoint in (False, True, None):
        if checkpoint is None:
            lorakit.unoptimize(model)
            lorakit.optimize(model)
        else:
            lorakit.optimize(model, checkpoint=checkpoint)
        losses.append(model(input_ids=ids, labels=ids).loss)
    assert seen == [ce.CHUNK_BYTES, ce.CHECKPOINTED_CHUNK_BYTES, ce.CHUNK_BYTES]
    assert ce.CHECKPOINTED_CHUNK_BYTES < ce.CHUNK_BYTES
    assert torch.allclose(losses[0], losses[1]) and torch.allclose(losses[0], losses[2])


def test_in_a_recompute_the_down_projection_writes_dx_over_its_input(tiny_llama, monkeypatch):
    """Inside a checkpoint's recompute the down projection's dX takes the gated activation's memory (read by it
    alone, its dA taken first); the gradients stay those of the model without checkpointing."""
    lora_linear = importlib.import_module("lorakit.fast.lora_linear")
    into = []

    def spy(*args, **kwargs):
        into.append(kwargs.get("into") is not None)
        return real(*args, **kwargs)

    real = lora_linear.plain_dx
    monkeypatch.setattr(lora_linear, "plain_dx", spy)
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       init_lora_weights=False))
    ref = tiny_llama.train()
    fast = copy.deepcopy(ref)
    lorakit.optimize(ref)
    lorakit.optimize(fast, checkpoint=True)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref(input_ids=ids, labels=ids).loss.backward()
    assert not any(into)
    fast(input_ids=ids, labels=ids).loss.backward()
    assert into.count(True) == 2  # one down projection per block, nothing else
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * 7 * 2
    for n, p in fast.named_parameters():
        if n in grads:
            assert rel_norm(grads[n], p.grad) <= 1e-5, n


def test_a_hooked_mlp_keeps_its_activations_in_the_recompute(tiny_llama):
    """A forward hook may keep what the down projection reads (here a pre-hook multiplies it by a trained tap and
    a hook adds that to the output): nothing writes a gradient over it then, and the gradients stay those of the
    un-checkpointed model (before, the backward raised: the input was modified in place)."""
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       init_lora_weights=False))

    def install(model):
        kept = []
        for layer in model.model.layers:
            mlp = layer.mlp
            mlp.tap = nn.Parameter(torch.full((64,), 0.5))

            def pre(mod, inp, mlp=mlp):
                mlp._aux = mlp.tap * inp[0][..., :64]
                kept.append(inp[0])

            mlp.down_proj.register_forward_pre_hook(pre)
            mlp.down_proj.register_forward_hook(lambda mod, inp, out, mlp=mlp: out + mlp._aux)
        return model, kept

    ref, _ = install(copy.deepcopy(tiny_llama.train()))
    fast, kept = install(copy.deepcopy(tiny_llama.train()))
    lorakit.optimize(ref)
    lorakit.optimize(fast, checkpoint=True)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref(input_ids=ids, labels=ids).loss.backward()
    fast(input_ids=ids, labels=ids).loss.backward()
    assert len(kept) == 4  # forward and recompute, per block
    assert torch.equal(kept[0], kept[3]) and torch.equal(kept[1], kept[2])  # the recompute (blocks in reverse)
    # left what the hook kept as the forward made it
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * 7 * 2 + 2
    for n, p in fast.named_parameters():
        if n in grads:
            assert rel_norm(grads[n], p.grad) <= 1e-5, n
