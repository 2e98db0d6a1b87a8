"""The compiled CPU dropout kernels (fast/dropout_native.py, dropout_hash.c) against dropout_hash.py's torch ops:
the masks are the same bit for bit (across key blocks and odd element offsets), so the fused linear's outputs and
every gradient (dX, each dA and dB, an RMSNorm recipe's dA) agree to fp32 rounding on odd shapes, one row or
many, one thread or three; nothing of x's size is kept for backward; with LORAKIT_NATIVE=0 or no compiler the
torch ops run and say why."""

import os
import platform
import shutil

import pytest
import torch

import lorakit
from lorakit.fast import dropout as fast_dropout
from lorakit.fast import dropout_hash as dh
from lorakit.fast import dropout_native
from lorakit.fast.lora_linear import fused_linears
from dropout_support import norm_output
from support import Siblings, one_thread, rel_norm  # noqa: F401

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


@pytest.fixture(autouse=True)
def hashed(monkeypatch):
    monkeypatch.setitem(fast_dropout.MASK_SOURCE, "cpu", "hash")
    monkeypatch.delenv("LORAKIT_NATIVE", raising=False)


@pytest.fixture
def built():
    """The library; a CPU without the ISA the kernels are tuned for skips (any other failure fails)."""
    lib = dropout_native.library()
    if lib is None and "AVX2" in (dropout_native.why_not() or ""):
        pytest.skip(dropout_native.why_not())
    assert lib is not None, dropout_native.why_not()
    return lib


def _model(n_in: int, q_out: int, kv_out: int, rank: int) -> Siblings:
    """q/k/v with a dropout-0.25 adapter of this rank and a plain rank-3 one on q and v, both active."""
    torch.manual_seed(0)
    model = Siblings(n_in=n_in, q_out=q_out, kv_out=kv_out)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=rank, lora_alpha=8, target_modules=["q", "k", "v"],
                                                  lora_dropout=0.25, bias="all", init_lora_weights=False))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=3, lora_alpha=4, target_modules=["q", "v"],
                                                  init_lora_weights=False), name="plain")
    lorakit.set_active(model, ["default", "plain"])
    return model


def _run(model, x, native: bool, monkeypatch, norm=None):
    """(outputs, grads of x (when it requires them) and of every trainable parameter) of one seeded call; with
    native, both directions must have run in the compiled kernels."""
    monkeypatch.setenv("LORAKIT_NATIVE", "1" if native else "0")
    calls = []
    for name in ("run_down", "run_back"):
        real = getattr(dropout_native, name)
        monkeypatch.setattr(dropout_native, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    layers = (model.q, model.k, model.v)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(7)
    inp = x if norm is None else norm_output(x, norm, 0.0, True)
    outs = fused_linears(inp, layers)
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(o.shape, generator=g) for o in outs]
    wrt = [x, *params] if x.requires_grad else params
    grads = torch.autograd.grad(outs, wrt, cot)
    assert calls == (["run_down", "run_back"] if native else [])
    return outs, grads


@pytest.mark.parametrize("rows, n_in, q_out, kv_out, rank, threads", [
    (37, 45, 16, 8, 5, 3),        # odd rows and columns: odd element offsets, a one-row tail per thread
    (1, 24, 16, 8, 16, 2),        # one row: one thread, rank a whole register group twice
    (300, 441, 12, 20, 8, 2),     # 132,300 elements per term: two key blocks
])
@pytest.mark.parametrize("x_grad", [True, False], ids=["dx", "no_dx"])
def test_compiled_kernels_equal_the_torch_ops(built, monkeypatch, rows, n_in, q_out, kv_out, rank, threads,
                                              x_grad):
    model = _model(n_in, q_out, kv_out, rank)
    x = torch.randn(rows, n_in, requires_grad=x_grad)
    torch.set_num_threads(threads)
    try:
        outs, grads = _run(model, x, True, monkeypatch)
        ref_outs, ref_grads = _run(model, x, False, monkeypatch)
    finally:
        torch.set_num_threads(1)
    assert len(grads) == len(ref_grads) == x_grad + 6 + 4 + 2  # dX; A, B per term; the plain terms; 2 biases
    for a, b in zip((*outs, *grads), (*ref_outs, *ref_grads)):
        assert a.shape == b.shape and rel_norm(a, b) <= 1e-5


def test_an_rms_norm_recipe_in_fp32_equals_the_torch_ops(built, monkeypatch):
    model = _model(40, 16, 8, 4)
    raw = torch.randn(3, 11, 40, requires_grad=True)
    norm_w = torch.randn(40) / 3
    outs, grads = _run(model, raw, True, monkeypatch, norm=norm_w)
    ref_outs, ref_grads = _run(model, raw, False, monkeypatch, norm=norm_w)
    for a, b in zip((*outs, *grads), (*ref_outs, *ref_grads)):
        assert rel_norm(a, b) <= 1e-5


@pytest.mark.parametrize("p", [0.3, 0.999995, 1e-6], ids=["p0.3", "p_rounds_to_1", "p_rounds_to_0"])
def test_the_masks_are_the_hash_masks_bit_for_bit(built, p):
    rows, k, seed, stream = 30001, 5, 2**62 + 777, 4  # 150,005 elements: three key blocks, odd rows
    x = torch.ones(rows, k)
    params = [torch.eye(k)]  # A = I: h = m ⊙ x / (1 − p) = m / (1 − p)
    h = torch.full((rows, k + 2), float("nan"))
    dropout_native.run_down(x, h, 1, k, p, [0], stream, params, seed, dh._threshold(p) - 32768)
    want = dh.keep_masks(seed, [stream], (rows, k), p, torch.float32, "cpu")[0]
    got = h[:, 1:1 + k]
    assert torch.equal((got > 0).float(), want) and torch.equal(got[want == 0], torch.zeros(int((want == 0).sum())))
    assert h[:, 0].isnan().all() and h[:, -1].isnan().all()  # nothing written outside the run's columns
    assert abs(want.mean().item() - round(1 - p, 1)) < 0.02


def test_nothing_of_the_inputs_size_is_kept_for_backward(built, monkeypatch):
    model = _model(24, 16, 8, 4)
    x = torch.randn(40, 24, requires_grad=True)
    outs = fused_linears(x, (model.q, model.k, model.v))
    big = [t for t in outs[0].grad_fn.saved_tensors if t is not None and t.numel() >= x.numel()]
    assert [t.shape for t in big] == [x.shape] and big[0].dtype == torch.float32  # x once, no masks


def test_off_or_unbuildable_the_torch_ops_run_and_say_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LORAKIT_NATIVE", "0")
    assert dropout_native.library() is None and dropout_native.why_not() == "LORAKIT_NATIVE=0"
    assert not caplog.records
    monkeypatch.setenv("LORAKIT_NATIVE", "1")
    monkeypatch.setattr(dropout_native, "_STATE", {})
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    assert dropout_native.library() is None and "CalledProcessError" in dropout_native.why_not()
    assert dropout_native.library() is None and len(caplog.records) == 1  # said once, not per call
    assert "torch ops" in caplog.records[0].getMessage() and caplog.records[0].levelname == "WARNING"
    model = _model(24, 16, 8, 4)
    x = torch.randn(5, 24, requires_grad=True)
    outs = fused_linears(x, (model.q, model.k, model.v))
    masks = [t for t in outs[0].grad_fn.saved_tensors if t is not None and t.dtype == torch.int8]
    assert [t.shape for t in masks] == [(3, 5, 24)]  # the torch ops ran (they keep int8 masks)
    assert list(tmp_path.rglob("*")) in ([], [tmp_path / "native"])  # no half-built library left behind


def test_a_fresh_build_lands_whole_under_the_cache(built, monkeypatch, tmp_path):
    monkeypatch.setattr(dropout_native, "_STATE", {})
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert dropout_native.library() is not None, dropout_native.why_not()
    files = sorted(p.name for p in (tmp_path / "native").iterdir())
    assert len(files) == 1 and files[0].startswith("dropout_hash-") and files[0].endswith(".so")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="an x86 build without AVX2")
def test_a_build_without_avx2_is_refused(monkeypatch, tmp_path):
    flags = [f for f in dropout_native._flags() if not f.startswith(("-march", "-mprefer"))]
    monkeypatch.setattr(dropout_native, "_flags", lambda: [*flags, "-march=x86-64"])  # SSE2 only
    monkeypatch.setattr(dropout_native, "_STATE", {})
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert dropout_native.library() is None and "AVX2" in dropout_native.why_not()
