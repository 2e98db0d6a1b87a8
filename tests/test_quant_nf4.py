"""The NF4 format: code values, bytes and round-trip error equal to bitsandbytes; the Triton kernel equal to the reference."""

import math

import pytest
import torch

import lorakit
from lorakit.quant.nf4 import (ABSMAX_BLOCK, NF4_CODE, dequantize_nf4_reference, dynamic_map, quantize_blockwise,
                               quantize_nf4)


def _bnb():
    return pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def _no_compile():
    """bitsandbytes wraps its reference kernels in torch.compile: seconds per shape on a CI box, same numbers."""
    with torch._dynamo.config.patch(disable=True):
        yield


def _weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.1  # rows of different scale
    return w.to(dtype)


def test_code_values_are_the_normal_quantiles_of_the_qlora_paper():
    """NF4 = create_normal_map(offset=0.9677083): 8 positive and 7 negative N(0,1) quantiles and 0, scaled to [-1, 1]."""
    from scipy.stats import norm

    offset = 0.9677083
    pos = norm.ppf(torch.linspace(offset, 0.5, 9).tolist())[:-1]
    neg = -norm.ppf(torch.linspace(offset, 0.5, 8).tolist())[:-1]
    values = sorted([*pos, 0.0, *neg])
    values = [v / max(abs(x) for x in values) for v in values]
    assert torch.allclose(torch.tensor(NF4_CODE, dtype=torch.float64), torch.tensor(values, dtype=torch.float64), atol=1e-7)


def test_dynamic_map_and_nf4_code_equal_bitsandbytes():
    bnb = _bnb()
    assert torch.equal(dynamic_map(), bnb.functional.create_dynamic_map())
    assert torch.equal(torch.tensor(NF4_CODE), bnb.functional.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("shape,dtype,block", [((96, 128), torch.float32, 64), ((64, 256), torch.bfloat16, 64),
                                               ((33, 96), torch.float16, 32), ((40, 512), torch.float32, 256),
                                               ((7, 9), torch.float32, 64), ((1, 5), torch.bfloat16, 64)])
def test_bytes_and_round_trip_equal_bitsandbytes(shape, dtype, block):
    """Single quantization: the packed bytes, the absmax values and the dequantized matrix are bnb's, bit for bit."""
    bnb = _bnb()
    w = _weight(shape, dtype)
    ref_packed, state = bnb.functional.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=False)
    q = quantize_nf4(w, block, double_quant=False)
    assert torch.equal(q.packed, ref_packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    mine = dequantize_nf4_reference(q, dtype)
    if shape[1] >= block:  # bnb's CPU dequantizer is wrong when a block spans rows; its reference kernel is used below
        assert torch.equal(mine, bnb.functional.dequantize_4bit(ref_packed, state))
    ref = _bnb_reference_dequant(ref_packed, state)
    assert torch.equal(mine, ref)
    assert (mine.float() - w.float()).norm() == (ref.float() - w.float()).norm()  # the round-trip error, equal


def _bnb_reference_dequant(packed, state):
    """bitsandbytes' device-independent dequantize_4bit kernel (the one that mirrors its CUDA kernel)."""
    op = torch.ops.bitsandbytes.dequantize_4bit.default
    return op.redispatch(_REFERENCE_KEYS, packed, state.absmax, state.blocksize, "nf4", state.shape, state.dtype)


_REFERENCE_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def test_double_quant_equals_bitsandbytes_reference_kernel():
    """The absmax values go through bnb's 8-bit dynamic quantizer in blocks of 256, after subtracting their mean."""
    bnb = _bnb()
    for seed in range(3):
        w = _weight((300, 192), seed=seed)  # 900 blocks: 3 full absmax blocks + a tail block
        q = quantize_nf4(w, 64, double_quant=True)
        _, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(q.offset, state.offset)
        raw = quantize_nf4(w, 64, double_quant=False).absmax
        codes, scales = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(_REFERENCE_KEYS, raw - state.offset,
                                                                                      dynamic_map(), ABSMAX_BLOCK)
        assert torch.equal(q.absmax, codes) and torch.equal(q.absmax2, scales)
        # bnb's CPU C++ quantizer picks the neighbouring code for ~0.1% of absmax values; the error is the same to 1e-3
        ours = (dequantize_nf4_reference(q) - w).norm()
        theirs = (bnb.functional.dequantize_4bit(*bnb.functional.quantize_4bit(
            w, blocksize=64, quant_type="nf4", compress_statistics=True)) - w).norm()
        assert abs(ours / theirs - 1) < 1e-3


def test_blockwise_8bit_rounds_to_the_nearest_code():
    x = torch.randn(1000) * 3
    codes, scales, code = quantize_blockwise(x, 256)
    scaled = (x.view(-1)[: 768].view(3, 256) * (1 / scales[:3, None])).reshape(-1)
    nearest = (scaled[:, None] - code[None]).abs().argmin(1)
    assert torch.equal(codes[:768].long(), nearest)


def test_bits_per_weight_is_about_4_13():
    q = quantize_nf4(_weight((512, 1024)), 64, double_quant=True)
    assert q.bits_per_weight() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    single = quantize_nf4(_weight((512, 1024)), 64, double_quant=False)
    assert single.bits_per_weight() == pytest.approx(4.5, abs=1e-3)


@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_error_is_bounded_per_block(double_quant):
    """Each value lands within half the largest NF4 gap (· its block's scale) of itself, plus the scale's own shortfall
    (a double-quantized absmax can round below the true one, and the value is then clipped); zeros stay zeros."""
    w = _weight((37, 100))  # 3700 values: a tail block of 52
    w[3] = 0.0
    q = quantize_nf4(w, 64, double_quant=double_quant)
    back = dequantize_nf4_reference(q)
    half_gap = torch.tensor(NF4_CODE).diff().max() / 2
    flat, err = w.reshape(-1), (back - w).reshape(-1)
    absmax = torch.nn.functional.pad(flat, (0, 64 - flat.numel() % 64)).view(-1, 64).abs().amax(1)
    scales = q.block_scales()
    bound = scales * half_gap * (1 + 1e-6) + (absmax - scales).clamp(min=0)
    assert (err.abs() <= bound.repeat_interleave(64)[: flat.numel()] + 1e-9).all()
    assert double_quant or torch.equal(scales, absmax)
    assert torch.equal(back[3], torch.zeros(100))
    assert math.isclose((back - w).norm() / w.norm(), 0.1, rel_tol=0.5)  # NF4's ~10% relative error on normal data


def test_quantize_rejects_bad_input():
    with pytest.raises(lorakit.ConfigError, match="block_size"):
        quantize_nf4(_weight((4, 64)), block_size=48)
    with pytest.raises(lorakit.ConfigError, match="fp32/fp16/bf16"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int32))
    bad = _weight((4, 64))
    bad[1, 2] = float("nan")
    with pytest.raises(lorakit.ConfigError, match="NaN"):
        quantize_nf4(bad)


@pytest.mark.parametrize("shape,block,double_quant,dtype", [((4096, 1024), 64, True, torch.bfloat16),
                                                            ((1000, 333), 64, True, torch.float16),
                                                            ((257, 96), 128, False, torch.float32),
                                                            ((3, 5), 64, True, torch.bfloat16)])
def test_triton_dequant_equals_reference(shape, block, double_quant, dtype, kernel_device):
    from lorakit.quant.triton_nf4 import dequantize_nf4_triton

    dev = kernel_device
    if dev == "cpu":  # Triton's interpreter runs one program at a time: fewer rows
        shape = (min(shape[0], 256), shape[1])
    w = torch.randn(shape, device=dev)
    q = quantize_nf4(w, block, double_quant)
    out = torch.full(shape, float("nan"), device=dev, dtype=dtype)  # poisoned: every element must be written
    dequantize_nf4_triton(q, dtype, out=out)
    assert torch.equal(out, dequantize_nf4_reference(q, dtype))
