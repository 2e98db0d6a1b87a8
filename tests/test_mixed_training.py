"""Training on mixed batches: one backward over rows of several adapters gives each adapter exactly the
gradient it gets from its own rows alone, and one optimizer step moves only the adapters in the batch.

impl="reference" is compared with torch.equal to single-adapter models run on the whole batch with the loss
on that adapter's rows (identical ops and shapes). The vectorised path (gather + bmm, the default) is
compared with single-adapter models run on their own rows only, within 1e-5 relative: its GEMMs have
other shapes, so fp32 sums may round differently.
"""


import pytest
import torch
import torch.nn.functional as F

import lorakit
from support import only, small_lora

NAMES = ["a", "b", None, "a", "c", "b"]




@pytest.fixture
def model(tiny_llama):
    lorakit.add_adapter(tiny_llama, small_lora(target_modules="all-linear"), "a")
    lorakit.add_adapter(tiny_llama, small_lora(r=8, target_modules=["q_proj", "v_proj", "embed_tokens"]), "b")
    lorakit.add_adapter(tiny_llama, small_lora(r=2, target_modules=["k_proj", "down_proj"], use_dora=True), "c")
    lorakit.add_adapter(tiny_llama, small_lora(target_modules=["o_proj"]), "idle")  # never in the batch
    return tiny_llama.train()


def _row_losses(model, ids):
    """Summed next-token cross-entropy per row [B] (sum: gradients split cleanly by row)."""
    logits = model(ids).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return loss.view(ids.shape[0], -1).sum(1)


def _grads(model, name):
    return {k: p.grad for k, p in model.named_parameters() if f".{name}." in k and p.requires_grad}


def _mixed_grads(model, ids, impl):
    with lorakit.per_row(model, NAMES, impl=impl):
        _row_losses(model, ids).sum().backward()
    return {n: _grads(model, n) for n in ("a", "b", "c", "idle")}


def test_reference_impl_gradients_are_bit_identical(model):
    ids = torch.randint(0, 128, (len(NAMES), 9))
    mixed = _mixed_grads(model, ids, "reference")
    for name in ("a", "b", "c"):
        single = only(model, name)
        single.zero_grad(set_to_none=True)
        mine = torch.tensor([n == name for n in NAMES])
        (_row_losses(single, ids) * mine).sum().backward()
        expected = _grads(single, name)
        assert expected and set(expected) == set(mixed[name])
        for key, g in expected.items():
            assert torch.equal(mixed[name][key], g), key


def test_vectorised_gradients_equal_per_adapter_runs_on_own_rows(model):
    ids = torch.randint(0, 128, (len(NAMES), 9))
    mixed = _mixed_grads(model, ids, "auto")
    assert all(g is None for g in mixed["idle"].values())  # not in the batch: no gradient at all
    for name in ("a", "b", "c"):
        single = only(model, name)
        single.zero_grad(set_to_none=True)
        rows = [i for i, n in enumerate(NAMES) if n == name]
        _row_losses(single, ids[rows]).sum().backward()
        for key, g in _grads(single, name).items():
            err = float((mixed[name][key] - g).abs().max() / g.abs().max())
            assert err < 1e-5, (key, err)


def test_one_optimizer_step_moves_only_the_batch_adapters(model):
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 128, (len(NAMES), 9))
    with lorakit.per_row(model, NAMES):
        _row_losses(model, ids).mean().backward()
    opt.step()
    for k, p in model.named_parameters():
        moved = not torch.equal(p, before[k])
        in_batch = any(f".{n}." in k for n in ("a", "b", "c"))
        assert moved == in_batch, k


def test_dropout_is_per_row_with_each_adapter_rate(tiny_llama):
    lorakit.add_adapter(tiny_llama, small_lora(target_modules="all-linear", lora_dropout=0.5), "drop")
    lorakit.add_adapter(tiny_llama, small_lora(target_modules="all-linear"), "keep")
    tiny_llama.train()
    ids = torch.randint(0, 128, (4, 6))
    names = ["drop", "keep", None, "drop"]
    with torch.no_grad(), lorakit.per_row(tiny_llama, names):
        first, second = tiny_llama(ids).logits, tiny_llama(ids).logits
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[3], second[3])
