"""The correctness contract, run for every (variant, layer type) pair in tests/variants.py."""

import pytest
import torch

import lorakit
from support import rel_max
from variants import matrix


def _setup(case, variant, fresh=False, name="default"):
    torch.manual_seed(1)
    model = case.build()
    x = case.inputs()
    with torch.no_grad():
        base_out = model(x)
    lorakit.add_adapter(model, variant.make(case.targets, fresh), name=name)
    return model, x, base_out



@pytest.mark.parametrize("variant,case", matrix())
def test_fresh_adapter_is_a_noop(variant, case):
    if not variant.noop_at_init:
        pytest.skip(f"{variant.name}'s default init is not a no-op")
    model, x, base_out = _setup(case, variant, fresh=True)
    with torch.no_grad():
        assert rel_max(model(x), base_out) <= 1e-6


@pytest.mark.parametrize("variant,case", matrix())
def test_merge_matches_unmerged_and_unmerge_restores(variant, case):
    model, x, base_out = _setup(case, variant)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        adapted = model(x)
        assert rel_max(adapted, base_out) > 1e-4, "a randomised adapter must change the output"
        lorakit.merge(model)
        assert rel_max(model(x), adapted) <= 1e-5
        lorakit.unmerge(model)
        assert rel_max(model(x), adapted) <= 1e-5
    for n, p in model.named_parameters():
        if n in weights:
            assert rel_max(p, weights[n]) <= 1e-6, n


@pytest.mark.parametrize("variant,case", matrix())
def test_save_load_round_trip_is_bit_exact(variant, case, tmp_path):
    model, x, _ = _setup(case, variant)
    lorakit.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = case.build()
    lorakit.load_adapter(fresh, tmp_path / "a")
    saved, loaded = lorakit.adapter_state_dict(model), lorakit.adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys() and saved
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


@pytest.mark.parametrize("variant,case", matrix())
def test_two_adapters_switch_sum_disable_delete(variant, case):
    model, x, base_out = _setup(case, variant, name="a")
    torch.manual_seed(7)
    lorakit.add_adapter(model, variant.make(case.targets, False), name="b")
    assert lorakit.active_adapters(model) == ["a"]  # a later adapter is added inactive, as in PEFT
    with torch.no_grad():
        out_a = model(x)
        lorakit.set_active(model, "b")
        out_b = model(x)
        lorakit.set_active(model, ["a", "b"])
        out_ab = model(x)
        with lorakit.disabled(model):
            assert torch.equal(model(x), base_out)
        assert torch.equal(model(x), out_ab)
        lorakit.set_active(model, None)
        assert torch.equal(model(x), base_out)
        lorakit.set_active(model, ["a", "b"])
        lorakit.merge(model)  # merging both must give the same model as running both in parallel
        assert rel_max(model(x), out_ab) <= 1e-5
        lorakit.unmerge(model)
    assert rel_max(out_a, out_b) > 1e-4 and rel_max(out_ab, out_a) > 1e-4
    lorakit.delete_adapter(model, "a")
    assert lorakit.list_adapters(model) == ["b"] and lorakit.active_adapters(model) == ["b"]
    lorakit.set_active(model, "b")
    with torch.no_grad():
        assert torch.allclose(model(x), out_b, rtol=1e-5, atol=1e-6)
    lorakit.delete_adapter(model, "b")
    assert not list(lorakit.adapted_layers(model))
    with torch.no_grad():
        assert rel_max(model(x), base_out) <= 1e-6  # exact up to the fp32 rounding of one merge/unmerge cycle


@pytest.mark.parametrize("variant,case", matrix())
def test_gradients_reach_only_the_adapter(variant, case):
    model, x, _ = _setup(case, variant, fresh=True)
    model.train()
    out = model(x)
    out.float().pow(2).mean().backward()
    adapter = {n for n, p in model.named_parameters() if ".deltas." in n}
    assert adapter
    for n, p in model.named_parameters():
        if n in adapter:
            assert p.requires_grad and p.grad is not None, n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert any(model.get_parameter(n).grad.abs().sum() > 0 for n in adapter)
