"""CPU dropout masks from the counter-based hash (fast/dropout_hash.py, MASK_SOURCE "hash"): the fused linear's
forward and every gradient equal the reference math built with the same masks (written out by keep_masks for the
call's seed), with the masks kept as int8 from forward or drawn again in backward, through an RMSNorm recipe too;
the masks keep each element with probability 1 − p (to 2⁻¹⁶) independently of their neighbours, of the other
terms and of other seeds; seeded runs repeat and a checkpointed block's recompute replays them."""

import pytest
import torch

import lorakit
from lorakit.fast import dropout as fast_dropout
from lorakit.fast import dropout_hash as dh
from lorakit.fast.lora_linear import fused_linears
from dropout_support import norm_case, norm_output, plain_and_checkpointed, siblings_model
from dropout_support import seeds_of as _seeds_of
from dropout_support import with_masks as _with_masks
from support import one_thread, rel_norm  # noqa: F401

SEED = 2**62 + 777
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def hashed(monkeypatch):
    monkeypatch.setitem(fast_dropout.MASK_SOURCE, "cpu", "hash")


@pytest.fixture(params=["kept", "kept_row_blocks", "redrawn"])
def keep(request, monkeypatch):
    """Masks kept from forward (backward in one row block, or in blocks of two rows), or drawn again; always by
    the torch ops (the compiled kernels are held to them in tests/test_fast_dropout_native.py)."""
    monkeypatch.setenv("LORAKIT_NATIVE", "0")
    monkeypatch.setattr(dh, "KEEP_MASKS", request.param != "redrawn")
    if request.param == "kept_row_blocks":
        monkeypatch.setattr(dh, "CHUNK_WORDS", 72)  # 2·72 words per block over 3 terms of 24 columns: 2 rows
    return request.param != "redrawn"


def _model(dtype, mixed=True):
    return siblings_model(dtype, mixed=mixed)


def _grads(outs, inputs):
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    return torch.autograd.grad(outs, inputs, cot)


def _masks(seed, shape, n_terms=3, p=0.25):
    flat = (shape[:-1].numel(), shape[-1])
    return [m.view(shape) for m in dh.keep_masks(seed, range(n_terms), flat, p, torch.float64, "cpu")]


# --- the fused linear ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mixed", [True, False], ids=["with_plain_terms", "dropout_only"])
def test_fused_qkv_equals_the_reference_with_the_same_masks(monkeypatch, keep, dtype, mixed):
    m = _model(dtype, mixed)
    layers = (m.q, m.k, m.v)
    x = torch.randn(3, 7, 24, dtype=dtype, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]
    assert len(params) == 6 + 4 * mixed + 2  # A, B per term; the biases of q and v
    seeds = _seeds_of(monkeypatch)
    outs = fused_linears(x, layers)
    got = _grads(outs, [x, *params])
    assert len(seeds) == 1 and seeds[0] is not None
    queue = _with_masks(monkeypatch, _masks(seeds[0], x.shape))  # q, k, v: streams 0, 1, 2
    ref = tuple(layer.reference_forward(x) for layer in layers)
    want = _grads(ref, [x, *params])
    assert not queue  # the reference drew every mask, in order
    for a, b in zip((*outs, *got), (*ref, *want)):
        assert a.shape == b.shape and a.dtype == b.dtype and rel_norm(a, b) <= TOL[dtype]


def test_input_without_grad_one_layer_through_optimize(monkeypatch, keep):
    m = _model(torch.float32, mixed=False)
    lorakit.optimize(m)
    x = torch.randn(2, 9, 24)  # as after frozen embeddings: the backward computes no dX
    params = [p for p in m.k.parameters() if p.requires_grad]
    seeds = _seeds_of(monkeypatch)
    out = m.k(x)
    got = _grads((out,), params)
    queue = _with_masks(monkeypatch, _masks(seeds[0], x.shape, 1))
    ref = m.k.reference_forward(x)
    want = _grads((ref,), params)
    assert not queue and lorakit.fusion_report(m) == []
    for a, b in zip((out, *got), (ref, *want)):
        assert rel_norm(a, b) <= TOL[torch.float32]


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_an_rms_norm_recipe_gives_the_reference_gradients(monkeypatch, keep, offset):
    m, layers, raw, norm_w, params = norm_case(torch.float64)

    def normed(tag):
        return norm_output(raw, norm_w, offset, tag)

    seeds = _seeds_of(monkeypatch)
    outs = fused_linears(normed(True), layers)
    saved = [t for t in outs[0].grad_fn.saved_tensors if t is not None and t.numel() == raw.numel()]
    assert any(t.data_ptr() == raw.data_ptr() for t in saved)  # the norm's input, not its output
    got = _grads(outs, [raw, *params])
    _with_masks(monkeypatch, _masks(seeds[0], raw.shape))
    ref = tuple(layer.reference_forward(normed(False)) for layer in layers)
    for a, b in zip((*outs, *got), (*ref, *_grads(ref, [raw, *params]))):
        assert rel_norm(a, b) <= 1e-6  # rstd is float32


def test_saved_for_backward_x_once_and_int8_masks_or_nothing(monkeypatch, keep):
    m = _model(torch.float32, mixed=False)
    x = torch.randn(40, 24, requires_grad=True)
    outs = fused_linears(x, (m.q, m.k, m.v))
    big = [t for t in outs[0].grad_fn.saved_tensors if t is not None and t.numel() >= x.numel()]
    masks = [t for t in big if t.dtype == torch.int8]
    assert [t.shape for t in big if t.dtype != torch.int8] == [x.shape]  # x once, no dropped copy
    assert [t.shape for t in masks] == ([(3, 40, 24)] if keep else [])  # 1 byte per element and term


def test_seeded_runs_repeat_and_the_next_call_draws_new_masks(keep):
    m = _model(torch.float32, mixed=False)
    x = torch.randn(40, 24)
    torch.manual_seed(3)
    outs = fused_linears(x, (m.q, m.k, m.v))
    torch.manual_seed(3)
    again = fused_linears(x, (m.q, m.k, m.v))
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    other = fused_linears(x, (m.q, m.k, m.v))
    assert not torch.equal(outs[0], other[0])


def test_a_checkpointed_recompute_replays_the_masks(monkeypatch, keep):
    m = _model(torch.float32, mixed=False)
    x = torch.randn(4, 5, 24, requires_grad=True)
    seeds = _seeds_of(monkeypatch)
    plain, ckpt = plain_and_checkpointed(m, x)
    assert len(seeds) == 3 and seeds[0] == seeds[1] == seeds[2]  # forward, checkpointed forward, recompute
    assert torch.equal(plain[0], ckpt[0])
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(plain[1], ckpt[1]))


# --- the masks -------------------------------------------------------------------------------------------------
def test_masks_keep_one_minus_p_on_every_lane():
    shape = (256, 512)
    count = shape[0] * shape[1]
    for seed, p in ((SEED, 0.1), (SEED + 1, 0.5), (5, 0.05), (2**63 - 5, 0.3)):
        keep = dh.keep_masks(seed, [0], shape, p, torch.float32, "cpu")[0]
        sd = (p * (1 - p) / count) ** 0.5
        assert abs(keep.mean().item() - (1 - p)) < 5 * sd  # 5 standard deviations of the binomial keep rate
        lanes = keep.view(-1, 2).mean(0)  # the low and the high 16 bits of the hash words
        assert (lanes - (1 - p)).abs().max().item() < 5 * sd * 2**0.5
    ones = torch.ones(1, *shape, dtype=torch.int8)
    assert torch.equal(dh.keep_masks(SEED, [0], shape, 1e-9, torch.int8, "cpu"), ones)  # p rounds to 0
    assert not dh.keep_masks(SEED, [0], shape, 1 - 1e-9, torch.float32, "cpu").any()  # p rounds to 1


def test_neighbours_terms_and_seeds_are_independent():
    shape, p = (128, 512), 0.5
    a, b = dh.keep_masks(SEED, [0, 1], shape, p, torch.float64, "cpu")
    flat, count = a.view(-1), a.numel()
    pairs = {"same word": (flat[0::2], flat[1::2]), "next word": (flat[:-2], flat[2:]),
             "next row": (a[:-1].reshape(-1), a[1:].reshape(-1)), "next term": (flat, b.view(-1)),
             "next seed": (flat, dh.keep_masks(SEED + 1, [0], shape, p, torch.float64, "cpu").view(-1))}
    for name, (u, v) in pairs.items():
        both = (u * v).mean().item()  # independent: (1 − p)² = 0.25
        assert abs(both - 0.25) < 5 * (0.25 * 0.75 / u.numel()) ** 0.5, name
    words = (flat[0::2] * 2 + flat[1::2]).long()  # the two halves of a word as one of four outcomes
    freq = torch.bincount(words, minlength=4).double() / (count // 2)
    assert (freq - 0.25).abs().max().item() < 5 * (0.25 * 0.75 / (count // 2)) ** 0.5


def test_masks_do_not_depend_on_chunking_batching_or_output_dtype(monkeypatch):
    shape = (33, 35)  # an odd element count
    whole = dh.keep_masks(SEED, [4, 5, 6], shape, 0.3, torch.float32, "cpu")
    kept = torch.empty(3, *shape, dtype=torch.int8)
    x = torch.randn(shape)
    monkeypatch.setattr(dh, "CHUNK_WORDS", 64)
    times = dh.keep_masks(SEED, [4, 5, 6], shape, 0.3, torch.float32, "cpu", times=x, kept=kept)
    assert torch.equal(kept.float(), whole) and torch.equal(times, whole * x)
    for i, stream in enumerate((4, 5, 6)):
        assert torch.equal(dh.keep_masks(SEED, [stream], shape, 0.3, torch.float32, "cpu")[0], whole[i])


def test_under_torch_compile_the_dropped_tensor_path_is_used(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fast_dropout.mask_source(torch.device("cpu")) == "native"
