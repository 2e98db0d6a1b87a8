"""optimize() against the reference path where the model's own code must run: heads and MLPs with extra math,
custom losses, trained head biases, packed rows, labels all ignored, caches handed to checkpointed blocks,
RoPE functions of other signatures, and the `dropout=False` promise (CPU, float32)."""

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.fast import families
from support import one_thread, rel_norm  # noqa: F401

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _adapt(model, targets=LLAMA_TARGETS, **kw):
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  init_lora_weights=False, **kw))
    return model.train()


def _pair(model, **opts):
    fast = copy.deepcopy(model)
    counts = lorakit.optimize(fast, **opts)
    return model, fast, counts


def _assert_same(ref, fast, call, tol=3e-5):
    got = []
    for model in (ref, fast):
        out = call(model)
        loss = out if torch.is_tensor(out) else out.loss
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        got.append((loss.detach(), dict(zip([n for n, _ in named], grads))))
    (l0, g0), (l1, g1) = got
    assert rel_norm(l1, l0) <= tol, (l1, l0)
    assert g0.keys() == g1.keys()
    for name, b in g0.items():
        a = g1[name]
        assert (a is None) == (b is None), name
        if b is not None:
            assert torch.isfinite(a).all() and rel_norm(a, b) <= tol, name


def _ids(b=2, t=12, seed=0):
    return torch.randint(1, 128, (b, t), generator=torch.Generator().manual_seed(seed))


def test_packed_rows_given_as_positions_see_the_reference_mask(tiny_llama):
    """Positions that restart and no mask: whether transformers looks for packed rows depends on the cache, which
    the fused loss leaves as the model has it."""
    ref, fast, _ = _pair(_adapt(tiny_llama))
    ids = _ids(t=12)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]] * 2)
    _assert_same(ref, fast, lambda m: m(input_ids=ids, position_ids=pos, labels=ids))
    _assert_same(ref, fast, lambda m: m(input_ids=ids, position_ids=pos, labels=ids, use_cache=False))


def test_a_batch_with_every_label_ignored_gives_zero_gradients(tiny_llama):
    ref, fast, _ = _pair(_adapt(tiny_llama))
    ids = _ids()
    ignored = torch.full_like(ids, -100)
    for model in (ref, fast):
        loss = model(input_ids=ids, labels=ignored).loss
        loss.backward()  # NaN, as transformers' mean over no label
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_a_trained_lm_head_bias_gets_its_gradient(tiny_llama):
    tiny_llama.lm_head.bias = nn.Parameter(torch.randn(128) * 0.1)
    model = _adapt(tiny_llama)
    model.lm_head.bias.requires_grad_(True)
    ref, fast, _ = _pair(model)
    ids = _ids()
    _assert_same(ref, fast, lambda m: m(input_ids=ids, labels=ids))


def test_a_loss_function_set_on_the_model_is_used(tiny_llama):
    def smoothed(logits, labels, vocab_size, **kwargs):
        logits = logits[:, :-1].reshape(-1, vocab_size).float()
        return nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), label_smoothing=0.1)

    model = _adapt(tiny_llama)
    model.loss_function = smoothed
    ref, fast, counts = _pair(model)
    assert counts["lm_loss"] == 0
    ids = _ids()
    _assert_same(ref, fast, lambda m: m(input_ids=ids, labels=ids))


@pytest.mark.parametrize("family", ["cohere", "granite"])
def test_a_head_with_its_own_scaling_keeps_the_models_forward(family):
    import transformers

    extra = {"cohere": dict(logit_scale=0.0625), "granite": dict(logits_scaling=4.0)}[family]
    name = {"cohere": "Cohere", "granite": "Granite"}[family]
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**SMALL, **extra))
    ref, fast, counts = _pair(_adapt(model))
    assert counts["lm_loss"] == 0
    ids = _ids()
    _assert_same(ref, fast, lambda m: m(input_ids=ids, labels=ids))


def test_only_plain_gated_mlps_take_the_fused_mlp(tiny_llama):
    class ClampedMLP(nn.Module):  # as DeepseekV4's: a clamp between the projections
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x).clamp(max=1.0)) * self.up_proj(x))

    assert families.gated_mlp_kind(tiny_llama.model.layers[0].mlp) is not None
    assert families.gated_mlp_kind(ClampedMLP()) is None


@pytest.mark.parametrize("mode", [True, "offload"])
def test_gpt2_blocks_checkpointed_with_their_positional_cache(mode):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0))
    ref, fast, counts = _pair(_adapt(model, targets=["c_attn", "c_proj", "c_fc"]), checkpoint=mode)
    assert counts["checkpoint"] == 2
    ids = _ids()
    _assert_same(ref, fast, lambda m: m(input_ids=ids, labels=ids))  # use_cache on by default: a cache is built


def test_checkpointed_blocks_read_a_prefix_cache_and_backpropagate_twice(tiny_llama):
    ref, fast, _ = _pair(_adapt(tiny_llama), checkpoint=True)
    prefix, ids = _ids(t=5, seed=1), _ids(t=7)

    def call(model):
        with torch.no_grad():
            cache = model(input_ids=prefix, use_cache=True).past_key_values
        return model(input_ids=ids, past_key_values=cache, labels=ids)

    _assert_same(ref, fast, call)
    loss = fast(input_ids=ids, labels=ids).loss
    params = [p for p in fast.parameters() if p.requires_grad]
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_a_gpt_j_rope_of_another_signature_is_left_alone():
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    cfg = GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    untouched = GPTJForCausalLM(cfg).eval()
    ids = _ids()
    before = untouched(input_ids=ids, labels=ids).loss
    ref, fast, _ = _pair(_adapt(GPTJForCausalLM(cfg), targets=["q_proj", "k_proj", "v_proj"]))
    _assert_same(ref, fast, lambda m: m(input_ids=ids, labels=ids))
    assert torch.equal(untouched(input_ids=ids, labels=ids).loss, before)  # another GPT-J in the process


def test_dropout_false_keeps_torchs_attention_dropout_after_another_model_took_the_hash_masks():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.2)
    model = _adapt(BertForSequenceClassification(cfg), targets=["query", "key", "value", "dense"])
    other = copy.deepcopy(model)
    lorakit.optimize(other)  # dropout=True: transformers' sdpa function is wrapped for the whole process
    ref, fast, _ = _pair(model, dropout=False)
    ids, labels = _ids(b=3, t=10), torch.tensor([0, 1, 1])

    def seeded(m):
        torch.manual_seed(3)
        return m(input_ids=ids, labels=labels)

    _assert_same(ref, fast, seeded)


def test_a_subclass_defining_its_loss_function_keeps_it(tiny_llama):
    from transformers import LlamaForCausalLM

    class Smoothed(LlamaForCausalLM):
        @property
        def loss_function(self):
            def smoothed(logits, labels, vocab_size, **kwargs):
                logits = logits[:, :-1].reshape(-1, vocab_size).float()
                return nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), label_smoothing=0.2)
            return smoothed

    torch.manual_seed(0)
    model = _adapt(Smoothed(tiny_llama.config))
    ref, fast, counts = _pair(model)
    assert counts["lm_loss"] == 0
    ids = _ids()
    _assert_same(ref, fast, lambda m: m(input_ids=ids, labels=ids))


def test_forward_hooks_on_a_fused_mlps_projections_still_fire(tiny_llama):
    """gate and up run as one fused call, but a forward hook on either (or on down) makes them run as modules, so
    the hook sees every call; the gradients stay the reference's."""
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       init_lora_weights=False))
    model = tiny_llama.train()
    ref = copy.deepcopy(model)
    seen = []
    for layer in model.model.layers:
        layer.mlp.gate_proj.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    lorakit.optimize(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    assert seen == [torch.Size([2, 12, 128])] * 2
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is not None:
            assert rel_norm(p.grad, q.grad) <= 1e-5, n


def test_a_forward_hook_on_the_lm_head_keeps_the_models_own_loss(tiny_llama):
    """The fused loss never makes the logits; a hook on lm_head would never see them: that model keeps its forward."""
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model = tiny_llama.train()
    lorakit.optimize(model)
    seen = []
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    assert model(input_ids=ids, labels=ids).logits is None  # the fused loss
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    out = model(input_ids=ids, labels=ids)
    assert seen == [torch.Size([2, 12, 128])] and out.logits is not None
    handle.remove()
    assert model(input_ids=ids, labels=ids).logits is None
