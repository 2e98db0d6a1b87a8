"""In a checkpointed Llama-form layer's recompute the down projection's output is read by the residual addition
alone, whose backward reads neither operand: the fused call computes h and skips its base product (and, with
checkpoint=True, a 4-bit base's dequantisation); a sequence-tiled MLP runs no tile there. The gradients stay those of
the model without checkpointing. A layer of another form, a hooked MLP or projection (forward or backward hooks), a
down_proj that reads its inner linear's output or has its own instance forward, an MLP wrapped after optimize() and
a decoder forward patched, decorated or swapped after optimize() compute the product. CPU, float32; empty tensors
are filled with NaN, so a skipped value that is read shows."""

import copy
import functools
import importlib
import pickle

import pytest
import torch
from torch import nn

import lorakit
from support import rel_norm

lora_linear = importlib.import_module("lorakit.fast.lora_linear")
forms = importlib.import_module("lorakit.fast.forms")


@pytest.fixture(autouse=True)
def nan_filled_empties():
    """torch.empty and new_empty fill with NaN (torch's deterministic mode)."""
    was = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was[0])
    torch.utils.deterministic.fill_uninitialized_memory = was[1]


@pytest.fixture
def unread(monkeypatch):
    """Per fused call that took the plain form: whether it left its outputs unwritten."""
    calls, real = [], lora_linear._plain_forward

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(lora_linear, "_plain_forward", spy)
    return calls


def _adapted(model, **config):
    config = {"target_modules": "all-linear", **config}
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config))
    return model.train()


def _grads(*models) -> list:
    """Each model's gradients after one loss.backward() on IDS."""
    got = []
    for m in models:
        m(input_ids=IDS, labels=IDS).loss.backward()
        got.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    return got


def _grads_against_plain(model, **optimize):
    """(gradients with optimize(**optimize), gradients of a copy optimized without checkpointing)."""
    ref = copy.deepcopy(model)
    lorakit.optimize(ref)
    lorakit.optimize(model, **optimize)
    return _grads(model, ref)


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", [True, "offload"])
def test_the_recompute_skips_the_down_projections_product_and_keeps_the_gradients(tiny_llama, unread, mode):
    model = _adapted(tiny_llama)
    got, ref = _grads_against_plain(model, checkpoint=mode)
    # fused calls per block (q/k/v, o, gate/up, down; no wide form on CPU): forward and recompute (down's unread);
    # then the un-checkpointed copy's
    assert unread.count(True) == 2 and len(unread) == 2 * 2 * 4 + 2 * 4
    assert len(got) == len(ref) == 2 * 7 * 2
    for n, g in ref.items():
        assert torch.equal(got[n], g), n


def test_a_frozen_down_projection_skips_its_product_too(tiny_llama, unread):
    """LoRA on q and v only: down_proj stays an nn.Linear; in the recompute the fused call gives its dX = dY·W."""
    model = _adapted(tiny_llama, target_modules=["q_proj", "v_proj"])
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    got, ref = _grads_against_plain(model, checkpoint=True)
    assert unread.count(True) == 2  # one frozen down projection per block, in the recompute
    assert len(got) == len(ref) == 2 * 2 * 2
    for n, g in ref.items():
        assert torch.equal(got[n], g), n


def test_a_4bit_down_projection_is_dequantised_twice_a_step(tiny_llama, monkeypatch):
    """Forward and backward; the recompute reads no dense weight for it. The block's other six: three times each."""
    model = _adapted(tiny_llama)
    lorakit.quantize(model, compute_dtype=torch.float32, block_size=32)
    weight = importlib.import_module("lorakit.quant.weight")
    real, written = weight.QuantizedWeight.write_dense, []

    def counted(self, out):
        written.append(self.layer)
        return real(self, out)

    monkeypatch.setattr(weight.QuantizedWeight, "write_dense", counted)
    got, ref = _grads_against_plain(model, checkpoint=True)
    for i, layer in enumerate(model.model.layers):
        counts = {n: sum(w is m.base_layer for w in written) for n, m in layer.named_modules() if n.endswith("proj")}
        # forward, recompute (down: none) and backward (none for block 0's q/k/v: nothing before them trains)
        assert counts.pop("mlp.down_proj") == 2, counts
        assert counts == {n: 2 if i == 0 and n[-6] in "qkv" else 3 for n in counts}, counts
    for n, g in ref.items():
        assert rel_norm(got[n], g) <= 1e-6, n


def test_a_layer_of_another_form_computes_the_product(tiny_llama, unread):
    """A layer whose forward transforms the MLP's output before the residual (Gemma 2 and OLMo 2 normalise it) reads
    it."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class NormedMlpLayer(LlamaDecoderLayer):
        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=False, position_embeddings=None, **kwargs):
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
            hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                              position_ids=position_ids, past_key_values=past_key_values,
                                              use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
            hidden_states = residual + hidden_states
            residual = hidden_states
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states = self.mlp(hidden_states)
            hidden_states = residual + torch.tanh(hidden_states)  # reads the value: its backward needs it
            return hidden_states

    for layer in tiny_llama.model.layers:
        layer.__class__ = NormedMlpLayer
    model = _adapted(tiny_llama)
    got, ref = _grads_against_plain(model, checkpoint=True)
    assert unread and not any(unread)
    for n, g in ref.items():
        assert rel_norm(got[n], g) <= 1e-6, n


def test_a_hooked_mlp_computes_the_product(tiny_llama, unread):
    model = _adapted(tiny_llama)
    seen = []
    model.model.layers[0].mlp.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    got, ref = _grads_against_plain(model, checkpoint=True)
    assert unread.count(True) == 1  # layer 1's; layer 0's hook sees its output in the recompute too
    assert len(seen) == 3 and torch.equal(seen[0], seen[1])  # forward, recompute, then the plain copy's forward
    for n, g in ref.items():
        assert torch.equal(got[n], g), n


def test_a_tiled_mlp_skips_its_recompute_and_the_tiles_down_products(tiny_llama, unread):
    """Sequence tiles (6 of 4 rows a block): the block's recompute runs no tile of the MLP, and each tile
    recomputed in the backward leaves the down projection's output unwritten. A hooked projection keeps them."""
    hooked = _adapted(copy.deepcopy(tiny_llama))
    model = _adapted(tiny_llama)
    got, ref = _grads_against_plain(model, checkpoint="offload", tile_mlp=4)
    # per block: forward q/k/v, o and 6 × (gate/up, down); recompute q/k/v and o; backward 6 × (gate/up, down)
    assert unread.count(True) == 2 * 6 and len(unread) == 2 * (2 + 12 + 2 + 12) + 2 * 4
    for n, g in ref.items():
        assert rel_norm(got[n], g) <= 1e-5, n
    unread.clear()
    seen = []
    hooked.model.layers[1].mlp.up_proj.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].shape[0]))
    lorakit.optimize(hooked, checkpoint="offload", tile_mlp=4)
    hooked(input_ids=IDS, labels=IDS).loss.backward()
    assert unread.count(True) == 6  # block 0's tiles only
    assert len(seen) == 3 * 6  # block 1's tiles: forward, recompute, backward


class _SoftCap(nn.Module):
    """A down_proj that reads its inner linear's output."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * torch.tanh(self.inner(x) / 2)


class _Squashed(nn.Module):
    """An MLP wrapper that reads the MLP's output."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return torch.tanh(self.mlp(x))


@pytest.mark.parametrize("options", [dict(checkpoint=True), dict(checkpoint="offload", tile_mlp=4),
                                     dict(tile_mlp=4)])
def test_a_down_proj_that_reads_its_linears_output_computes_it(tiny_llama, unread, options):
    for layer in tiny_llama.model.layers:
        layer.mlp.down_proj = _SoftCap(layer.mlp.down_proj)
    model = _adapted(tiny_llama)
    got, ref = _grads_against_plain(model, **options)
    assert unread and not any(unread)
    for n, g in ref.items():
        assert rel_norm(got[n], g) <= 1e-5, n


def test_an_mlp_wrapped_after_optimize_computes_its_output(tiny_llama, unread):
    model = _adapted(tiny_llama)
    ref = copy.deepcopy(model)
    lorakit.optimize(model, checkpoint=True)
    lorakit.optimize(ref)
    for m in (model, ref):
        for layer in m.model.layers:
            layer.mlp = _Squashed(layer.mlp)
    grads = _grads(model, ref)
    assert unread and not any(unread)
    for n, g in grads[1].items():
        assert torch.equal(grads[0][n], g), n


def test_an_optimized_model_pickles_and_its_copy_skips_too(tiny_llama, unread):
    model = _adapted(tiny_llama)
    lorakit.optimize(model, checkpoint=True)
    pickle.dumps(model)
    twin = copy.deepcopy(model)
    twin(input_ids=IDS, labels=IDS).loss.backward()
    assert unread.count(True) == 2


def _squashed_layer_forward(self, hidden_states, *args, **kwargs):
    """Llama's layer with its output squashed: reads the MLP's output through the residual."""
    return torch.tanh(_LLAMA_FORWARD(self, hidden_states, *args, **kwargs))


def _llama_layer():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return LlamaDecoderLayer


_LLAMA_FORWARD = _llama_layer().forward


@pytest.mark.parametrize("how", ["class patched", "wrapped forward", "class swapped after optimize"])
def test_a_layer_forward_that_reads_the_output_computes_it(tiny_llama, unread, monkeypatch, how):
    """The check reads the forward the recompute runs, as transformers' source has Llama's: a class patched at run
    time, a decorated forward and a class swapped after optimize() all compute the product."""
    llama = _llama_layer()
    reading = type("Reading", (llama,), {"forward": functools.wraps(_LLAMA_FORWARD)(_squashed_layer_forward)
                                         if how == "wrapped forward" else _squashed_layer_forward})
    if how == "class patched":
        monkeypatch.setattr(llama, "forward", _squashed_layer_forward)
        for cached in (forms.known_bodies, forms.source_bodies):  # read afresh, whichever test came first
            cached.cache_clear()
        forms._BODIES.pop(llama, None)
    else:
        for layer in tiny_llama.model.layers:
            layer.__class__ = reading
    model = _adapted(tiny_llama)
    ref = copy.deepcopy(model)
    lorakit.optimize(model, checkpoint=True)
    lorakit.optimize(ref)
    if how == "class swapped after optimize":
        for layer in model.model.layers:
            layer.__class__ = llama  # the checkpoint still runs Reading's forward
    grads = _grads(model, ref)
    assert unread and not any(unread)
    for n, g in grads[1].items():
        assert torch.equal(grads[0][n], g), n


@pytest.mark.parametrize("options", [dict(checkpoint=True), dict(tile_mlp=4)])
@pytest.mark.parametrize("down", ["backward hook", "instance forward"])
def test_a_down_proj_with_a_backward_hook_or_its_own_forward_keeps_its_call(tiny_llama, unread, options, down):
    """LoRA on q and v: down_proj is a frozen nn.Linear, which the unread call would bypass."""
    model = _adapted(tiny_llama, target_modules=["q_proj", "v_proj"])
    ref = copy.deepcopy(model)
    for m in (model, ref):
        for layer in m.model.layers:
            d = layer.mlp.down_proj
            if down == "backward hook":
                d.register_full_backward_hook(lambda mod, gin, gout: (gin[0] * 0.5,))
            else:
                d.forward = lambda x, d=d: 2 * torch.nn.functional.linear(x, d.weight, d.bias)
    lorakit.optimize(model, **options)
    lorakit.optimize(ref)
    grads = _grads(model, ref)
    assert not any(unread)
    for n, g in grads[1].items():
        assert rel_norm(grads[0][n], g) <= 1e-5, n
