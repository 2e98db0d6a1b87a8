"""PerRowGraphs (multi/graphs.py) and its static rows (multi/rows.StaticRows): every output is held to per_row's
impl="reference". On CPU the same static routing runs eagerly (torch path, and the Triton kernels under the
interpreter); on CUDA the forwards are captured and replayed, and a replay must follow every change a per_row block
would see: another arrangement of rows, a write to an adapter, a replaced base weight, a merge, a disabled block."""

import pytest
import torch

import lorakit
from lorakit.errors import AdapterNameError, MixedBatchError
from lorakit.multi.rows import StaticRows
from lorakit.multi.stack import segment_tiles

from support import rel_max, small_lora

ARRANGEMENTS = (["a", "b", None, "c"], ["c", "b", "a", None], ["b", "a", "c", "a"], ["a", "b", "c", "c"])


def reference(model, names, ids):
    with torch.no_grad(), lorakit.per_row(model, names, impl="reference"):
        return model(ids, use_cache=False).logits


def three_adapters(model, device="cpu"):
    for name in ("a", "b", "c"):
        lorakit.add_adapter(model, small_lora(target_modules="all-linear"), name)
    return model.to(device).eval()


def test_static_rows_rewrite_their_buffers_in_place_and_pad_the_tiles():
    """One set of buffers serves every arrangement: assign rewrites them in place, and SGMV's tile list keeps its
    longest length (n_rows·⌈tokens/block_m⌉), the real tiles first, then empty ones (count 0)."""
    rows = StaticRows(("a", "b", "c"), ["a", "a", None, "c"])
    tiles = rows.tiles(4, 5, 4, "cpu")
    gids = rows.gids(4, "cpu")
    real = [list(t) for t in segment_tiles([0, 0, -1, 2], 5, 4)]
    assert tiles.shape == (4 * 2, 3) and len(real) == 5
    assert tiles[:5].tolist() == real and tiles[5:].abs().sum() == 0
    rows.assign(["c", "b", "a", "b"])
    assert rows.tiles(4, 5, 4, "cpu").data_ptr() == tiles.data_ptr() and rows.gids(4, "cpu") is gids
    assert gids.tolist() == [2, 1, 0, 1]
    assert tiles.tolist() == [list(t) for t in segment_tiles([2, 1, 0, 1], 5, 4)]  # 8 real tiles: no padding
    with pytest.raises(KeyError):
        rows.assign(["d", None, None, None])  # the runner keys rows by their adapter set: never another name


def test_every_arrangement_over_one_adapter_set_shares_one_entry(tiny_llama):
    model = three_adapters(tiny_llama)
    run = lorakit.PerRowGraphs(model)
    ids = torch.randint(0, 128, (4, 6))
    for names in ARRANGEMENTS:
        assert rel_max(run(names, ids).logits, reference(model, names, ids)) < 1e-6
    assert len(run._entries) == 1
    for names in ([None] * 4, ["b"] * 4):  # other sets (the base alone, one adapter): their own entries
        assert rel_max(run(names, ids).logits, reference(model, names, ids)) < 1e-6
    assert len(run._entries) == 3


def test_static_rows_drive_the_kernels(tiny_llama, kernel_device):
    """SGMV over the padded tile list (and BGMV for one-token rows) under the static rows equals the reference."""
    model = three_adapters(tiny_llama, kernel_device)
    run = lorakit.PerRowGraphs(model)
    for tokens in (6, 1):
        ids = torch.randint(0, 128, (4, tokens), device=kernel_device)
        for names in ARRANGEMENTS[:2]:
            assert rel_max(run(names, ids).logits, reference(model, names, ids)) < 1e-5


def test_rows_grouped_per_adapter_fall_back_to_per_row(tiny_llama):
    """A delta without linear factors (LoHa) runs its own forward on its rows, whose count depends on the names:
    that signature runs per_row eagerly, and still equals the reference."""
    model = three_adapters(tiny_llama)
    lorakit.add_adapter(model, lorakit.LoHaConfig(r=2, target_modules=["q_proj"], init_weights=False), "h")
    model.eval()
    run = lorakit.PerRowGraphs(model)
    ids = torch.randint(0, 128, (4, 6))
    for names in (["h", "a", None, "b"], ["b", "h", "h", "a"]):
        assert rel_max(run(names, ids).logits, reference(model, names, ids)) < 1e-6
    assert [e.graph for e in run._entries.values()] == [False]


def test_bad_calls_are_refused_and_training_mode_runs_per_row(tiny_llama):
    model = three_adapters(tiny_llama)
    run = lorakit.PerRowGraphs(model)
    ids = torch.randint(0, 128, (4, 6))
    with pytest.raises(AdapterNameError):
        run(["a", "zz", None, "b"], ids)
    with pytest.raises(MixedBatchError, match="hashable"):
        run(["a", "b", None, "c"], ids, output_attentions=[True])
    with pytest.raises(MixedBatchError, match="rows"):
        run(["a", "b"], ids)  # two names for four rows
    model.train()  # no dropout here: training mode gives the eval-mode result, through per_row
    assert rel_max(run(ARRANGEMENTS[0], ids).logits, reference(model, ARRANGEMENTS[0], ids)) < 1e-6
    assert not run._entries


def test_what_a_replay_checks_first_moves_with_every_change_it_must_see(tiny_llama):
    """The state compared before a replay changes with a new base storage, a merge, a disabled block and training
    mode, and comes back when each is undone (graphs.py _model_state)."""
    from lorakit.multi.graphs import _model_state

    model = three_adapters(tiny_llama)
    state = lambda: _model_state(model)[0]  # noqa: E731
    first = state()
    layer = model.model.layers[0].self_attn.q_proj
    old = layer.base_layer.weight.data
    layer.base_layer.weight.data = old.clone()
    assert state() != first
    layer.base_layer.weight.data = old
    assert state() == first
    with lorakit.disabled(model):
        assert state() != first
    model.train()
    assert state() != first
    model.eval()
    lorakit.merge(model, ["a"])
    assert state() != first
    lorakit.unmerge(model)
    assert state() == first


def test_signatures_keep_inference_mode_autocast_and_the_lru_apart(tiny_llama):
    model = three_adapters(tiny_llama)
    run = lorakit.PerRowGraphs(model, max_graphs=2)
    ids = torch.randint(0, 128, (4, 6))
    names = ARRANGEMENTS[0]
    with torch.inference_mode():  # static buffers made here are written by the normal call below
        run(names, ids)
    assert rel_max(run(ARRANGEMENTS[1], ids).logits, reference(model, ARRANGEMENTS[1], ids)) < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(names, ids).logits
        with lorakit.per_row(model, names):
            ref = model(ids, use_cache=False).logits
    assert out.dtype == ref.dtype == torch.bfloat16 and rel_max(out.float(), ref.float()) < 1e-6
    assert len(run._entries) == 2  # one without autocast, one with
    run(names, ids[:, :5])  # a third signature: the least recently used (no autocast, 4×6) goes
    signatures = [key[3] for key in run._entries]  # (tensor args, kwargs, autocast dtype or False)
    assert [(sig[0][0][1], sig[2]) for sig in signatures] == [((4, 6), torch.bfloat16), ((4, 5), False)]


def test_bad_settings_and_outputs_are_refused_and_leave_no_entry(tiny_llama):
    model = three_adapters(tiny_llama)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(lorakit.ConfigError, match="max_graphs"):
            lorakit.PerRowGraphs(model, max_graphs=bad)
    run = lorakit.PerRowGraphs(model)
    with pytest.raises(MixedBatchError, match="use_cache=False"):
        run(ARRANGEMENTS[0], torch.randint(0, 128, (4, 6)), use_cache=True)  # a DynamicCache a replay would rewrite
    assert not run._entries


# --- CUDA: captured and replayed -----------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda
def test_replays_follow_the_rows_and_return_their_own_tensors(tiny_llama):
    model = three_adapters(tiny_llama, "cuda")
    run = lorakit.PerRowGraphs(model)
    ids = torch.randint(0, 128, (4, 6), device="cuda")
    outs = [run(names, ids).logits for names in ARRANGEMENTS + ARRANGEMENTS]
    assert len(run) == 1  # captured once, replayed for every later arrangement
    for names, out in zip(ARRANGEMENTS + ARRANGEMENTS, outs):  # earlier outputs not overwritten by later replays
        assert rel_max(out, reference(model, names, ids)) < 1e-5
    other = torch.randint(0, 128, (4, 6), device="cuda")
    assert rel_max(run(ARRANGEMENTS[0], other).logits, reference(model, ARRANGEMENTS[0], other)) < 1e-5
    for _ in range(2):  # under autocast: its own graph, in bf16 like per_row's
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(ARRANGEMENTS[0], ids).logits
            with torch.no_grad(), lorakit.per_row(model, ARRANGEMENTS[0]):
                ref = model(ids, use_cache=False).logits
        assert out.dtype == ref.dtype == torch.bfloat16 and rel_max(out.float(), ref.float()) < 1e-2
    assert len(run) == 2


@cuda
def test_replays_follow_writes_to_adapters_and_to_the_base(tiny_llama):
    model = three_adapters(tiny_llama, "cuda")
    run = lorakit.PerRowGraphs(model)
    ids = torch.randint(0, 128, (4, 6), device="cuda")
    names = ARRANGEMENTS[0]
    run(names, ids), run(names, ids)
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.deltas["b"].lora_B.add_(0.5)  # in place: seen by the plan check that runs beside the replay
    assert rel_max(run(names, ids).logits, reference(model, names, ids)) < 1e-5
    run(names, ids[:, :5])  # a second graph
    assert len(run) == 2
    layer.base_layer.weight.data = layer.base_layer.weight.data * 2  # new storage: seen before the replay
    assert rel_max(run(names, ids).logits, reference(model, names, ids)) < 1e-5
    assert len(run) == 1  # the other signature's graph went too (it held the old weight)
    lorakit.multi.routing.clear_stacks(model)
    assert rel_max(run(names, ids).logits, reference(model, names, ids)) < 1e-5
    with lorakit.disabled(model):
        assert rel_max(run(names, ids).logits, reference(model, [None] * 4, ids)) < 1e-5
    assert rel_max(run(names, ids).logits, reference(model, names, ids)) < 1e-5
    lorakit.merge(model, ["a"])
    with pytest.raises(MixedBatchError, match="merged"):
        run(names, ids)


@cuda
def test_a_replay_under_autocast_casts_inside_its_graph():
    """Autocast caches its casts of leaf tensors that require grad (here the trained base biases) and frees them when
    its block ends: a graph that captured a cached cast would read freed memory in a later block."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True))
    for name in ("a", "b"):
        lorakit.add_adapter(model, small_lora(target_modules="all-linear", bias="all"), name)
    model = model.cuda().eval()
    assert model.model.layers[0].self_attn.q_proj.base_layer.bias.requires_grad
    run = lorakit.PerRowGraphs(model)
    ids = torch.randint(0, 128, (2, 6), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        run(["a", "b"], ids), run(["a", "b"], ids)
    junk = [torch.randn(1 << 16, device="cuda") for _ in range(64)]  # reuses the memory the block freed
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = run(["a", "b"], ids).logits
        with torch.no_grad(), lorakit.per_row(model, ["a", "b"]):
            ref = model(ids, use_cache=False).logits
    assert len(run) == 1 and len(junk) == 64
    assert rel_max(out.float(), ref.float()) < 1e-2
