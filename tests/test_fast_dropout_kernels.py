"""In-kernel dropout masks (fast/dropout_kernels.py) on CUDA, or on CPU under Triton's interpreter (see
conftest.kernel_device). The kernels' mask is written out by dropout_mask for the call's seed, and the reference
math is built with that same mask: the kernels' h, dA and dx, and the fused linear's outputs and every gradient
(a q/k/v group with three dropout terms and a term without dropout mixed in) equal it. The masks keep each element
with probability 1 − p, differ between seeds and terms, depend on (row, column) alone, and a checkpointed block's
recompute draws the same ones."""

import pytest
import torch

import lorakit
from lorakit.fast import dropout as fast_dropout
from lorakit.fast import dropout_kernels as dk
from lorakit.fast.lora_linear import fused_linears
from dropout_support import norm_case, norm_output, plain_and_checkpointed, siblings_model
from dropout_support import seeds_of as _seeds_of
from dropout_support import with_masks as _with_masks
from support import rel_norm

SEED = 2**62 + 12345
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture
def philox(monkeypatch, kernel_device):
    """The fused linear draws its masks in-kernel on this test's device (CUDA's default; on CPU for the
    interpreter)."""
    monkeypatch.setitem(fast_dropout.MASK_SOURCE, kernel_device, "philox")
    return kernel_device


# --- the kernels alone ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,rank,tile", [(torch.float32, 4, 0), (torch.bfloat16, 16, 0), (torch.float16, 8, 0),
                                             (torch.float32, 4, 1), (torch.bfloat16, 16, 2), (torch.float32, 4, 3)])
def test_kernels_equal_the_math_with_the_same_mask(kernel_device, monkeypatch, dtype, rank, tile):
    """At every tile setting a launch may fall back to (tile: its index; the forward has one fewer), with several
    column tiles and a short last one (in = 200)."""
    dev, n, k, terms, p = kernel_device, 80, 200, 2, 0.3
    monkeypatch.setattr(dk, "BACK_TILES", dk.BACK_TILES[tile:])
    monkeypatch.setattr(dk, "DOWN_TILES", dk.DOWN_TILES[min(tile, len(dk.DOWN_TILES) - 1):])
    monkeypatch.setattr(dk, "_FITS", {})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, k, generator=g).to(dev, dtype)
    a_run = (torch.randn(terms * rank, k, generator=g) / 4).to(dev, dtype)
    gh_t = torch.randn(terms * rank, n, generator=g).to(dev, dtype)  # rank-major, as the fused backward holds it
    masks = [dk.dropout_mask(SEED, 5 + t, (n, k), p, dev) for t in range(terms)]
    xd = [x.float() * m / (1 - p) for m in masks]  # [N, in] per term
    a = a_run.float().view(terms, rank, k)
    g32 = gh_t.float().view(terms, rank, n)
    want_h = torch.cat([xd[t] @ a[t].t() for t in range(terms)], 1)  # [N, terms·r]
    for rank_major in (False, True):
        h = torch.zeros(terms * rank, n, device=dev, dtype=dtype).t() if rank_major else \
            torch.zeros(n, terms * rank, device=dev, dtype=dtype)
        dk.drop_down(x, a_run, h, SEED, 5, rank, p)
        assert rel_norm(h.float(), want_h) <= TOL[dtype]
    dx0 = torch.randn(n, k, generator=g).to(dev, dtype)
    want_dx = dx0.float() + sum((g32[t].t() @ a[t]) * masks[t] / (1 - p) for t in range(terms))
    want_da = torch.cat([g32[t] @ xd[t] for t in range(terms)])
    for programs_per_sm in (8, 0):  # a strip per row block; one strip of all row blocks (the last one short)
        monkeypatch.setattr(dk, "PROGRAMS_PER_SM", programs_per_sm)
        dx = dx0.clone()
        da32 = dk.drop_back(x, a_run, gh_t, dx, True, SEED, 5, rank, p)
        assert rel_norm(dx.float(), want_dx) <= TOL[dtype]
        assert rel_norm(da32, want_da) <= TOL[dtype]
    only_da = dk.drop_back(x, a_run, gh_t, None, True, SEED, 5, rank, p)  # dx not needed
    assert torch.allclose(only_da, da32, rtol=1e-5, atol=1e-6)


def test_a_seed_read_from_memory_draws_the_masks_of_the_same_int(kernel_device):
    """The seed a CUDA graph's capture draws on the device (a 1-element int64 tensor the kernels load) gives
    exactly the masks of the same value passed as an int, forward and backward; another value other masks."""
    dev, n, k, rank, p = kernel_device, 40, 72, 4, 0.25
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, k, generator=g).to(dev)
    a_run = (torch.randn(2 * rank, k, generator=g) / 4).to(dev)
    gh_t = torch.randn(2 * rank, n, generator=g).to(dev)
    outs = []
    for seed in (SEED, torch.tensor([SEED], dtype=torch.int64, device=dev),
                 torch.tensor([SEED + 1], dtype=torch.int64, device=dev)):
        h = torch.zeros(n, 2 * rank, device=dev)
        dk.drop_down(x, a_run, h, seed, 3, rank, p)
        dx = torch.zeros(n, k, device=dev)
        da = dk.drop_back(x, a_run, gh_t, dx, True, seed, 3, rank, p)
        outs.append((h, dx, da))
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
    assert not torch.equal(outs[0][0], outs[2][0]) and not torch.equal(outs[0][1], outs[2][1])


def test_a_launch_that_does_not_fit_takes_the_next_tile_setting(monkeypatch):
    """Triton raises OutOfResources at the first launch of a setting whose shared memory exceeds the GPU's: the next
    setting is launched and remembered for that key; when none fits, the error stands."""
    if dk.triton is None:
        pytest.skip("needs Triton")
    out_of_resources = dk.triton.runtime.errors.OutOfResources
    monkeypatch.setattr(dk, "_FITS", {})
    tried = []

    def launch(tile):
        tried.append(tile)
        if tile[0] > 16:
            raise out_of_resources(300_000, 232_448, "shared memory")
        return tile
    assert dk._fitting(("k",), ((64, 64, 3), (32, 64, 2), (16, 32, 1)), launch) == (16, 32, 1)
    assert dk._fitting(("k",), ((64, 64, 3), (32, 64, 2), (16, 32, 1)), launch) == (16, 32, 1)
    assert tried == [(64, 64, 3), (32, 64, 2), (16, 32, 1), (16, 32, 1)]  # the second call starts at the one that fit
    with pytest.raises(out_of_resources):
        dk._fitting(("other",), ((64, 64, 3),), launch)


# --- the masks ------------------------------------------------------------------------------------------------
def test_masks_keep_one_minus_p_and_differ_by_seed_and_term(kernel_device):
    dev, shape = kernel_device, (64, 256)
    count = shape[0] * shape[1]
    for seed, p in ((SEED, 0.1), (SEED + 1, 0.5), (2**63 - 5, 0.3)):
        keep = dk.dropout_mask(seed, 0, shape, p, dev).cpu()
        bound = 5 * (p * (1 - p) / count) ** 0.5  # 5 standard deviations of the binomial keep rate
        assert abs(keep.float().mean().item() - (1 - p)) < bound
        by_lane = keep.view(shape[0], -1, 8).float().mean((0, 1))  # each lane of a Philox column group
        assert (by_lane - (1 - p)).abs().max().item() < 5 * (p * (1 - p) / (count / 8)) ** 0.5
    a = dk.dropout_mask(SEED, 0, shape, 0.5, dev)
    assert torch.equal(a, dk.dropout_mask(SEED, 0, shape, 0.5, dev))  # same key → same mask
    for other in (dk.dropout_mask(SEED + 1, 0, shape, 0.5, dev), dk.dropout_mask(SEED, 1, shape, 0.5, dev)):
        agree = a.eq(other).float().mean().item()
        assert abs(agree - 0.5) < 0.02  # independent masks agree on half the elements
    assert not dk.dropout_mask(SEED, 0, shape, 0.0, dev).logical_not().any()  # p = 0 keeps everything


def test_a_mask_bit_depends_on_row_and_column_not_on_the_flat_offset(kernel_device):
    dev = kernel_device
    wide = dk.dropout_mask(SEED, 2, (20, 100), 0.5, dev)
    narrow = dk.dropout_mask(SEED, 2, (20, 40), 0.5, dev)
    assert torch.equal(narrow, wide[:, :40])  # the same element, whatever the row length
    assert not torch.equal(wide[0, :40], wide[1, :40]) and not torch.equal(wide[0, :40], wide[0, 40:80])


# --- the fused linear -----------------------------------------------------------------------------------------
_model = siblings_model


def _outs_and_grads(fn, x, params):
    outs = fn(x)
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    return outs, torch.autograd.grad(outs, [x, *params] if x.requires_grad else params, cot)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mixed", [True, False], ids=["with_plain_terms", "dropout_only"])
def test_fused_qkv_equals_the_reference_with_the_kernels_masks(philox, monkeypatch, dtype, mixed):
    dev = philox
    if not mixed:  # the backward splits the three terms' run into launches of two and one
        monkeypatch.setattr(dk, "MAX_TERMS", 2)
    m = _model(dtype, dev, mixed=mixed)
    layers = (m.q, m.k, m.v)
    x = torch.randn(3, 7, 24, device=dev, dtype=dtype, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]
    assert len(params) == 6 + 4 * mixed + 2  # A, B per term; the biases of q and v
    seeds = _seeds_of(monkeypatch)
    out = _outs_and_grads(lambda t: fused_linears(t, layers), x, params)
    assert len(seeds) == 1 and seeds[0] is not None
    masks = [dk.dropout_mask(seeds[0], i, (21, 24), 0.25, dev).view(x.shape) for i in range(3)]  # q, k, v
    queue = _with_masks(monkeypatch, masks)
    ref = _outs_and_grads(lambda t: tuple(layer.reference_forward(t) for layer in layers), x, params)
    assert not queue  # the reference drew every mask, in order
    for a, b in zip((*out[0], *out[1]), (*ref[0], *ref[1])):
        assert a.shape == b.shape and rel_norm(a.float(), b.float()) <= TOL[dtype]


def test_one_layer_rank_eight_fp32_through_optimize_input_without_grad(philox, monkeypatch):
    dev = philox
    m = _model(torch.float32, dev, rank=8, mixed=False)
    lorakit.optimize(m)
    x = torch.randn(2, 9, 24, device=dev)  # as after frozen embeddings: the backward computes no dX
    params = [p for p in m.k.parameters() if p.requires_grad]  # k's A and B (k has no bias)
    seeds = _seeds_of(monkeypatch)
    out = _outs_and_grads(lambda t: (m.k(t),), x, params)
    queue = _with_masks(monkeypatch, [dk.dropout_mask(seeds[0], 0, (18, 24), 0.25, dev).view(x.shape)])
    ref = _outs_and_grads(lambda t: (m.k.reference_forward(t),), x, params)
    assert not queue and lorakit.fusion_report(m) == []
    for a, b in zip((*out[0], *out[1]), (*ref[0], *ref[1])):
        assert rel_norm(a, b) <= 1e-5


def test_only_x_is_saved_and_seeded_runs_repeat(philox):
    dev = philox
    m = _model(torch.float32, dev, mixed=False)
    x = torch.randn(40, 24, device=dev, requires_grad=True)
    torch.manual_seed(3)
    outs = fused_linears(x, (m.q, m.k, m.v))
    saved = [t for t in outs[0].grad_fn.saved_tensors if t is not None]
    assert [t.shape for t in saved if t.numel() >= x.numel()] == [x.shape]  # x once, no mask, no dropped copy
    torch.manual_seed(3)
    again = fused_linears(x, (m.q, m.k, m.v))
    assert all(torch.equal(a, b) for a, b in zip(outs, again))  # torch.manual_seed repeats the masks
    other = fused_linears(x, (m.q, m.k, m.v))
    assert not torch.equal(outs[0], other[0])  # the next call draws new masks


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_an_rms_norm_output_is_rebuilt_in_backward_not_saved(philox, monkeypatch, offset):
    dev = philox
    m, layers, raw, norm_w, params = norm_case(torch.float32, dev)  # terms reading x use the recipe too

    def normed(tag):
        return norm_output(raw, norm_w, offset, tag)

    seeds = _seeds_of(monkeypatch)
    outs = fused_linears(normed(True), layers)
    saved = [t for t in outs[0].grad_fn.saved_tensors if t is not None and t.numel() == raw.numel()]
    assert len(saved) == 1 and saved[0].data_ptr() == raw.data_ptr()  # the norm's input, not its output
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(o.shape, generator=g).to(dev) for o in outs]
    got = torch.autograd.grad(outs, [raw, *params], cot)
    masks = [dk.dropout_mask(seeds[0], i, (18, 24), 0.25, dev).view(raw.shape) for i in range(3)]
    _with_masks(monkeypatch, masks)
    ref_outs = tuple(layer.reference_forward(normed(False)) for layer in layers)
    want = torch.autograd.grad(ref_outs, [raw, *params], cot)
    for a, b in zip((*outs, *got), (*ref_outs, *want)):
        assert rel_norm(a, b) <= 1e-5


def test_a_checkpointed_recompute_draws_the_same_masks(philox, monkeypatch):
    dev = philox
    m = _model(torch.float32, dev, mixed=False)
    x = torch.randn(4, 5, 24, device=dev, requires_grad=True)
    seeds = _seeds_of(monkeypatch)
    plain, ckpt = plain_and_checkpointed(m, x)
    assert len(seeds) == 3 and seeds[1] == seeds[2] == seeds[0]  # forward and recompute: one key
    assert torch.equal(plain[0], ckpt[0])
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(plain[1], ckpt[1]))


def test_without_triton_the_dropped_tensor_path_stays(philox, monkeypatch):
    monkeypatch.setenv("LORAKIT_TRITON", "0")
    assert fast_dropout.mask_source(torch.device(philox)) == "native"
    m = _model(torch.float32, philox, mixed=False)
    seeds = _seeds_of(monkeypatch)
    x = torch.randn(6, 24, device=philox)
    fused_linears(x, (m.q, m.k, m.v))
    assert seeds == [None]  # dropped input tensors, not a seed
