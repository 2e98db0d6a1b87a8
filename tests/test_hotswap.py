"""lorakit.hot_swap: new weights in place, equal to loading the file fresh, no recompilation.

Same rank and scaling: the parameters receive the file's values, so outputs equal a fresh load_adapter
bit for bit (torch.equal). A smaller rank or another alpha folds the scale ratio into lora_B (one extra
fp32 multiply), so those compare within 1e-5 relative.
"""

import copy

import pytest
import torch

import lorakit
from lorakit.multi.hotswap import HotSwapError


def _lora(**kw):
    return lorakit.LoraConfig(**({"r": 8, "lora_alpha": 16, "init_lora_weights": False,
                                  "target_modules": ["q_proj", "v_proj", "embed_tokens"]} | kw))


@pytest.fixture
def base(tiny_llama):
    return tiny_llama


def _saved(base, tmp_path, label, seed, **kw):
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    lorakit.add_adapter(model, _lora(**kw))
    return lorakit.save_adapter(model, tmp_path / label)


def _fresh(base, directory):
    return lorakit.load_adapter(copy.deepcopy(base), directory)


def _params(model):
    return {k: p.detach().clone() for k, p in model.named_parameters()}


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def test_same_rank_swap_equals_a_fresh_load_and_keeps_parameter_identity(base, tmp_path):
    model = _fresh(base, _saved(base, tmp_path, "one", 1))
    identity = {k: id(p) for k, p in model.named_parameters()}
    new = _saved(base, tmp_path, "two", 2)
    before = model(IDS).logits
    assert lorakit.hot_swap(model, "default", new) is model
    after = model(IDS).logits
    assert torch.equal(after, _fresh(base, new)(IDS).logits) and not torch.equal(after, before)
    assert identity == {k: id(p) for k, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [dict(r=4, lora_alpha=32), dict(r=2, lora_alpha=3, use_rslora=True),
                                dict(r=8, lora_alpha=4, target_modules=["q_proj"])],
                         ids=["smaller-rank-other-alpha", "rslora", "fewer-modules"])
def test_rank_alpha_and_target_changes(base, tmp_path, kw):
    model = _fresh(base, _saved(base, tmp_path, "one", 1))
    new = _saved(base, tmp_path, "two", 2, **kw)
    lorakit.hot_swap(model, "default", new)
    expected = _fresh(base, new)(IDS).logits
    out = model(IDS).logits
    assert float((out - expected).abs().max() / expected.abs().max()) < 1e-5
    delta = model.model.layers[0].self_attn.q_proj.deltas["default"]
    assert delta.r == 8 and delta.lora_A.shape[0] == 8  # still the loaded rank, zero-padded
    assert not delta.lora_A[kw["r"]:].any()


def test_bad_swaps_raise_and_leave_the_model_untouched(base, tmp_path):
    model = _fresh(base, _saved(base, tmp_path, "one", 1, r=4))
    before = _params(model)
    cases = {
        "larger rank": (_saved(base, tmp_path, "big", 2, r=8), HotSwapError),
        "more modules": (_saved(base, tmp_path, "more", 2, r=4, target_modules=["q_proj", "k_proj"]), HotSwapError),
        "other variant": (_saved(base, tmp_path, "dora", 2, r=4, use_dora=True), HotSwapError),
        "missing dir": (tmp_path / "nothing", lorakit.AdapterFormatError),
    }
    for label, (directory, error) in cases.items():
        with pytest.raises(error):
            lorakit.hot_swap(model, "default", directory)
        assert all(torch.equal(p, before[k]) for k, p in model.named_parameters()), label
    with pytest.raises(lorakit.AdapterNameError):
        lorakit.hot_swap(model, "nope", _saved(base, tmp_path, "ok", 3, r=4))
    lorakit.merge(model)
    with pytest.raises(HotSwapError, match="unmerge"):
        lorakit.hot_swap(model, "default", tmp_path / "ok")


def test_other_variants_swap_through_the_generic_path(base, tmp_path):
    """DoRA has no swapper of its own: same shapes and constants copy exactly, another rank is refused."""
    model = _fresh(base, _saved(base, tmp_path, "one", 1, use_dora=True))
    new = _saved(base, tmp_path, "two", 2, use_dora=True)
    lorakit.hot_swap(model, "default", new)
    assert torch.equal(model(IDS).logits, _fresh(base, new)(IDS).logits)
    with pytest.raises(HotSwapError, match="differs"):
        lorakit.hot_swap(model, "default", _saved(base, tmp_path, "three", 3, use_dora=True, r=4))


def test_swap_inside_a_per_row_block_is_seen(base, tmp_path):
    model = _fresh(base, _saved(base, tmp_path, "one", 1))
    lorakit.load_adapter(model, _saved(base, tmp_path, "other", 5), "other")
    new = _saved(base, tmp_path, "two", 2)
    with torch.no_grad(), lorakit.per_row(model, ["default", "other"]):
        model(IDS)
        lorakit.hot_swap(model, "default", new)
        out = model(IDS).logits
    expected = _fresh(base, new)(IDS).logits
    assert float((out[0] - expected[0]).abs().max() / expected[0].abs().max()) < 1e-5


def test_compiled_model_is_not_recompiled(base, tmp_path):
    from torch._dynamo.testing import CompileCounter

    model = _fresh(base, _saved(base, tmp_path, "one", 1))
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        first = compiled(IDS).logits
        frames = counter.frame_count
        assert frames >= 1
        new = _saved(base, tmp_path, "two", 2, r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"])
        lorakit.hot_swap(model, "default", new)
        second = compiled(IDS).logits
    assert counter.frame_count == frames  # no recompilation
    expected = _fresh(base, new)(IDS).logits
    assert not torch.equal(second, first)
    assert float((second - expected).abs().max() / expected.abs().max()) < 1e-5
    torch._dynamo.reset()


def test_delete_after_hot_swap_restores_the_swapped_in_base_biases(tmp_path):
    """An adapter loaded without biases, hot-swapped with a file that writes base biases: deleting it (or
    unloading without merging) puts the base's own biases back."""
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))

    def saved(label, bias):
        model = net()
        lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False,
                                                      bias=bias))
        with torch.no_grad():
            model[0].bias.fill_(5.0)
        return lorakit.save_adapter(model, tmp_path / label)

    plain, with_bias = saved("plain", "none"), saved("biased", "all")
    for finish in (lambda m: lorakit.delete_adapter(m, "default"), lambda m: lorakit.unload(m, merge=False)):
        model = net()
        original = model[0].bias.detach().clone()
        lorakit.load_adapter(model, plain)
        lorakit.hot_swap(model, "default", with_bias)
        assert torch.equal(model[0].bias, torch.full_like(original, 5.0))
        model = finish(model) or model
        assert torch.equal(model[0].bias, original)
