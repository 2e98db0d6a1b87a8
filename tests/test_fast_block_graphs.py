"""optimize(model, cuda_graphs=True): each block's forward and backward replayed from CUDA graphs give the eager
model's losses, gradients and updates bit for bit (LoRA, DoRA, micro-batches, two forwards before a backward),
dropout draws new masks on each replay, a changed signature is captured anew. The graph tests need a GPU; the
host-side rules (what the signature covers, what refuses graphs, the options) run on CPU."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ConfigError
from lorakit.fast import block_graphs, graph_signature

from graph_support import graph_states, train_steps

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _llama(tiny_llama, device, **config):
    model = tiny_llama.to(device).float().train()
    torch.manual_seed(0)  # the adapters' initial A: the same in each copy
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **config))
    return model


@cuda
@pytest.mark.parametrize("config,mode", [({}, "plain"), ({"use_dora": True}, "plain"), ({}, "micro"),
                                         ({}, "twice")])
def test_replayed_steps_equal_eager_steps_bit_for_bit(tiny_llama, config, mode):
    import copy

    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, 128, (2, 16), device="cuda", generator=g) for _ in range(5)]
    eager = _llama(copy.deepcopy(tiny_llama), "cuda", **config)
    graphed = _llama(tiny_llama, "cuda", **config)
    want = train_steps(eager, batches, mode, cuda_graphs=False)
    got = train_steps(graphed, batches, mode, cuda_graphs=True)
    assert got[0] == want[0]
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    assert all(torch.equal(a, b) for a, b in zip(got[2], want[2]))
    states = graph_states(graphed)
    assert len(states) == 2 and all(s.refused is None for s in states)
    # the first call runs eagerly, the second is captured and replayed: plain 0 + 4 steps; micro-batches 1 + 2·4;
    # two forwards a step: step 1's second one, then each step's first one while the second runs eagerly
    assert [s.replays for s in states] == [{"plain": 4, "micro": 9, "twice": 5}[mode]] * 2


@cuda
@pytest.mark.parametrize("config", [{}, {"use_dora": True}])
def test_a_4bit_base_replays_bit_for_bit(tiny_llama, config):
    """An NF4 base dequantises into the shared scratch buffer inside each graph."""
    import copy

    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, 128, (2, 16), device="cuda", generator=g) for _ in range(5)]
    models = []
    for base in (copy.deepcopy(tiny_llama), tiny_llama):
        lorakit.quantize(base.to("cuda").float(), compute_dtype=torch.float32, block_size=32)
        models.append(_llama(base, "cuda", **config))
    want = train_steps(models[0], batches, cuda_graphs=False)
    got = train_steps(models[1], batches, cuda_graphs=True)
    assert got[0] == want[0]
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    assert all(torch.equal(a, b) for a, b in zip(got[2], want[2]))
    assert [s.replays for s in graph_states(models[1])] == [4, 4]


@cuda
def test_dropout_draws_new_masks_each_replay_and_its_backward_uses_them(tiny_llama):
    model = _llama(tiny_llama, "cuda", lora_dropout=0.5, init_lora_weights=False)
    lorakit.optimize(model, cuda_graphs=True)
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    losses, grads = [], []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        grads.append(torch.autograd.grad(loss, params))
        losses.append(float(loss.detach()))
    assert all(s.replays == 3 for s in graph_states(model))
    assert len(set(losses[1:])) == 3  # same input and weights: new masks each replay
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for g in grads for t in g)
    assert not torch.equal(grads[-1][0], grads[-2][0])


@cuda
def test_a_new_shape_is_captured_anew_and_unoptimize_removes_the_graphs(tiny_llama):
    model = _llama(tiny_llama, "cuda")
    assert lorakit.optimize(model, cuda_graphs=True)["cuda_graphs"] == 2
    for length in (8, 8, 12, 12, 8):
        ids = torch.randint(0, 128, (2, length), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
    states = graph_states(model)
    assert [len([g for g in s.seen.values() if g is not None]) for s in states] == [2, 2]
    assert [s.replays for s in states] == [3, 3]  # 8 (second sight), 12 (second sight), 8 again
    lorakit.unoptimize(model)
    assert not graph_states(model) and all("forward" not in m.__dict__ for m in model.model.layers)


# --- host-side rules, on CPU --------------------------------------------------------------------------------
def test_options_are_checked_and_a_cpu_model_gets_no_graphs(tiny_llama):
    model = _llama(tiny_llama, "cpu")
    with pytest.raises(ConfigError, match="offload"):
        lorakit.optimize(model, cuda_graphs=True, checkpoint="offload")
    with pytest.raises(ConfigError, match="tile_mlp"):
        lorakit.optimize(model, cuda_graphs=True, checkpoint=True, tile_mlp=64)
    assert "forward" not in model.model.layers[0].__dict__  # refused before anything changed
    lorakit.optimize(model, checkpoint=True, tile_mlp=64)
    with pytest.raises(ConfigError, match="tile_mlp"):  # tiled by the call before
        lorakit.optimize(model, cuda_graphs=True)
    lorakit.unoptimize(model)
    with pytest.raises(ConfigError):
        lorakit.optimize(model, cuda_graphs="yes")
    assert lorakit.optimize(model, cuda_graphs=True)["cuda_graphs"] == 0


def test_the_signature_follows_what_the_block_computes_with(tiny_llama):
    """What the host code decides on changes the signature (an adapter's scaling, a frozen weight written in
    place, the float32 matmul precision, train/eval); a forward hook or a CPU tensor argument refuses graphs."""
    model = _llama(tiny_llama, "cpu")
    block = model.model.layers[0]
    spec = torch.utils._pytree.tree_flatten(((), {}))[1]

    def signature():
        return graph_signature.signature(block, [], spec)

    seen = {signature()}
    assert signature() in seen and None not in seen
    delta = block.self_attn.q_proj.deltas["default"]
    precision = torch.get_float32_matmul_precision()
    try:
        for change in (lambda: setattr(delta, "scaling", delta.scaling * 2),
                       lambda: _in_place(block.mlp.up_proj.base_layer.weight),
                       lambda: torch.set_float32_matmul_precision("high" if precision != "high" else "highest"),
                       lambda: block.eval()):
            change()
            new = signature()
            assert new is not None and new not in seen
            seen.add(new)
    finally:
        torch.set_float32_matmul_precision(precision)
    handle = block.mlp.register_forward_hook(lambda *a: None)
    assert signature() is None
    handle.remove()
    leaves, with_tensor = torch.utils._pytree.tree_flatten(((torch.ones(2),), {}))
    assert graph_signature.signature(block, leaves, with_tensor) is None


@torch.no_grad()
def _in_place(weight):
    weight.mul_(1.0)  # as load_state_dict or a merge writes it: its version counter moves


def test_a_block_that_writes_its_input_in_place_or_returns_other_things_is_refused():
    class InPlace(nn.Module):
        def forward(self, h):
            return h.mul_(2)

    class Dict(nn.Module):
        def forward(self, h):
            return {"h": h, "note": object()}

    for module, reason in ((InPlace(), "writes an input in place"), (Dict(), "returns other than tensors")):
        state = block_graphs._BlockGraphs(pool=None)
        leaves, spec = torch.utils._pytree.tree_flatten(((torch.ones(3),), {}))
        block_graphs._first_call(state, module, module.forward, leaves, spec)
        assert state.refused == f"it {reason}"
