"""optimize(model, checkpoint=True, cuda_graphs=True): each checkpointed block's forward (without autograd) and its
recompute with backward replayed from CUDA graphs give the eagerly checkpointed model's losses, gradients and
updates bit for bit (LoRA, DoRA, an NF4 base, micro-batches, two forwards before a backward); with dropout the
recompute drops what the forward dropped (the same losses and gradients as graphs without checkpointing, from
the same generator state); a block drawing from torch's CUDA generator runs eagerly. GPU only (CUDA graphs)."""

import copy

import pytest
import torch

import lorakit
from graph_support import graph_states, train_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _llama(tiny_llama, nf4: bool = False, **config):
    model = tiny_llama.to("cuda").float().train()
    if nf4:
        lorakit.quantize(model, compute_dtype=torch.float32, block_size=32)
    torch.manual_seed(0)  # the adapters' initial A: the same in each copy
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **config))
    return model


def _batches():
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randint(0, 128, (2, 16), device="cuda", generator=g) for _ in range(5)]


def _assert_near(got, want):
    """Losses to 1e-5 and each last gradient to 1e-2 of its norm: float rounding, drifting over the AdamW steps
    (another dropout mask at p = 0.5 moves most of a gradient's elements by their own size)."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
    for a, b in zip(got[1], want[1]):
        assert (a - b).norm() <= 1e-2 * b.norm()


def _assert_same(got, want):
    assert got[0] == want[0]
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    assert all(torch.equal(a, b) for a, b in zip(got[2], want[2]))


@pytest.mark.parametrize("config,mode,nf4", [({}, "plain", False), ({"use_dora": True}, "plain", False),
                                             ({}, "micro", False), ({}, "twice", False), ({}, "plain", True),
                                             ({"use_dora": True}, "plain", True)])
def test_replayed_checkpointed_steps_equal_eager_checkpointed_steps_bit_for_bit(tiny_llama, config, mode, nf4):
    batches = _batches()
    eager = _llama(copy.deepcopy(tiny_llama), nf4, **config)
    graphed = _llama(tiny_llama, nf4, **config)
    want = train_steps(eager, batches, mode, checkpoint=True)
    counts = lorakit.optimize(graphed, checkpoint=True, cuda_graphs=True)
    assert counts["cuda_graphs"] == 2 and counts["checkpoint"] == 2
    _assert_same(train_steps(graphed, batches, mode, checkpoint=True, cuda_graphs=True), want)
    states = graph_states(graphed)
    assert all(s.refused is None for s in states) and states[0].pool.checkpointed
    # the first call runs eagerly, the second is captured and replayed: plain 0 + 4 steps; micro-batches 1 + 2·4;
    # two forwards a step: both replay (nothing of a forward waits in the pool)
    assert [s.replays for s in states] == [{"plain": 4, "micro": 9, "twice": 9}[mode]] * 2
    graphs = [g for s in states for g in s.seen.values() if g is not None]
    assert graphs[0].inputs[0] is graphs[1].inputs[0]  # the blocks share their static hidden state
    assert graphs[0].outputs[0] is graphs[1].outputs[0]


def test_the_recompute_drops_what_the_forward_dropped(tiny_llama):
    """From the same generator state each step, checkpointed graphs give the losses and gradients of graphs
    without checkpointing (to float rounding): the recompute's masks are the forward's, and each replay draws new
    ones."""
    batches = [_batches()[0]] * 5  # the same batch: the losses differ by their masks and the updates
    plain = _llama(copy.deepcopy(tiny_llama), lora_dropout=0.5, init_lora_weights=False)
    recomputed = _llama(tiny_llama, lora_dropout=0.5, init_lora_weights=False)
    want = train_steps(plain, batches, seeded=True, cuda_graphs=True)
    got = train_steps(recomputed, batches, seeded=True, checkpoint=True, cuda_graphs=True)
    assert all(s.replays == 4 for s in graph_states(recomputed))
    assert all(g.seeds for s in graph_states(recomputed) for g in s.seen.values() if g is not None)
    # to float rounding (one run's losses differed by one unit in the last place from the fourth step on: the
    # two forms' products differ somewhere in their order)
    _assert_near(got, want)


def test_micro_batches_with_dropout_recompute_their_own_masks(tiny_llama):
    """Each replay keeps its seeds for its own backward: micro-batches with dropout give the gradients of graphs
    without checkpointing (to float rounding)."""
    batches = _batches()
    plain = _llama(copy.deepcopy(tiny_llama), lora_dropout=0.5, init_lora_weights=False)
    recomputed = _llama(tiny_llama, lora_dropout=0.5, init_lora_weights=False)
    want = train_steps(plain, batches, "micro", seeded=True, cuda_graphs=True)
    got = train_steps(recomputed, batches, "micro", seeded=True, checkpoint=True, cuda_graphs=True)
    assert all(s.replays == 9 for s in graph_states(recomputed))
    _assert_near(got, want)


def test_two_backwards_with_retain_graph_replay_the_recompute_twice(tiny_llama):
    ids = _batches()[0]
    grads = []
    for model, graphs in ((_llama(copy.deepcopy(tiny_llama)), False), (_llama(tiny_llama), True)):
        lorakit.optimize(model, checkpoint=True, cuda_graphs=graphs)
        params = [p for p in model.parameters() if p.requires_grad]
        for _ in range(3):  # first call, capture, replay
            for p in params:
                p.grad = None
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward(retain_graph=True)
            loss.backward()
        grads.append([p.grad for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert all(s.replays == 2 for s in graph_states(model))


def test_optimize_in_two_calls_keeps_one_graph_form(tiny_llama):
    from lorakit.errors import ConfigError

    model = _llama(tiny_llama)
    lorakit.optimize(model, checkpoint=True)
    assert lorakit.optimize(model, cuda_graphs=True)["cuda_graphs"] == 2
    assert all(s.pool.checkpointed for s in graph_states(model))
    lorakit.unoptimize(model)
    lorakit.optimize(model, cuda_graphs=True)
    with pytest.raises(ConfigError, match="unoptimize"):  # checkpointing would sit beneath the graphs' patch
        lorakit.optimize(model, checkpoint=True)
    lorakit.unoptimize(model)
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


def test_a_block_that_draws_from_torchs_generator_runs_eagerly(tiny_llama):
    tiny_llama.config.attention_dropout = 0.2
    for layer in tiny_llama.model.layers:
        layer.self_attn.attention_dropout = 0.2
    model = _llama(tiny_llama)
    lorakit.optimize(model, checkpoint=True, cuda_graphs=True)
    ids = _batches()[0]
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
    states = graph_states(model)
    assert all("CUDA generator" in s.refused and s.replays == 0 for s in states)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_a_4bit_base_graph_keeps_the_scratch_buffer_it_writes(tiny_llama):
    from lorakit.fast import scratch

    model = _llama(tiny_llama, nf4=True)
    lorakit.optimize(model, checkpoint=True, cuda_graphs=True)
    ids = _batches()[0]
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    graph = next(g for g in graph_states(model)[0].seen.values() if g is not None)
    kept = {t.data_ptr() for t in graph.kept_buffers}
    assert kept and kept <= {t.data_ptr() for t in scratch.held()}
