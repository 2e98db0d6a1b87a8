"""The fused linear on a 4-bit (NF4) base against the NF4 reference path: forward and every gradient, alone, grouped
and with DoRA and dropout; the dense weight is dequantised into one reused scratch buffer, never a new copy per call,
except in the offload mode's recompute, whose dense weights serve the block's backward."""

import collections

import pytest
import torch
from torch import nn

import lorakit
import lorakit.fast.lora_linear as ll
from lorakit.fast import dropout as fast_dropout
from lorakit.fast import scratch
from lorakit.fast.lora_linear import fused_linears, lora_linear_fast_path
from lorakit.quant import nf4 as nf4_module
from lorakit.quant import quantize_nf4
from lorakit.quant.dequant import dequantize_nf4_into
from lorakit.quant.nf4 import dequantize_nf4_reference, dequantize_nf4_reference_into
from lorakit.quant.weight import QuantizedWeight
from support import one_thread, randomise_adapters, rel_norm, Siblings  # noqa: F401




def _qlora(targets=("q", "k", "v"), **kw):
    torch.manual_seed(0)
    model = lorakit.quantize(Siblings(n_in=64, q_out=48, kv_out=32), compute_dtype=torch.float32,
                             targets=["q", "k", "v"], block_size=32)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **kw))
    randomise_adapters(model, seed=1)
    return model


def _grads(outs, inputs):
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    return torch.autograd.grad(outs, inputs, cot, allow_unused=True)


def _assert_close(a, b, tol=2e-6):
    for u, v in zip(a, b):
        assert (u is None) == (v is None)
        if u is not None:
            assert u.shape == v.shape and rel_norm(u, v) <= tol


@pytest.mark.parametrize("shape", [(48, 64), (7, 9), (33, 65)])  # whole blocks, a ragged tail, odd sizes
def test_dequantising_into_a_buffer_equals_the_reference(shape, monkeypatch):
    monkeypatch.setattr(nf4_module, "CHUNK_BLOCKS", 3)  # several chunks, one of them partial
    w = torch.randn(shape)
    for double in (True, False):
        q = quantize_nf4(w, 32, double)
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.full(shape, float("nan"), dtype=dtype)
            assert torch.equal(dequantize_nf4_reference_into(q, out), dequantize_nf4_reference(q, dtype))


def test_the_triton_kernel_writes_the_same_buffer(kernel_device):
    w = torch.randn(40, 64, device=kernel_device)
    q = quantize_nf4(w, 64, True)
    out = torch.empty(40, 64, device=kernel_device)
    assert torch.equal(dequantize_nf4_into(q, out).cpu(), dequantize_nf4_reference(q, torch.float32).cpu())


@pytest.mark.parametrize("kw", [{}, {"bias": "all"}, {"use_dora": True, "bias": "lora_only"}], ids=["lora", "bias", "dora"])
def test_one_layer_matches_the_nf4_reference(kw):
    m = _qlora(["q"], **kw)
    assert lorakit.optimize(m)["not_fused"] == 0 and m.q.fast_path is lora_linear_fast_path
    x = torch.randn(3, 5, 64, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]
    ref, out = (m.q.reference_forward(x),), (m.q(x),)
    assert lorakit.fusion_report(m) == []
    _assert_close(out, ref)
    _assert_close(_grads(out, [x, *params]), _grads(ref, [x, *params]))


@pytest.mark.parametrize("rank_major", [True, False])
def test_grouped_projections_with_dropout_match_the_nf4_reference(rank_major, monkeypatch):
    monkeypatch.setitem(ll.RANK_MAJOR, "cpu", rank_major)
    monkeypatch.setitem(fast_dropout.MASK_SOURCE, "cpu", "native")  # the reference's masks for one RNG state
    m = _qlora(lora_dropout=0.1)
    x = torch.randn(4, 6, 64, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]
    layers = (m.q, m.k, m.v)
    torch.manual_seed(4)
    ref = tuple(layer.reference_forward(x) for layer in layers)
    torch.manual_seed(4)
    out = fused_linears(x, layers)
    assert out is not None
    _assert_close(out, ref)
    _assert_close(_grads(out, [x, *params]), _grads(ref, [x, *params]))


def test_one_scratch_buffer_serves_every_layer_and_no_dense_weight_is_saved():
    scratch.release()
    m = _qlora()
    lorakit.optimize(m)
    x = torch.randn(8, 64, requires_grad=True)
    sum(layer(x).sum() for layer in (m.q, m.k, m.v)).backward()
    (buf,) = scratch._BUFFERS.values()
    assert buf.numel() == 48 * 64  # the largest layer's weight, once
    ptr = buf.data_ptr()
    outs = fused_linears(x, (m.q, m.k, m.v))
    saved = [t for t in outs[0].grad_fn.saved_tensors if t is not None]
    assert not any(t.shape in {(48, 64), (32, 64)} for t in saved)  # W is dequantised again in backward
    sum(o.sum() for o in outs).backward()
    assert list(scratch._BUFFERS.values()) == [buf] and buf.data_ptr() == ptr  # reused, never reallocated


def test_an_input_in_another_dtype_falls_back_and_is_reported():
    m = _qlora(["q"])
    lorakit.optimize(m)
    x = torch.randn(2, 64, dtype=torch.float64)
    assert torch.equal(m.q(x), m.q.reference_forward(x))
    (path, reason), = lorakit.fusion_report(m)
    assert path == "q" and reason == "at its last call: input is torch.float64, the base weight torch.float32"
    m.q(x.float())  # a fused call clears it
    assert lorakit.fusion_report(m) == []


def test_the_scratch_buffer_serves_inference_mode_then_training():
    scratch.release()
    m = _qlora(["q"])
    lorakit.optimize(m)
    x = torch.randn(3, 64)
    with torch.inference_mode():  # the buffer is made here first (e.g. an evaluation before training)
        first = m.q(x)
    out = m.q(x.requires_grad_())
    out.sum().backward()
    assert torch.allclose(first, out.detach(), rtol=1e-6, atol=1e-6) and x.grad is not None


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 96), nn.Linear(96, 64)

    def forward(self, h):
        return h + self.fc2(torch.relu(self.fc1(h)))  # [N, 64]


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _qblocks():
    torch.manual_seed(0)
    model = lorakit.quantize(_Blocks(), compute_dtype=torch.float32, targets=["fc1", "fc2"], block_size=32)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    randomise_adapters(model, seed=1)
    return model.train()


@pytest.mark.parametrize("mode, per_step", [(False, 2), (True, 3), ("offload", 2)])
def test_the_offload_recompute_keeps_its_dense_weights_for_backward(mode, per_step, monkeypatch):
    """Dequantisations per weight and step: forward and backward without checkpointing; forward, recompute and
    backward with checkpoint=True; in the offload mode the recompute's dense weights serve the backward. The
    gradients equal the NF4 reference's in every mode."""
    x = torch.randn(8, 64, requires_grad=True)
    ref = _qblocks()
    want = _grads([ref(x)], [x, *(p for p in ref.parameters() if p.requires_grad)])
    fast = _qblocks()
    lorakit.optimize(fast, checkpoint=mode)
    written = collections.Counter()
    write = QuantizedWeight.write_dense
    monkeypatch.setattr(QuantizedWeight, "write_dense", lambda self, out: written.update([id(self)]) or write(self, out))
    got = _grads([fast(x)], [x, *(p for p in fast.parameters() if p.requires_grad)])
    assert sorted(written.values()) == [per_step] * 4
    _assert_close(got, want)
    assert not scratch.keeping_dense()


def test_the_offload_modes_mlp_tiles_share_one_dense_weight_per_block_pass(tiny_llama, monkeypatch):
    """A tiled MLP (4 tiles of 6 rows) in the offload mode dequantises each weight once in the forward and once in
    the recompute, not once per tile in each pass and in backward; the loss and gradients equal the NF4 model's."""
    lorakit.quantize(tiny_llama, compute_dtype=torch.float32, block_size=32)
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       init_lora_weights=False))
    tiny_llama.train()
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    trained = [p for p in tiny_llama.parameters() if p.requires_grad]
    loss0 = tiny_llama(input_ids=ids, labels=ids).loss
    want = torch.autograd.grad(loss0, trained)
    lorakit.optimize(tiny_llama, checkpoint="offload", tile_mlp=6)
    written = collections.Counter()
    write = QuantizedWeight.write_dense
    monkeypatch.setattr(QuantizedWeight, "write_dense", lambda self, out: written.update([id(self)]) or write(self, out))
    loss1 = tiny_llama(input_ids=ids, labels=ids).loss
    got = torch.autograd.grad(loss1, trained)
    assert sorted(written.values()) == [2] * 2 * 7  # q, k, v, o, gate, up, down of two layers
    assert rel_norm(loss1, loss0) <= 1e-6
    _assert_close(got, want, tol=3e-5)
