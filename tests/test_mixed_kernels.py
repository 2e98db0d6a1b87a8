"""The stacked layout and the GPU kernels of mixed batches.

CPU: the SGMV work list covers every token of every row with an adapter exactly once, stacks zero-pad
ranks without changing the result, and the token-level torch reference equals explicit per-token math.
Kernels (on CUDA, or on CPU under Triton's interpreter at smaller sizes: see conftest.kernel_device): the Triton
SGMV/BGMV kernels equal the torch reference (fp32 within 1e-5 relative, bf16 within 2e-2), and a model's per_row
prefill and decode match single-adapter runs.
"""


import pytest
import torch
from torch import nn

import lorakit
from lorakit.multi import kernels
from lorakit.multi.kernels import build_stack, segment_tiles, token_reference
from support import only


class _FakeLora(nn.Module):
    """What the stack reads from a plain-LoRA delta (Delta.linear_factors)."""

    def __init__(self, r, n_in, n_out, scaling, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.r, self.scaling = r, scaling
        self.lora_A = nn.Parameter(torch.randn(r, n_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.randn(n_out, r, dtype=dtype, device=device))

    def linear_factors(self):
        return self.lora_A, self.lora_B, self.scaling, 0.0


def _explicit(x, y, deltas, slot_of_token):
    out = y.clone()
    for t, s in enumerate(slot_of_token):
        if s < len(deltas):
            d = deltas[s]
            out[t] += d.scaling * (d.lora_B @ (d.lora_A @ x[t]))
    return out


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_segment_tiles_cover_each_adapted_token_once(block_m):
    gids = [0, 0, -1, 2, 1, 1, 1, -1, 0]
    tokens = 5
    seen = torch.zeros(len(gids) * tokens, dtype=torch.long)
    for start, count, gid in segment_tiles(gids, tokens, block_m):
        assert 0 < count <= block_m and gid >= 0
        owners = {gids[t // tokens] for t in range(start, start + count)}
        assert owners == {gid}  # a tile never mixes adapters
        seen[start:start + count] += 1
    expected = torch.tensor([int(g >= 0) for g in gids]).repeat_interleave(tokens)
    assert torch.equal(seen, expected)


def test_stack_pads_ranks_and_token_reference_matches_explicit_math():
    torch.manual_seed(0)
    deltas = [_FakeLora(r, 12, 9, s) for r, s in ((2, 0.5), (5, 2.0), (3, 1.0))]
    stack = build_stack(deltas)
    assert stack.a.shape == (4, 5, 12) and stack.bt.shape == (4, 5, 9) and stack.none_slot == 3
    assert not stack.a[3].any() and not stack.a[0, 2:].any() and not stack.bt[0, 2:].any()
    x, y = torch.randn(10, 12), torch.randn(10, 9)
    slots = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2, 2, 1])
    out = token_reference(x, y, stack, slots)
    expected = _explicit(x, y, deltas, slots.tolist())
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[slots == 3], y[slots == 3])  # the none slot adds exact zeros
    out.sum().backward()  # the stack is differentiable: each delta gets a gradient
    assert all(d.lora_A.grad is not None and d.lora_A.grad.abs().sum() > 0 for d in deltas)


def test_stacks_are_cached_and_rebuilt_when_weights_change():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(8, 8))
    for name in ("a", "b"):
        lorakit.add_adapter(lin, lorakit.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), name)
    x = torch.randn(2, 8)
    with torch.no_grad():
        with lorakit.per_row(lin, ["a", "b"]):
            first = lin(x)
        lin[0].deltas["b"].lora_B.mul_(2)  # an in-place change between blocks is seen
        with lorakit.per_row(lin, ["a", "b"]):
            second = lin(x)
    assert torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])
    lorakit.multi.routing.clear_stacks(lin)
    assert lin[0] not in lorakit.multi.layer_plans._STACKS


# --- the kernels: on CUDA, or in Triton's interpreter ------------------------------------------------------
def _random_case(dtype, n_rows, tokens, device, n_in=160, n_out=200, ranks=(4, 16, 8, 2)):
    deltas = [_FakeLora(r, n_in, n_out, 0.5 + i, dtype, device) for i, r in enumerate(ranks)]
    with torch.no_grad():
        stack = build_stack(deltas)
    n_gid = len(ranks) + 1  # the last gid has no slot on this layer
    slot_map = torch.tensor(list(range(len(ranks))) + [-1], dtype=torch.int32, device=device)
    row_gids = torch.randint(-1, n_gid, (n_rows,)).tolist()
    x = torch.randn(n_rows * tokens, n_in, device=device).to(dtype)
    y = torch.randn(n_rows * tokens, n_out, device=device).to(dtype)
    slot_tok = torch.tensor([len(ranks) if g < 0 or g == n_gid - 1 else g for g in row_gids for _ in range(tokens)],
                            device=device)
    return stack, slot_map, row_gids, x, y, slot_tok


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_bgmv_sums_every_input_chunk(dtype, tol, kernel_device):
    """An input wider than one shrink chunk (three chunks, the last one partial): every chunk's partial sum
    reaches h, idle rows stay untouched."""
    from lorakit.multi import triton_lora

    n_in = 2 * triton_lora.BGMV_CHUNK + 76
    torch.manual_seed(1)
    stack, slot_map, row_gids, x, y, slot_tok = _random_case(dtype, 5, 1, kernel_device, n_in=n_in, n_out=136)
    f32 = kernels.AdapterStack(stack.a.float(), stack.bt.float(), stack.scale, stack.p)
    ref = token_reference(x.float(), y.float(), f32, slot_tok)
    out = y.clone()
    kernels.bgmv(x, out, stack, slot_map, torch.tensor(row_gids, device=kernel_device).int())
    assert float((out.float() - ref).norm() / (ref - y.float()).norm()) < tol
    untouched = slot_tok == stack.none_slot
    assert torch.equal(out[untouched], y[untouched])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_kernels_match_the_torch_reference(dtype, tol, tokens, monkeypatch, kernel_device):
    dev = kernel_device
    n_rows = 13
    if dev == "cpu":  # the interpreter runs one kernel program (a BGMV row) at a time: fewer, shorter rows
        n_rows, tokens = 3, min(tokens, 40)  # 40 tokens still make several tiles of 16 and of 32 per row
    torch.manual_seed(0)
    stack, slot_map, row_gids, x, y, slot_tok = _random_case(dtype, n_rows, tokens, dev)
    f32 = kernels.AdapterStack(stack.a.float(), stack.bt.float(), stack.scale, stack.p)
    ref = token_reference(x.float(), y.float(), f32, slot_tok)
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(kernels, "SGMV_FUSED", fused)
        for block_m in (16, 32, 64):
            out = y.clone()
            tiles = torch.tensor(segment_tiles(row_gids, tokens, block_m), dtype=torch.int32, device=dev).view(-1, 3)
            kernels.sgmv(x, out, stack, slot_map, tiles, block_m)
            runs[f"sgmv{block_m}{'' if fused else '-split'}"] = out
    out = y.clone()
    kernels.bgmv(x, out, stack, slot_map, torch.tensor(row_gids, device=dev).repeat_interleave(tokens).int())
    runs["bgmv"] = out
    for label, out in runs.items():
        err = float((out.float() - ref).norm() / (ref - y.float()).norm())
        assert err < tol, (label, err)
        untouched = slot_tok == stack.none_slot
        assert torch.equal(out[untouched], y[untouched]), label


def test_sgmv_takes_contiguous_inputs_of_any_rank(kernel_device):
    """[rows, tokens, 1, in] from a transpose is contiguous for torch, with a stride of 1-size dimension -2 that is
    not the row stride: SGMV must read the same token rows as from the flattened copy."""
    torch.manual_seed(2)
    stack, slot_map, row_gids, x, y, _ = _random_case(torch.float32, 2, 3, kernel_device, n_in=32, n_out=24)
    x4 = x.view(2, 1, 3, 32).transpose(1, 2)  # [2, 3, 1, 32], strides (96, 32, 96, 1)
    y4 = y.clone().view(2, 1, 3, 24).transpose(1, 2)
    assert x4.is_contiguous() and x4.stride(-2) != 32
    tiles = torch.tensor(segment_tiles(row_gids, 3, 16), dtype=torch.int32, device=kernel_device).view(-1, 3)
    flat = y.clone()
    kernels.sgmv(x, flat, stack, slot_map, tiles, 16)
    kernels.sgmv(x4, y4, stack, slot_map, tiles, 16)
    torch.testing.assert_close(y4.reshape(6, 24), flat, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_model_prefill_and_decode_match_single_adapters(tiny_llama, dtype, tol, monkeypatch, kernel_device):
    dev = kernel_device
    model = tiny_llama.to(dev, dtype)
    for i, r in enumerate((4, 16, 8)):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                      init_lora_weights=False), f"a{i}")
    model.eval()
    calls = {"sgmv": 0, "bgmv": 0}
    for name in calls:
        def counted(*args, _run=getattr(kernels, name), _name=name):
            calls[_name] += 1
            return _run(*args)
        monkeypatch.setattr(kernels, name, counted)
    names = ["a0", "a2", None, "a1", "a0", "a1", "a2", None]
    if dev == "cpu":  # the interpreter runs one kernel program at a time: fewer rows, shorter prompts
        names = names[:4]  # still every adapter, and a row without one
    ids = torch.randint(1, 128, (len(names), 33 if dev == "cuda" else 9), device=dev)
    singles = {n: only(model, n) for n in set(names)}
    with torch.no_grad():
        expected = torch.stack([singles[n](ids).logits[i] for i, n in enumerate(names)]).float()
        with lorakit.per_row(model, names):  # kernels allowed + no grad: the Triton kernels
            out = model(ids).logits.float()
        assert float((out - expected).norm() / expected.norm()) < tol
        gen = lambda m, x: m.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)  # noqa: E731
        if dtype == torch.float32:  # decode (BGMV) tokens equal; bf16 ties may legitimately flip a token
            expected_tokens = torch.stack([gen(singles[n], ids)[i] for i, n in enumerate(names)])
            with lorakit.per_row(model, names):
                assert torch.equal(gen(model, ids), expected_tokens)
    assert calls["sgmv"] >= 7 * 2 and (calls["bgmv"] >= 7 * 2 * 4 or dtype != torch.float32)  # the kernels ran
