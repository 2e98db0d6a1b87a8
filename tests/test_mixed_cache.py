"""per_row's caches across blocks (multi/layer_plans.py): the stacked adapters and the plans a block remembers for
the next must follow every change the contract names (in-place writes, assignments, conversions, deltas moved
between names), hold nothing alive, and compare deltas by identity. Every output is held to impl="reference"."""

import torch
from torch import nn

import lorakit
from lorakit.multi import layer_plans

from support import rel_max, small_lora


def first_adapted(model):
    """The model's first adapted layer in per_row's walk: the key of its remembered block plans."""
    return lorakit.multi.routing._wrappers(model)[0][0]


def test_cached_stacks_follow_a_dtype_conversion(tiny_llama):
    """model.double() converts parameters through `param.data = ...` (same tensors, same version counters, new
    storage): the next block must stack the converted factors, not serve the cached float32 copy. LoRA only: a
    DoRA delta assigns its own cache attribute in forward, which would re-check the plans and hide a missed
    conversion."""
    for name in ("a", "b"):
        lorakit.add_adapter(tiny_llama, small_lora(target_modules="all-linear", init_lora_weights=False), name)
    tiny_llama.eval()
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"]):
        tiny_llama(ids)
    tiny_llama.double()
    with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"]):
        out = tiny_llama(ids).logits
    assert layer_plans._STACKS[tiny_llama.model.layers[0].self_attn.q_proj].stack.a.dtype == torch.float64
    with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"], impl="reference"):
        assert rel_max(out, tiny_llama(ids).logits) < 1e-12


def test_a_later_block_sees_deltas_moved_between_names(tiny_llama):
    """A block over the same adapters as the last one takes that block's plans (layer_plans.recall_block), each
    checked at its layer's first call: deltas swapped between two names in every layer's dict (nothing is assigned to a
    delta, no counter moves) must still show in the rows."""
    for name in ("a", "b"):
        lorakit.add_adapter(tiny_llama, small_lora(target_modules="all-linear", init_lora_weights=False), name)
    tiny_llama.eval()
    ids = torch.randint(0, 128, (2, 5))
    for _ in range(2):  # the second block recalls the first one's plans
        with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"]):
            before = tiny_llama(ids).logits
    recalled = layer_plans.recall_block(first_adapted(tiny_llama), ("a", "b"))
    assert recalled and all(layer_plans.plan_is_current(layer, lp) for layer, lp in recalled.values())
    for _, layer in lorakit.adapted_layers(tiny_llama):
        layer.deltas["a"], layer.deltas["b"] = layer.deltas["b"], layer.deltas["a"]
    assert not any(layer_plans.plan_is_current(layer, lp) for layer, lp in recalled.values())
    with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"]):
        out = tiny_llama(ids).logits
    with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"], impl="reference"):
        ref = tiny_llama(ids).logits
    assert rel_max(out, ref) < 1e-6
    assert rel_max(out, before) > 1e-3  # the rows really changed adapters


def test_a_later_block_compares_deltas_by_identity_not_equality(tiny_llama, monkeypatch):
    """A delta class may define value equality: a recalled plan must still see deltas swapped between names."""
    for name in ("a", "b"):
        lorakit.add_adapter(tiny_llama, small_lora(target_modules="all-linear", init_lora_weights=False), name)
    tiny_llama.eval()
    delta_class = type(tiny_llama.model.layers[0].self_attn.q_proj.deltas["a"])
    monkeypatch.setattr(delta_class, "__eq__", lambda self, other: isinstance(other, delta_class))
    ids = torch.randint(0, 128, (2, 5))
    for _ in range(2):  # the second block recalls the first one's plans
        with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"]):
            tiny_llama(ids)
    for _, layer in lorakit.adapted_layers(tiny_llama):
        layer.deltas["a"], layer.deltas["b"] = layer.deltas["b"], layer.deltas["a"]
    with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"]):
        out = tiny_llama(ids).logits
    with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"], impl="reference"):
        assert rel_max(out, tiny_llama(ids).logits) < 1e-6


def test_remembered_blocks_keep_no_unloaded_layer_alive(tiny_llama):
    """The plans a block remembers for the next one are held weakly: after unload, the adapted layers (with their
    deltas and the stacked copies of every adapter) are freed."""
    import gc
    import weakref

    for name in ("a", "b"):
        lorakit.add_adapter(tiny_llama, small_lora(target_modules="all-linear", init_lora_weights=False), name)
    tiny_llama.eval()
    ids = torch.randint(0, 128, (2, 5))
    for _ in range(2):
        with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"]):
            tiny_llama(ids)
    assert layer_plans.recall_block(first_adapted(tiny_llama), ("a", "b"))
    refs = [weakref.ref(layer) for _, layer in lorakit.adapted_layers(tiny_llama)]
    lorakit.unload(tiny_llama)
    gc.collect()
    assert refs and all(ref() is None for ref in refs)


def test_a_write_inside_a_block_shows_in_the_next(tiny_llama):
    """A block remembers its plans with the versions they were built from: factors written after their layer was
    planned, inside the same block (in place, or replaced by a new parameter), must show in the next block's rows."""
    for name in ("a", "b"):
        lorakit.add_adapter(tiny_llama, small_lora(target_modules="all-linear", init_lora_weights=False), name)
    tiny_llama.eval()
    ids = torch.randint(0, 128, (2, 5))
    for write in ("in place", "replaced"):
        with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"]):
            tiny_llama(ids)
            for _, layer in lorakit.adapted_layers(tiny_llama):
                for delta in layer.deltas.values():
                    b = delta.linear_factors()[1]
                    if write == "in place":
                        b.mul_(3.0)
                    else:
                        name = next(n for n, p in delta.named_parameters(recurse=False) if p is b)
                        setattr(delta, name, nn.Parameter(b.detach() * 3.0))
        with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"]):
            out = tiny_llama(ids).logits
        with torch.no_grad(), lorakit.per_row(tiny_llama, ["a", "b"], impl="reference"):
            assert rel_max(out, tiny_llama(ids).logits) < 1e-5, write
