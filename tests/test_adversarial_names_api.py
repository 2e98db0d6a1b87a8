"""Adapter names and API misuse: reserved names, names listed twice, a string where a list is expected, per_row
batches that do not fit, configs that are not configs, saving onto a file. Each ends in correct behaviour or a
LorakitError naming what was wrong, with the model exactly as before."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core import api
from lorakit.errors import AdapterFormatError, AdapterNameError, ConfigError, MixedBatchError
from support import one_thread, small_lora  # noqa: F401
from test_adversarial_config import _snapshot, assert_untouched

RESERVED = ["forward", "to", "keys", "update", "training", "__class__", "_modules", "state_dict", "values"]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.fixture(params=["plain", "already adapted"])
def victim(request):
    model = _net()
    if request.param == "already adapted":
        lorakit.add_adapter(model, small_lora(target_modules=["0"]), "x")
    return model


@pytest.fixture
def two():
    """_net() with adapters "a" (active) and "b", both changing the output."""
    model = _net()
    lorakit.add_adapter(model, small_lora(target_modules=["0", "2"]), "a")
    lorakit.add_adapter(model, small_lora(r=2, target_modules=["0"]), "b")
    return model


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    model = _net()
    lorakit.add_adapter(model, small_lora(target_modules=["0", "2"]))
    return lorakit.save_adapter(model, tmp_path_factory.mktemp("saved") / "adapter")


# --- reserved names ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RESERVED)
@pytest.mark.parametrize("entry", ["add_adapter", "load_adapter"])
def test_reserved_name_is_refused_before_the_model_changes(victim, saved_dir, entry, name):
    snap = _snapshot(victim)
    with pytest.raises(AdapterNameError, match="cannot be an adapter name") as e:
        if entry == "add_adapter":
            lorakit.add_adapter(victim, small_lora(target_modules=["0", "2"]), name)
        else:
            lorakit.load_adapter(victim, saved_dir, name)
    assert repr(name) in str(e.value)
    assert_untouched(victim, snap)


def test_a_failure_inside_attach_leaves_no_empty_wrapper(victim, monkeypatch):
    """Even if a bad name got past the check, the half-built wrappers are taken out again."""
    monkeypatch.setattr(api, "check_new_name", lambda model, name: None)
    snap = _snapshot(victim)
    with pytest.raises(KeyError):  # torch's ModuleDict refuses the key
        lorakit.add_adapter(victim, small_lora(target_modules=["0", "2"]), "forward")
    assert_untouched(victim, snap)


# --- names listed twice, a string for a list, names that are not strings ------------------------------------------
@pytest.mark.parametrize("call", [
    lambda m: lorakit.set_active(m, ["a", "a"]),
    lambda m: lorakit.set_active(m, ["b", "a", "b"]),
    lambda m: lorakit.merge(m, ["a", "a"]),
    lambda m: lorakit.merge(m, ("b", "b")),
], ids=["set_active-aa", "set_active-bab", "merge-aa", "merge-bb"])
def test_a_name_listed_twice_is_refused(two, call):
    x = torch.randn(3, 16)
    before = two(x)
    snap = _snapshot(two)
    with pytest.raises(AdapterNameError, match="listed twice"):
        call(two)
    assert_untouched(two, snap)
    assert torch.equal(two(x), before)


@pytest.mark.parametrize("call", [
    lambda m: lorakit.set_active(m, [["a"]]), lambda m: lorakit.set_active(m, 3),
    lambda m: lorakit.set_active(m, [None]), lambda m: lorakit.set_active(m, {"a": 1}),
    lambda m: lorakit.merge(m, 3), lambda m: lorakit.merge(m, [b"a"]), lambda m: lorakit.merge(m, "ab"),
    lambda m: lorakit.delete_adapter(m, ["a"]), lambda m: lorakit.get_config(m, {"a"}),
    lambda m: lorakit.save_adapter(m, "/nonexistent/x", name=["a"]),
], ids=["active-nested", "active-int", "active-None-item", "active-dict", "merge-int", "merge-bytes",
        "merge-unknown", "delete-list", "get_config-set", "save-list"])
def test_names_that_are_not_adapter_names_are_refused(two, call):
    snap = _snapshot(two)
    with pytest.raises(AdapterNameError):
        call(two)
    assert_untouched(two, snap)


def test_one_name_as_a_string_works_everywhere(two):
    x = torch.randn(3, 16)
    lorakit.set_active(two, "b")
    assert lorakit.active_adapters(two) == ["b"]
    expected = two(x)
    lorakit.merge(two, "b")  # not "no adapter named 'b'" per character
    assert [layer.merged for _, layer in lorakit.adapted_layers(two)] == [["b"], []]
    assert torch.allclose(two(x), expected, atol=1e-6)
    lorakit.unmerge(two)
    lorakit.set_active(two, "a")
    alone = two(x[:1])
    lorakit.set_active(two, "b")
    with lorakit.per_row(two, "a"):  # one name: a batch of one row
        assert torch.equal(two(x[:1]), alone)
        with pytest.raises(MixedBatchError, match="names for 1 row but the model was called with 3 rows"):
            two(x)


def test_set_active_of_two_distinct_adapters_sums_them_once(two):
    x = torch.randn(3, 16)
    with lorakit.disabled(two):
        base = two[0](x)
    lorakit.set_active(two, ["a", "b"])
    together = two[0](x)
    single = {}
    for n in ("a", "b"):
        lorakit.set_active(two, n)
        single[n] = two[0](x) - base
    assert torch.allclose(together, base + single["a"] + single["b"], atol=1e-5)


# --- per_row --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [4, 1, 3])
def test_per_row_refuses_a_batch_with_another_number_of_rows(two, rows):
    snap = _snapshot(two)
    x = torch.randn(rows, 16)
    with lorakit.per_row(two, ["a", "b"]):
        with pytest.raises(MixedBatchError, match=f"names for 2 rows but the model was called with {rows} row"):
            two(x)
    assert_untouched(two, snap)
    assert all(layer.routing is None for _, layer in lorakit.adapted_layers(two))
    assert "generate" not in two.__dict__


def test_per_row_accepts_generate_s_repeated_rows(tiny_llama):
    for name in ("a", "b"):
        lorakit.add_adapter(tiny_llama, small_lora(target_modules=["q_proj", "v_proj"]), name)
    ids = torch.randint(1, 128, (2, 5))
    with lorakit.per_row(tiny_llama, ["a", "b"]):
        out = tiny_llama.generate(ids, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False,
                                  pad_token_id=0)
        with pytest.raises(MixedBatchError, match="names for 2 rows but the model was called with 4 rows"):
            tiny_llama(ids.repeat_interleave(2, 0))  # the same rows outside generate: refused
    assert out.shape == (4, 7)
    assert "generate" not in tiny_llama.__dict__  # the class's generate again after the block


# --- configs that are not configs, and saving onto a file ----------------------------------------------------------
@pytest.mark.parametrize("config", [object(), "lora", {"peft_type": "LORA", "r": 4}, None, lorakit.LoraConfig],
                         ids=["object", "string", "dict", "None", "the-class"])
def test_add_adapter_with_something_that_is_not_a_config(victim, config):
    snap = _snapshot(victim)
    with pytest.raises(ConfigError, match="lorakit adapter config .* or a PEFT config"):
        lorakit.add_adapter(victim, config, "new")
    assert_untouched(victim, snap)


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_save_adapter_onto_a_file_is_refused(two, tmp_path, where):
    existing = tmp_path / "existing"
    existing.write_text("keep me")
    target = existing if where == "file" else existing / "sub"
    with pytest.raises(lorakit.OutputPathError, match="exists and is not a directory"):
        lorakit.save_adapter(two, target, name="a")
    assert existing.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_merge_requantized_with_a_name_as_a_string(two):
    snap = _snapshot(two)
    with pytest.raises(AdapterNameError, match="'nope'"):
        lorakit.merge_requantized(two, "nope")
    assert_untouched(two, snap)


def test_lorahub_search_takes_one_name_as_a_string(two):
    pytest.importorskip("scipy")
    x = torch.randn(4, 16)
    result = lorakit.lorahub_search(two, "b", lambda m: float(m(x).square().mean()), max_evals=3)
    assert list(result.weights) == ["b"]


def test_an_error_while_syncing_transformers_state_rolls_the_adapter_back(monkeypatch):
    from lorakit.core.hf import model as hf_model

    net = nn.Sequential(nn.Linear(4, 4))
    real, calls = hf_model.sync, []

    def failing(model):
        calls.append(model)
        if len(calls) == 1:
            raise RuntimeError("sync failed")
        real(model)

    monkeypatch.setattr(hf_model, "sync", failing)
    with pytest.raises(RuntimeError, match="sync failed"):
        lorakit.add_adapter(net, lorakit.LoraConfig(r=2, target_modules=["0"]))
    assert lorakit.list_adapters(net) == [] and isinstance(net[0], nn.Linear)
    assert all(p.requires_grad for p in net.parameters())
