"""The output-scaled term's kernels (fast/scaled_kernels.py) on CUDA, or on CPU under Triton's interpreter (see
conftest.kernel_device): the row norm, the scaled forward and its one-pass backward equal the torch math, and the
fused DoRA linear with the kernels equals the reference forward and every gradient (x, A, B, the magnitude, the
biases), grouped q/k/v as optimize() runs it."""

import pytest
import torch

import lorakit
import lorakit.fast.lora_linear as ll
from lorakit.fast import lora_grads
from lorakit.fast import scaled_kernels as sk
from lorakit.fast import spec
from lorakit.fast.lora_linear import fused_linears
from support import randomise_adapters, rel_norm, Siblings

TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _randn(g, *shape, dev, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)


# --- the kernels alone ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,rank", [(torch.float32, 4), (torch.bfloat16, 16), (torch.float16, 8),
                                        (torch.bfloat16, 256), (torch.float32, 128)])  # high ranks: fewer columns
@pytest.mark.parametrize("cols", [150, 600])  # one short column step, or two whole and a short one (16-bit)
def test_row_norm_equals_the_norm_of_the_merged_weight(kernel_device, dtype, rank, cols):
    dev, g, s = kernel_device, torch.Generator().manual_seed(0), 1.5
    w = _randn(g, 40, cols, dev=dev, dtype=dtype)  # 40 rows: a short last block of 16
    a, b = _randn(g, rank, cols, dev=dev, dtype=dtype, scale=0.3), _randn(g, 40, rank, dev=dev, dtype=dtype, scale=0.3)
    want = (w.double() + s * b.double() @ a.double()).norm(dim=1)  # B·A materialised, in float64
    got = sk.row_norm(w, a, b, s)
    assert got.dtype == torch.float32 and rel_norm(got, want) <= 1e-6
    wt = w.t().contiguous().t()  # GPT-2's Conv1D: W as a transposed view
    assert rel_norm(sk.row_norm(wt, a, b, s), want) <= 1e-6
    if dtype != torch.float32:  # adapters in float32 over a 16-bit base; B alone in float32
        assert rel_norm(sk.row_norm(w, a.float(), b.float(), s), want) <= 1e-6
        assert rel_norm(sk.row_norm(w, a, b.float(), s), want) <= 1e-6


def test_row_norm_leaves_float64_to_the_caller(kernel_device):
    w = torch.randn(8, 16, dtype=torch.float64, device=kernel_device)
    assert sk.row_norm(w, w[:2], w[:, :2], 1.0) is None
    w = torch.randn(8, 16, device=kernel_device)  # float32 at r = 512: A's stages would not fit shared memory
    assert sk.row_norm(w, torch.randn(512, 16, device=kernel_device), torch.randn(8, 512, device=kernel_device), 1.0) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_scale_output_equals_the_torch_math(kernel_device, dtype, with_bias):
    dev, g = kernel_device, torch.Generator().manual_seed(1)
    z = _randn(g, 3, 23, 150, dev=dev, dtype=dtype)  # [B, T, out]: 69 rows, 150 columns (short tiles both ways)
    m = _randn(g, 150, dev=dev, dtype=dtype).abs() + 0.5
    norm = torch.rand(150, generator=g).to(dev) + 0.5  # float32
    bias = _randn(g, 150, dev=dev, dtype=dtype) if with_bias else None
    got = sk.scale_output(z, m, norm, bias)
    want = sk._torch_output(z.double(), m.double(), norm.to(dtype).double(), None if bias is None else bias.double())
    assert got.shape == z.shape and got.dtype == dtype
    assert rel_norm(got, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("programs_per_sm", [8, 0], ids=["strips", "one_strip"])
def test_scale_grads_equal_the_torch_math(kernel_device, monkeypatch, dtype, programs_per_sm):
    monkeypatch.setattr(sk, "PROGRAMS_PER_SM", programs_per_sm)
    monkeypatch.setattr(sk, "FINISH_BLOCK", (2, 128))  # five strips of 16 rows summed two at a time: a short last step
    dev, g = kernel_device, torch.Generator().manual_seed(2)
    n, out = 75, 140
    dy, z = _randn(g, n, out, dev=dev, dtype=dtype), _randn(g, n, out, dev=dev, dtype=dtype)
    m = _randn(g, out, dev=dev, dtype=dtype).abs() + 0.5
    norm = torch.rand(out, generator=g).to(dev) + 0.5
    bias = torch.zeros(out, device=dev, dtype=dtype)
    dz, dm, db = sk.scale_grads(dy, z, m, norm, True, bias)
    n64 = norm.to(dtype).double()
    f = (m.double() / n64).to(dtype).double()  # the f both paths form, rounded to m's dtype
    assert dz.dtype == dtype and dm.dtype == dtype and db.dtype == dtype
    assert rel_norm(dz, dy.double() * f) <= TOL[dtype]
    assert rel_norm(dm, (dy.double() * z.double()).sum(0) / n64) <= TOL[dtype]
    assert rel_norm(db, dy.double().sum(0)) <= TOL[dtype]
    dz2, dm2, db2 = sk.scale_grads(dy, z, m, norm, False)  # neither sum wanted: dZ alone
    assert dm2 is None and db2 is None and torch.equal(dz2, dz)
    again = sk.scale_grads(dy, z, m, norm, True, bias)
    assert all(torch.equal(u, v) for u, v in zip(again, (dz, dm, db)))  # strips summed in a fixed order
    columns_apart = sk.scale_grads(dy.t().contiguous().t(), z, m, norm, True, bias)  # dY with stride(-1) ≠ 1
    assert all(torch.equal(u, v) for u, v in zip(columns_apart, (dz, dm, db)))


@pytest.mark.parametrize("dtype,rank", [(torch.float32, 4), (torch.bfloat16, 16), (torch.float16, 8)])
def test_the_terms_up_projection_is_added_in_the_kernels(kernel_device, dtype, rank):
    dev, g, s, n, out = kernel_device, torch.Generator().manual_seed(5), 0.75, 70, 150
    base, dy = _randn(g, n, out, dev=dev, dtype=dtype), _randn(g, n, out, dev=dev, dtype=dtype)
    h_t = _randn(g, rank, n, dev=dev, dtype=dtype)  # rank-major [r, N]: h is a view with stride(0) = 1
    b = _randn(g, out, rank, dev=dev, dtype=dtype, scale=0.5)
    m = _randn(g, out, dev=dev, dtype=dtype).abs() + 0.5
    norm = torch.rand(out, generator=g).to(dev) + 0.5
    bias = _randn(g, out, dev=dev, dtype=dtype)
    up = (h_t.t(), b, s)
    assert sk.takes_up(base, h_t.t(), b)
    z = base.double() + s * h_t.double().t() @ b.double().t()  # [N, out] the output with its LoRA term
    f = (m.double() / norm.to(dtype).double()).to(dtype).double()
    before = base.clone()
    y = sk.scale_output(base, m, norm, bias, up)
    assert torch.equal(base, before)  # the term is added to the tiles, not to the saved output
    assert rel_norm(y, z * f + bias.double()) <= TOL[dtype]
    dz, dm, db = sk.scale_grads(dy, base, m, norm, True, bias, up)
    assert rel_norm(dz, dy.double() * f) <= TOL[dtype]
    assert rel_norm(dm, (dy.double() * z).sum(0) / norm.to(dtype).double()) <= TOL[dtype]
    assert rel_norm(db, dy.double().sum(0)) <= TOL[dtype]
    assert not sk.takes_up(base, h_t.t().float() if dtype != torch.float32 else h_t.t().double(), b)  # dtypes differ
    wide = torch.zeros(n, 65, device=dev, dtype=dtype)
    assert not sk.takes_up(base, wide, torch.zeros(out, 65, device=dev, dtype=dtype))  # r = 65: left to addmm_


# --- the fused DoRA linear with the kernels ----------------------------------------------------------------------


def _dora(dev, dtype):
    torch.manual_seed(0)
    model = Siblings(n_in=40, q_out=48, kv_out=24)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "v"], use_dora=True,
                                                  bias="lora_only"))
    randomise_adapters(model, seed=2)  # B ≠ 0 and m ≠ ‖W‖: no term is a no-op
    return model.to(dev, dtype)


@pytest.fixture
def kernels_only(monkeypatch):
    """Fails a test whose fused call takes a torch fallback of the scaled stages; records the row-norm kernel calls
    (True each) and the scale stages' calls with whether they were given the term's up-projection."""
    def refuse(*args):
        raise AssertionError("the torch path ran where the kernels should")

    monkeypatch.setattr(sk, "_torch_output", refuse)
    monkeypatch.setattr(sk, "_torch_grads", refuse)
    calls = []

    def counted(*args):
        norm = sk.row_norm(*args)
        calls.append(norm is not None)
        return norm

    monkeypatch.setattr(spec, "row_norm", counted)
    for module, name in ((ll, "scale_output"), (lora_grads, "scale_grads")):  # each given the term's up-projection
        def given_up(*args, _fn=getattr(module, name), _name=name):
            calls.append((_name, args[-1] is not None))
            return _fn(*args)

        monkeypatch.setattr(module, name, given_up)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_with_the_kernels_equals_the_reference(kernel_device, kernels_only, dtype):
    dev = kernel_device
    m = _dora(dev, dtype)
    x = torch.randn(3, 22, 40, generator=torch.Generator().manual_seed(3)).to(dev, dtype).requires_grad_()
    params = [p for p in m.parameters() if p.requires_grad]
    assert sum(p.dim() == 1 and p.shape[0] in (48, 24) for p in params) == 5  # 3 magnitudes and 2 trained biases
    layers = (m.q, m.k, m.v)
    g = torch.Generator().manual_seed(4)
    out = fused_linears(x, layers)
    assert out is not None and kernels_only == [True] * 3 + [("scale_output", True)] * 3  # a row norm per output
    cot = [torch.randn(o.shape, generator=g).to(dev, dtype) for o in out]
    got = torch.autograd.grad(out, [x, *params], cot)
    assert kernels_only[6:] == [("scale_grads", True)] * 3
    ref = tuple(layer.reference_forward(x) for layer in layers)
    want = torch.autograd.grad(ref, [x, *params], cot)
    tol = TOL[dtype] if dtype == torch.float32 else 2e-2  # bf16: the reference rounds every intermediate
    for u, v in zip((*out, *got), (*ref, *want)):
        assert u.shape == v.shape and rel_norm(u, v) <= tol


def test_one_layer_through_optimize_uses_the_kernels(kernel_device, kernels_only):
    dev = kernel_device
    m = _dora(dev, torch.float32)
    lorakit.optimize(m)
    kernels_only.clear()
    x = torch.randn(2, 9, 40, device=dev)  # an input without grad: only the adapter's gradients
    params = [p for p in m.q.parameters() if p.requires_grad]
    out = m.q(x)
    assert kernels_only == [True, ("scale_output", True)]
    got = torch.autograd.grad(out.square().sum(), params)
    ref = m.q.reference_forward(x)
    want = torch.autograd.grad(ref.square().sum(), params)
    assert rel_norm(out, ref) <= TOL[torch.float32]
    assert all(rel_norm(u, v) <= 1e-5 for u, v in zip(got, want))


def test_without_triton_the_torch_path_stays(kernel_device, monkeypatch):
    monkeypatch.setenv("LORAKIT_TRITON", "0")
    z = torch.randn(4, 16, device=kernel_device)
    m, norm = torch.rand(16, device=kernel_device) + 1, torch.rand(16, device=kernel_device) + 1
    assert sk.row_norm(z, z[:2], z[:, :2], 1.0) is None
    monkeypatch.setattr(sk, "_scale_fwd", None)  # a launch would fail
    monkeypatch.setattr(sk, "_scale_back", None)
    assert torch.equal(sk.scale_output(z, m, norm, None), z * (m / norm))
    dz, dm, db = sk.scale_grads(z, z, m, norm, True)
    assert torch.equal(dz, z * (m / norm)) and db is None and torch.allclose(dm, (z * z).sum(0) / norm)
