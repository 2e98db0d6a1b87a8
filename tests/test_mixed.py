"""Mixed-adapter batches (lorakit.per_row): every row equals the model run with that row's adapter alone.

Exactness, stated per test:
- impl="reference" (each adapter's own math on the whole batch, rows picked by torch.where) must equal
  single-adapter copies of the model bit for bit (torch.equal): same ops on the same shapes.
- rows without an adapter equal the disabled model bit for bit on every impl (they add exact zeros).
- the vectorised torch path (gather + bmm) runs other GEMM shapes than the reference, so its fp32 sums
  may round differently: held to the reference within 1e-5 relative (max |Δ| / max |ref|), and generated
  tokens (greedy, beam search, sampling) must be identical.
"""


import pytest
import torch
from torch import nn

import lorakit
from lorakit.multi.routing import MixedBatchError

from support import only, rel_max, small_lora
from variants import LAYER_CASES, VARIANTS


@pytest.fixture
def llama3(tiny_llama):
    """tiny_llama with three adapters of different ranks, targets and variants (c is DoRA if available)."""
    lorakit.add_adapter(tiny_llama, small_lora(target_modules="all-linear"), "a")
    lorakit.add_adapter(tiny_llama, small_lora(r=8, lora_alpha=4, use_rslora=True,
                                          target_modules=["q_proj", "v_proj", "embed_tokens"]), "b")
    lorakit.add_adapter(tiny_llama, small_lora(r=2, target_modules=["q_proj", "down_proj"], use_dora=True), "c")
    return tiny_llama


NAMES = ["a", "b", None, "c", "a", "b"]


def _expected(model, ids, names, call):
    singles = {n: only(model, n) for n in set(names)}
    outs = {n: call(m, ids) for n, m in singles.items()}
    return torch.stack([outs[n][i] for i, n in enumerate(names)])


def test_reference_impl_is_bit_identical_to_single_adapter_models(llama3):
    ids = torch.randint(0, 128, (len(NAMES), 11))
    expected = _expected(llama3, ids, NAMES, lambda m, x: m(x).logits)
    with lorakit.per_row(llama3, NAMES, impl="reference"):
        out = llama3(ids).logits
    assert torch.equal(out, expected)


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_vectorised_rows_match_the_reference(llama3, impl):
    ids = torch.randint(0, 128, (len(NAMES), 11))
    with lorakit.per_row(llama3, NAMES, impl="reference"):
        ref = llama3(ids).logits
    with lorakit.per_row(llama3, NAMES, impl=impl):
        out = llama3(ids).logits
    assert rel_max(out, ref) < 1e-5
    with lorakit.disabled(llama3):
        base = llama3(ids).logits
    assert torch.equal(out[2], base[2])  # the None row: exact
    for i, n in enumerate(NAMES):  # and each adapter really changes its rows
        if n is not None:
            assert (out[i] - base[i]).abs().max() > 1e-3


def test_uniform_batch_runs_the_adapter_own_math_exactly(llama3):
    ids = torch.randint(0, 128, (3, 7))
    expected = only(llama3, "a")(ids).logits
    with lorakit.per_row(llama3, ["a"] * 3):
        assert torch.equal(llama3(ids).logits, expected)
    with lorakit.per_row(llama3, [None] * 3), lorakit.disabled(llama3):
        assert torch.equal(llama3(ids).logits, only(llama3, None)(ids).logits)


def _gen(**kw):
    return lambda m, x: m.generate(x, max_new_tokens=4, pad_token_id=0, **kw)


GEN_NAMES = ["a", "b", None, "c", "a"]


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(num_beams=3, do_sample=False),
                                dict(num_beams=2, num_return_sequences=2, do_sample=False)],
                         ids=["greedy", "beams", "beams-return2"])
def test_generate_rows_equal_single_adapter_generate(llama3, kw):
    ids = torch.randint(1, 128, (len(GEN_NAMES), 5))
    expected = _expected(llama3, ids, GEN_NAMES, lambda m, x: _gen(**kw)(m, x).view(len(GEN_NAMES), -1))
    for impl in ("reference", "auto"):
        with lorakit.per_row(llama3, GEN_NAMES, impl=impl):
            out = _gen(**kw)(llama3, ids).view(len(GEN_NAMES), -1)
        assert torch.equal(out, expected), impl


def test_sampling_with_several_sequences_per_row(llama3):
    """Sampling draws from the whole batch's RNG stream: the oracle is one full-batch run per adapter with
    the same seed (each row's draw depends only on its own logits), rows picked afterwards."""
    names = GEN_NAMES
    ids = torch.randint(1, 128, (len(names), 5))
    kw = dict(do_sample=True, top_k=20, num_return_sequences=3, max_new_tokens=4, pad_token_id=0)
    rows = {}
    for n in set(names):
        torch.manual_seed(7)
        rows[n] = only(llama3, n).generate(ids, **kw).view(len(names), 3, -1)
    expected = torch.stack([rows[n][i] for i, n in enumerate(names)])
    for impl in ("reference", "auto"):
        torch.manual_seed(7)
        with lorakit.per_row(llama3, names, impl=impl):
            out = llama3.generate(ids, **kw).view(len(names), 3, -1)
        assert torch.equal(out, expected), impl
    assert len({tuple(r.tolist()) for r in out[0]}) > 1  # really sampled


def test_slots_restored_after_the_block_and_on_errors(llama3):
    layers = [m for _, m in lorakit.adapted_layers(llama3)]
    with pytest.raises(RuntimeError, match="boom"):
        with lorakit.per_row(llama3, ["a", "b"]):
            assert all(m.routing is not None for m in layers)
            raise RuntimeError("boom")
    assert all(m.routing is None for m in layers)
    with pytest.raises(MixedBatchError, match="names for 2 rows but the model was called with 3 rows"):
        with lorakit.per_row(llama3, ["a", "b"]):
            llama3(torch.randint(0, 128, (3, 4)))
    assert all(m.routing is None for m in layers)


def test_bad_input_gives_lorakit_errors(llama3):
    with pytest.raises(lorakit.AdapterNameError, match="nope"):
        with lorakit.per_row(llama3, ["a", "nope"]):
            pass
    for bad in ([], [3], 3):
        with pytest.raises(MixedBatchError):
            with lorakit.per_row(llama3, bad):
                pass
    with pytest.raises(MixedBatchError, match="impl"):
        with lorakit.per_row(llama3, ["a"], impl="fast"):
            pass
    with lorakit.per_row(llama3, ["a"]):
        with pytest.raises(MixedBatchError, match="nested"):
            with lorakit.per_row(llama3, ["b"]):
                pass
    lorakit.merge(llama3, ["a"])
    with pytest.raises(MixedBatchError, match="unmerge"):
        with lorakit.per_row(llama3, ["a", "b"]):
            pass
    assert all(m.routing is None for _, m in lorakit.adapted_layers(llama3))


def test_modules_to_save_heads_are_routed_per_row(minilm_cls):
    """Sequence classification with a head per adapter (PEFT's SEQ_CLS modules_to_save)."""
    for name in ("pos", "neg"):
        lorakit.add_adapter(minilm_cls, small_lora(target_modules=["query", "value"], task_type="SEQ_CLS"), name)
        head = minilm_cls.classifier.copies[name]
        torch.nn.init.normal_(head.weight)
    ids = torch.randint(1000, 2000, (4, 9))
    names = ["neg", None, "pos", "neg"]
    expected = _expected(minilm_cls, ids, names, lambda m, x: m(x).logits)
    with lorakit.per_row(minilm_cls, names, impl="reference"):
        assert torch.equal(minilm_cls(ids).logits, expected)
    with lorakit.per_row(minilm_cls, names):
        assert rel_max(minilm_cls(ids).logits, expected) < 1e-5


# expert stacks (target_parameters) are refused by per_row (tests/test_moe_peft.py)
@pytest.mark.parametrize("case", [c for c in LAYER_CASES if c.kind not in ("gpt2", "experts")], ids=lambda c: c.kind)
def test_every_variant_shares_a_batch_withsmall_lora(case):
    """Each registered variant (tests/variants.py) next to two plain LoRAs of other ranks, on each layer type."""
    others = [v for v in VARIANTS if case.kind in v.layer_kinds and v.name != "lora"]
    model = case.build()
    lorakit.add_adapter(model, small_lora(target_modules=case.targets), "lora4")
    lorakit.add_adapter(model, small_lora(r=2, lora_alpha=16, target_modules=case.targets), "lora2")
    for v in others:
        torch.manual_seed(1)
        lorakit.add_adapter(model, v.make(case.targets, False), v.name)
    pool = ["lora4", "lora2", None] + [v.name for v in others]
    names = (pool * 2)[: max(6, len(pool))]
    x = case.inputs()
    x = x.repeat(len(names) // x.shape[0] + 1, *([1] * (x.dim() - 1)))[: len(names)]
    expected = _expected(model, x, names, lambda m, inp: m(inp))
    with lorakit.per_row(model, names, impl="reference"):
        assert torch.equal(model(x), expected)
    with lorakit.per_row(model, names):
        assert rel_max(model(x), expected) < 1e-5


def test_gpt2_conv1d_and_flattened_token_batches(tiny_gpt2):
    lorakit.add_adapter(tiny_gpt2, small_lora(target_modules=["c_attn", "c_fc"]), "a")
    lorakit.add_adapter(tiny_gpt2, small_lora(r=6, target_modules=["c_attn", "c_proj"]), "b")
    ids = torch.randint(0, 128, (4, 10))
    names = ["b", "a", None, "b"]
    expected = _expected(tiny_gpt2, ids, names, lambda m, x: m(x).logits)
    with lorakit.per_row(tiny_gpt2, names):
        assert rel_max(tiny_gpt2(ids).logits, expected) < 1e-5
    # a layer fed [B·T, in] (tokens flattened row-major inside the model) gets each row's adapter on its T tokens
    lin = _Flattening()
    lorakit.add_adapter(lin, small_lora(target_modules=["proj"]), "a")
    lorakit.add_adapter(lin, small_lora(target_modules=["proj"]), "b")
    x = torch.randn(3, 5, 8)
    expected = _expected(lin, x, ["a", None, "b"], lambda m, inp: m(inp))
    with lorakit.per_row(lin, ["a", None, "b"]):
        assert rel_max(lin(x), expected) < 1e-5


class _Flattening(nn.Module):
    """[B, T, 8] → a Linear on the flattened [B·T, 8] tokens → [B, T, 8]."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x.reshape(-1, x.shape[-1])).view(x.shape)


def test_cached_stacks_follow_every_change_between_blocks(llama3):
    """The per-layer stacks are cached across blocks: in-place writes, optimizer steps (fused too), a replaced
    parameter, a new scale and a re-added adapter must each show in the next block's rows (checked against the
    reference); new storage through `param.data` after the documented clear_stacks."""
    ids = torch.randint(0, 128, (len(NAMES), 7))
    llama3.eval()

    def check():  # without gradients: the cached stacks serve inference only
        with torch.no_grad(), lorakit.per_row(llama3, NAMES, impl="reference"):
            ref = llama3(ids).logits
        with torch.no_grad(), lorakit.per_row(llama3, NAMES):
            out = llama3(ids).logits
        assert rel_max(out, ref) < 1e-5
        return out

    first = check()
    q = llama3.model.layers[0].self_attn.q_proj.deltas["a"]
    with torch.no_grad():
        q.lora_B.add_(0.5)  # in place through the parameter: its version counter moves
    assert not torch.equal(check(), first)
    params = [p for n, p in llama3.named_parameters() if ".a." in n or ".b." in n]
    for p in params:
        p.requires_grad_(True)
    with lorakit.per_row(llama3, NAMES):
        llama3(ids).logits.square().mean().backward()
    torch.optim.SGD(params, lr=0.5).step()
    check()
    with lorakit.per_row(llama3, NAMES):
        llama3(ids).logits.square().mean().backward()
    torch.optim.AdamW(params, lr=0.5, fused=True).step()  # a fused step writes without moving version counters
    check()
    q.lora_B.data = q.lora_B.data + 1  # new storage, the same tensor and version: not seen by the per-block check,
    llama3.eval()  # but any assignment to a delta (here `training`) runs the full one, storage included
    check()
    q.lora_B.data = q.lora_B.data + 1  # alone, it needs the documented clear_stacks
    lorakit.multi.routing.clear_stacks(llama3)
    check()
    q.lora_A = nn.Parameter(torch.randn_like(q.lora_A))  # replaced, not written
    check()
    q.scaling = q.scaling * 3
    check()
    lorakit.delete_adapter(llama3, "b")
    lorakit.add_adapter(llama3, small_lora(r=3, target_modules=["q_proj", "o_proj"], init_lora_weights=False), "b")
    llama3.eval()
    check()


def test_hooks_on_a_base_layer_still_run_inside_per_row(tiny_llama):
    """per_row computes a plain base nn.Linear directly (host time); a hook on that layer (or any global one) and an
    instance forward (accelerate's offload hooks) must still be honoured."""
    for name in ("a", "b"):
        lorakit.add_adapter(tiny_llama, small_lora(target_modules=["q_proj"], init_lora_weights=False), name)
    tiny_llama.eval()
    ids = torch.randint(0, 128, (2, 5))
    base = tiny_llama.model.layers[0].self_attn.q_proj.base_layer
    seen = []
    handle = base.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"]):
        tiny_llama(ids)
    handle.remove()
    assert seen == [torch.Size([2, 5, base.out_features])]
    base.forward = lambda x, plain=base.forward: seen.append("instance") or plain(x)
    try:
        with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"]):
            tiny_llama(ids)
    finally:
        del base.forward
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append("global") if module is base else None)
    try:
        with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"]):
            tiny_llama(ids)
    finally:
        handle.remove()
    assert seen[1:] == ["instance", "global"]


def test_per_row_with_a_base_weight_held_as_a_plain_attribute(tiny_llama):
    """FSDP1 sets its unsharded weights on the base Linear as plain attributes, not parameters: per_row computes such
    a layer through its module call."""
    for name in ("a", "b"):
        lorakit.add_adapter(tiny_llama, small_lora(target_modules=["q_proj"], init_lora_weights=False), name)
    tiny_llama.eval()
    base = tiny_llama.model.layers[0].self_attn.q_proj.base_layer
    weight = base.weight.detach().clone()
    del base.weight
    base.weight = weight
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"]):
        out = tiny_llama(ids).logits
    with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"], impl="reference"):
        assert rel_max(out, tiny_llama(ids).logits) < 1e-5
