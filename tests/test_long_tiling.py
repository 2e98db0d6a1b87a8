"""The long-context path: the sequence-tiled MLP equals the untiled one (forward and every gradient, float32),
and a whole model with optimize(checkpoint="offload") and tiling on gives the loss and gradients of the
reference (CPU)."""

import copy

import pytest
import torch

import lorakit
from lorakit.fast import families
from lorakit.fast.tiling import tile_rows_for, tiled_rows
from support import one_thread, rel_norm  # noqa: F401

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapted(model, **kw):
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                  init_lora_weights=False, **kw))
    return model.train()


def _long_batch(seq=40, vocab=128, seed=1):
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :5] = -100
    return {"input_ids": ids, "labels": labels}


def _grads(model, batch):
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_tiled_rows_equals_one_pass_forward_and_gradients():
    torch.manual_seed(0)
    w1 = torch.randn(6, 16, requires_grad=True)
    w2 = torch.randn(16, 6, requires_grad=True)
    fn = lambda t: torch.nn.functional.silu(t @ w1) @ w2  # noqa: E731
    x = torch.randn(1, 23, 6, requires_grad=True)  # 23 rows: the last tile is short
    dout = torch.randn(1, 23, 6)
    ref = fn(x)
    gx, g1, g2 = torch.autograd.grad(ref, (x, w1, w2), dout)
    out = tiled_rows(fn, x, 5, [w1, w2])
    assert out.shape == ref.shape and rel_norm(out, ref) <= 1e-6
    tx, t1, t2 = torch.autograd.grad(out, (x, w1, w2), dout)
    for a, b in ((tx, gx), (t1, g1), (t2, g2)):
        assert rel_norm(a, b) <= 1e-6
    with torch.no_grad():
        assert torch.equal(tiled_rows(fn, x, 5, [w1, w2]), out.detach())


def test_tiled_rows_replays_dropout_in_the_backward():
    """fn draws random numbers: the backward recomputes each tile with the draws of its forward, so the
    gradient is the one of the function that produced the output."""
    torch.manual_seed(0)
    w = torch.randn(8, 8, requires_grad=True)
    fn = lambda t: torch.nn.functional.dropout(t, 0.5, training=True) @ w  # noqa: E731
    x = torch.randn(30, 8, requires_grad=True)
    torch.manual_seed(3)
    out = tiled_rows(fn, x, 7, [w])
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    # recompute the forward's masks: same seed, same tile order, no tiling for the gradients
    torch.manual_seed(3)
    masks = torch.cat([torch.nn.functional.dropout(torch.ones(len(x[i:i + 7]), 8), 0.5) for i in range(0, 30, 7)])
    ref = (x * masks) @ w
    assert torch.allclose(out, ref, atol=1e-6)
    rx, rw = torch.autograd.grad(ref.sum(), (x, w))
    assert rel_norm(gx, rx) <= 1e-6 and rel_norm(gw, rw) <= 1e-6


def test_tile_rows_for_a_wide_intermediate():
    # Llama-3-8B's MLP in bf16: about 256 MiB per [rows, 14336] tile
    rows = tile_rows_for(14336, 2)
    assert 8000 < rows < 10000 and rows * 14336 * 2 <= 256 * 2**20


def test_tiled_mlp_module_equals_untiled_including_lora_factor_grads(tiny_llama):
    ref = _adapted(tiny_llama)
    fast = copy.deepcopy(ref)
    lorakit.optimize(ref)
    counts = lorakit.optimize(fast, tile_mlp=7)
    assert counts["tiled_mlp"] == 2
    mlp_ref, mlp_fast = ref.model.layers[0].mlp, fast.model.layers[0].mlp
    seen = []
    real = families._gated_mlp

    def spy(module, kind, x, unread):
        seen.append(x.shape[0] if x.dim() == 2 else x.shape[:-1].numel())
        return real(module, kind, x, unread)

    x = torch.randn(1, 33, 64, requires_grad=True)
    dout = torch.randn(1, 33, 64)
    y0 = mlp_ref(x)
    params0 = [p for p in mlp_ref.parameters() if p.requires_grad]
    g0 = torch.autograd.grad(y0, [x, *params0], dout)
    families._gated_mlp = spy
    try:
        y1 = mlp_fast(x)
        params1 = [p for p in mlp_fast.parameters() if p.requires_grad]
        g1 = torch.autograd.grad(y1, [x, *params1], dout)
    finally:
        families._gated_mlp = real
    assert max(seen) == 7 and len(seen) == 2 * 5  # 5 tiles forward, 5 recomputed in the backward
    assert len(params1) == 6  # A and B of gate, up and down
    assert rel_norm(y1, y0) <= 1e-6
    for a, b in zip(g1, g0):
        assert rel_norm(a, b) <= 1e-6


@pytest.mark.parametrize("tile", ["auto", 6])
def test_long_context_path_keeps_whole_model_loss_and_gradients(tiny_llama, tile):
    """optimize(checkpoint="offload") with the MLPs tiled against the plain adapted model, batch 1."""
    ref = _adapted(tiny_llama)
    fast = copy.deepcopy(ref)
    counts = lorakit.optimize(fast, checkpoint="offload", tile_mlp=tile)
    assert counts["checkpoint"] == 2 and counts["tiled_mlp"] == 2
    batch = _long_batch()
    l0, g0 = _grads(ref, batch)
    l1, g1 = _grads(fast, batch)
    assert abs(l1.item() - l0.item()) <= 1e-5 * abs(l0.item())
    assert g0.keys() == g1.keys() and len(g0) == 2 * 7 * 2
    for name in g0:
        assert rel_norm(g1[name], g0[name]) <= 3e-5, name


def test_offload_defaults_to_auto_tiling_and_unoptimize_clears_it(tiny_llama):
    model = _adapted(tiny_llama)
    assert lorakit.optimize(model, checkpoint=True)["tiled_mlp"] == 0
    lorakit.unoptimize(model)
    assert lorakit.optimize(model, checkpoint="offload")["tiled_mlp"] == 2
    assert model.model.layers[0].mlp.__dict__[families.TILE_ATTR] == "auto"
    lorakit.unoptimize(model)
    assert families.TILE_ATTR not in model.model.layers[0].mlp.__dict__
    with pytest.raises(lorakit.errors.ConfigError, match="tile_mlp"):
        lorakit.optimize(model, tile_mlp=-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_norm_remake_gives_the_norm_output_exactly(dtype, style):
    """The tiled MLP keeps the norm's input and 1/rms instead of its output: the rows it remakes must be
    the very output (bit for bit), or the backward would differentiate another function."""
    from lorakit.fast import recipes
    from lorakit.fast.norms import rms_norm
    from lorakit.fast.tiling import norm_remake

    torch.manual_seed(0)
    x = (3 * torch.randn(1, 37, 48)).to(dtype)
    w = (1 + 0.1 * torch.randn(48)).to(dtype)
    y = rms_norm(x, w, 1e-6, style)
    remake = norm_remake(recipes.norm_recipe(y), dtype)
    rows = torch.cat([remake(i, min(i + 8, 37)) for i in range(0, 37, 8)])
    assert rows.dtype == dtype and torch.equal(rows, y.reshape(37, 48))


def test_whole_model_tiling_remakes_the_norm_output(tiny_llama, monkeypatch):
    model = _adapted(tiny_llama)
    lorakit.optimize(model, checkpoint="offload", tile_mlp=8)
    made = []
    real = families.norm_remake
    monkeypatch.setattr(families, "norm_remake", lambda r, d: made.append(d) or real(r, d))
    _grads(model, _long_batch())
    assert len(made) == 2 * 2  # each layer: in the first (no-grad) forward and in its recompute
