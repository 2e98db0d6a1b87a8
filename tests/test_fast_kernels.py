"""Each kernel of lorakit.fast against HF's own code: the pure-torch fallbacks on CPU, and the Triton kernels
against the fallbacks on CUDA (or on CPU under Triton's interpreter, at smaller shapes: see conftest.kernel_device)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.fast import rope as rope_mod
from lorakit.fast.cross_entropy import linear_cross_entropy, shift_labels
from lorakit.fast.norms import fast_rms_forward, rms_norm
from lorakit.fast.rope import fused_rope_enabled, make_fused_apply, rope
from lorakit.fast.swiglu import act_kind, gated_act
from support import one_thread, rel_norm  # noqa: F401



def _check(fast_fn, ref_fn, inputs, tol, grad_tol=None):
    """Outputs and gradients (w.r.t. every input that requires grad) of two functions agree."""
    ins_f = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    ins_r = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out_f, out_r = fast_fn(*ins_f), ref_fn(*ins_r)
    out_f, out_r = (out_f, out_r) if isinstance(out_f, tuple) else ((out_f,), (out_r,))
    g = torch.Generator(device=out_r[0].device).manual_seed(1)
    cots = [torch.randn(o.shape, generator=g, device=o.device, dtype=o.dtype) for o in out_r]
    for a, b in zip(out_f, out_r):
        assert a.shape == b.shape and a.dtype == b.dtype and rel_norm(a, b) <= tol
    wrt_f = [t for t in ins_f if t.requires_grad]
    wrt_r = [t for t in ins_r if t.requires_grad]
    if not wrt_r:
        return
    for a, b in zip(torch.autograd.grad(out_f, wrt_f, cots), torch.autograd.grad(out_r, wrt_r, cots)):
        assert rel_norm(a, b) <= (grad_tol or tol)


def _hf_norms(dim, device, dtype):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    out = []
    for cls in (LlamaRMSNorm, GemmaRMSNorm):
        torch.manual_seed(0)
        m = cls(dim).to(device=device, dtype=dtype)
        with torch.no_grad():
            m.weight.normal_()
        out.append(m)
    return out


def _fast_norm(module, t, w):
    style = "gemma" if "Gemma" in type(module).__name__ else "llama"
    return rms_norm(t, w, getattr(module, "variance_epsilon", None) or module.eps, style)


def _hf_norm(module, t, w):
    return torch.func.functional_call(module, {"weight": w}, (t,))


# --- CPU: the torch fallbacks against HF ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rms_norm_fallback_matches_hf_modules_with_weight_grad(dtype, tol):
    for module in _hf_norms(48, "cpu", dtype):
        x = torch.randn(3, 7, 48, dtype=dtype, requires_grad=True)
        w = module.weight.detach().clone().requires_grad_(True)
        _check(lambda t, wt, m=module: _fast_norm(m, t, wt), lambda t, wt, m=module: _hf_norm(m, t, wt), [x, w], tol)
        with torch.no_grad():  # the module patch computes the same as the function
            assert torch.equal(fast_rms_forward(module, None, x), _fast_norm(module, x, module.weight))


def test_rope_fallback_matches_hf_and_hook_is_inert_outside_optimized_attention():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    bsz, seq, heads, kv, dim = 2, 6, 4, 2, 8
    q = torch.randn(bsz, seq, heads * dim).view(bsz, seq, heads, dim).transpose(1, 2).requires_grad_(True)
    k = torch.randn(bsz, kv, seq, dim, requires_grad=True)
    ang = torch.randn(bsz, seq, dim // 2)
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos(), emb.sin()
    _check(lambda *t: rope(*t), lambda *t: apply_rotary_pos_emb(*t), [q, k, cos, sin], 1e-6)

    seen = []
    hook = make_fused_apply(lambda *a: seen.append(a) or ("orig",))
    assert hook(q, k, cos, sin) == ("orig",) and len(seen) == 1  # outside optimize()d attention: HF's own
    with fused_rope_enabled():
        hook(q, k, cos, sin)  # CPU tensors: no kernel, HF's own again
    assert len(seen) == 2 and not getattr(rope_mod._STATE, "on", False)


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_gated_act_fallback(kind, dtype, tol):
    from transformers.activations import ACT2FN

    act = ACT2FN["silu" if kind == "silu" else "gelu_pytorch_tanh"]
    assert act_kind(act) == kind
    g = torch.randn(5, 33, dtype=dtype, requires_grad=True) * 3
    u = torch.randn(5, 33, dtype=dtype, requires_grad=True)
    _check(lambda a, b: gated_act(a, b, kind), lambda a, b: act(a) * b, [g.detach(), u.detach()], tol)
    _check(lambda a, b: gated_act(a, b, kind), lambda a, b: act(a) * b,
           [g.detach().requires_grad_(), u.detach().requires_grad_()], tol)


@pytest.mark.parametrize("num_items", [None, 13])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_fallback_matches_hf_loss(num_items, bias):
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    vocab = 50
    h = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(vocab, 16)
    b = torch.randn(vocab) if bias else None
    labels = torch.randint(0, vocab, (2, 9))
    labels[1, :4] = -100

    def fast(t):
        return linear_cross_entropy(t, w, b, shift_labels(labels), num_items_in_batch=num_items, chunk_rows=5)

    def ref(t):
        return ForCausalLMLoss(F.linear(t, w, b), labels, vocab, num_items_in_batch=num_items)

    _check(fast, ref, [h], 1e-6, grad_tol=1e-5)


# --- Triton kernels against the torch fallbacks (bf16), on CUDA or in the interpreter ------------------------
def _both(monkeypatch, fn, *inputs):
    """fn with the Triton kernels, and with LORAKIT_TRITON=0 (the torch fallbacks), on copies of inputs."""
    monkeypatch.setenv("LORAKIT_TRITON", "1")
    fast_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*fast_in)
    monkeypatch.setenv("LORAKIT_TRITON", "0")
    ref_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    ref = fn(*ref_in)
    monkeypatch.setenv("LORAKIT_TRITON", "1")
    return (out, fast_in), (ref, ref_in)


def _compare_kernels(monkeypatch, fn, inputs, tol):
    (out, fin), (ref, rin) = _both(monkeypatch, fn, *inputs)
    out, ref = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for a, b in zip(out, ref):
        assert rel_norm(a, b) <= tol
    cots = [torch.randn_like(o) for o in ref]
    monkeypatch.setenv("LORAKIT_TRITON", "1")
    ga = torch.autograd.grad(out, [t for t in fin if t.requires_grad], cots)
    monkeypatch.setenv("LORAKIT_TRITON", "0")
    gb = torch.autograd.grad(ref, [t for t in rin if t.requires_grad], cots)
    for a, b in zip(ga, gb):
        assert rel_norm(a, b) <= tol


@pytest.mark.parametrize("dim", [64, 2048, 5000])
def test_triton_rms_norm(monkeypatch, kernel_device, dim):
    rows = 33 if kernel_device == "cuda" else 5
    for module in _hf_norms(dim, kernel_device, torch.bfloat16):
        x = torch.randn(4, rows, dim, device=kernel_device, dtype=torch.bfloat16, requires_grad=True)
        w = module.weight.detach().clone().requires_grad_(True)
        _compare_kernels(monkeypatch, lambda t, wt, m=module: _fast_norm(m, t, wt), [x, w], 1e-2)


@pytest.mark.parametrize("dim,heads,kv", [(64, 32, 8), (128, 8, 8), (80, 3, 1)])
def test_triton_rope(monkeypatch, kernel_device, dim, heads, kv):
    dev = kernel_device
    bsz, seq = 2, 37 if dev == "cuda" else 5
    q = torch.randn(bsz, seq, heads * dim, device=dev, dtype=torch.bfloat16).view(bsz, seq, heads, dim)
    q = q.transpose(1, 2).requires_grad_(True)
    k = torch.randn(bsz, kv, seq, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ang = torch.randn(1, seq, dim // 2, device=dev)
    emb = torch.cat([ang, ang], -1)
    _compare_kernels(monkeypatch, rope, [q, k, emb.cos().bfloat16(), emb.sin().bfloat16()], 1e-2)


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
def test_triton_gated_act(monkeypatch, kernel_device, kind):
    rows = 64 if kernel_device == "cuda" else 8
    g = torch.randn(rows, 1000, device=kernel_device, dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(rows, 1000, device=kernel_device, dtype=torch.bfloat16, requires_grad=True)
    _compare_kernels(monkeypatch, lambda a, b: gated_act(a, b, kind), [g, u], 1e-2)


def test_triton_gated_act_reuses_saved_inputs_only_in_a_single_backward(kernel_device):
    """In a checkpoint's recompute (SINGLE_BACKWARD) the backward writes dg, du over g, u when nothing else keeps
    them; the gradients stay those of the reference. A producer that keeps its output (exp): neither is written."""
    from lorakit.fast.thread_scope import SINGLE_BACKWARD

    rows = 64 if kernel_device == "cuda" else 4
    a, b, c = (torch.randn(rows, 256, device=kernel_device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cot = torch.randn(rows, 256, device=kernel_device, dtype=torch.bfloat16)

    def run(scoped: bool, gate):
        with SINGLE_BACKWARD.entered() if scoped else contextlib.nullcontext():
            g, u = gate(a, b), c + b  # u: a fresh sum, which no node keeps
            out = gated_act(g, u, "silu")
        before = (g.detach().clone(), u.detach().clone())
        grads = torch.autograd.grad(out, [a, b, c], cot, allow_unused=True)
        return grads, not torch.equal(before[0], g.detach()), not torch.equal(before[1], u.detach())

    for gate, reusable in ((lambda x, y: x + y, True), (lambda x, y: torch.exp(x * 0.1), False)):
        ref, g_written, u_written = run(False, gate)
        assert not g_written and not u_written  # outside the scope nothing is reused
        got, g_written, u_written = run(True, gate)
        assert g_written is reusable and u_written is reusable  # both or neither
        for x, y in zip(got, ref):
            assert (x is None and y is None) or torch.equal(x, y)


def test_triton_linear_cross_entropy(monkeypatch, kernel_device):
    dev = kernel_device
    vocab, rows = (5003, 100) if dev == "cuda" else (1003, 10)
    h = torch.randn(3, rows, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(vocab, 256, device=dev, dtype=torch.bfloat16) / 16
    labels = torch.randint(0, vocab, (3, rows), device=dev)
    labels[0, : 10 if dev == "cuda" else 4] = -100

    def fn(t):
        return linear_cross_entropy(t, w, None, shift_labels(labels), chunk_rows=64 if dev == "cuda" else 8)

    _compare_kernels(monkeypatch, fn, [h], 1e-2)


def test_optimized_llama_bf16_matches_reference(kernel_device):
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    dev = kernel_device
    big = dev == "cuda"  # the interpreter runs one kernel program at a time: a smaller model on CPU
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000 if big else 200, hidden_size=256 if big else 64,
                      intermediate_size=704 if big else 176, num_hidden_layers=2, num_attention_heads=8 if big else 4,
                      num_key_value_heads=2, max_position_embeddings=256)
    ref = LlamaForCausalLM(cfg).to(dev).to(torch.bfloat16).train()
    lorakit.add_adapter(ref, lorakit.LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    fast = copy.deepcopy(ref)
    lorakit.optimize(fast)
    ids = torch.randint(0, cfg.vocab_size, (2, 128 if big else 16), device=dev)
    out = []
    for m in (ref, fast):
        loss = m(input_ids=ids, labels=ids).loss
        params = [p for p in m.parameters() if p.requires_grad]
        out.append((loss, torch.autograd.grad(loss, params)))
    assert abs(out[0][0].item() - out[1][0].item()) <= 1e-2 * out[0][0].item()
    for a, b in zip(out[1][1], out[0][1]):
        assert rel_norm(a, b) <= 3e-2
