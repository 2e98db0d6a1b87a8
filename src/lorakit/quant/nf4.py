"""NF4: the 4-bit NormalFloat format of QLoRA (Dettmers et al., 2023), with double quantization.

A weight of n values is cut, in row-major order, into blocks of `block_size` (64) values. Each block keeps
its absolute maximum (absmax), and each value becomes the index (0..15) of the nearest of the 16 NF4 code
values (quantiles of N(0, 1), scaled to [-1, 1]) to value / absmax. Two indices share a byte, the first
in the high nibble. Double quantization stores the absmax values themselves in 8 bits: their mean is
subtracted (`offset`) and the rest is quantized in blocks of 256 with bitsandbytes' signed 8-bit dynamic
map (`code2`, one fp32 scale `absmax2` per block). Cost per weight: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits.

Why lorakit has its own implementation, in exactly bitsandbytes' format:
- The numbers are bitsandbytes' (the QLoRA reference code): same code values, same rounding (nearest by
  midpoints, scaled by the reciprocal absmax), same remainder-block handling, same byte layout. So the
  round-trip error of a matrix EQUALS bitsandbytes' on the same data (tests/test_quant_nf4.py checks the
  bytes), and a bnb `Params4bit` converts to and from `NF4Tensor` without requantizing (quant/bnb.py).
- bitsandbytes is not a dependency: its wheel is ~43 MB of native libraries for every CUDA/ROCm version,
  while this file is pure PyTorch (any device) and the GPU dequantization is a ~40-line Triton kernel
  (quant/triton_nf4.py) that writes bf16 straight into the matmul's operand; lorakit's only hard
  dependencies stay torch and safetensors. bnb is still supported for models already loaded with it.
- torchao's NF4Tensor (also pure PyTorch) uses the same 16 code values but quantizes the absmax values
  with a linear int8 scale per block, not bnb's dynamic map with a mean offset: its numbers differ from
  the reference, and it cannot read bnb checkpoints without requantizing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError

# The 16 NF4 values (bitsandbytes.functional.get_4bit_type("nf4"): create_normal_map(offset=0.9677083)).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
ZERO_CODE = 7  # NF4_CODE[7] == 0.0
ABSMAX_BLOCK = 256  # block size of the second quantization (of the absmax values)
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' valid block sizes
DEFAULT_BLOCK_SIZE = 64  # QLoRA's (and bitsandbytes') NF4 block size


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), 256 sorted fp32 values."""
    data = []
    for i in range(7):  # exponent 10^(i-6), 2^i evenly spaced fractions each, both signs
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@lru_cache(maxsize=None)
def _tables(device: torch.device) -> dict[str, torch.Tensor]:
    """Per-device constants: the NF4 code and its midpoints, the dynamic map and its midpoints, and a
    byte → (high value, low value) lookup table for dequantizing a whole byte at once."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    dyn = dynamic_map()
    byte = torch.arange(256)
    pairs = torch.stack((code[byte >> 4], code[byte & 15]), dim=1)  # [256, 2]
    out = {"code": code, "bounds": (code[:-1] + code[1:]) / 2, "dyn": dyn, "dyn_bounds": (dyn[:-1] + dyn[1:]) / 2,
           "pairs": pairs}
    return {k: v.to(device) for k, v in out.items()}


@dataclass
class NF4Tensor:
    """A quantized weight: the packed codes and the block scales (plain tensors, any device)."""

    packed: torch.Tensor  # uint8 [ceil(n/2)]: two codes per byte, element 2i in the high nibble
    absmax: torch.Tensor  # fp32 [blocks], or uint8 [blocks] indices into code2 when double-quantized
    shape: tuple[int, ...]  # the original weight's shape
    block_size: int = DEFAULT_BLOCK_SIZE
    dtype: torch.dtype = torch.float32  # the original weight's dtype (bitsandbytes' quant_state.dtype)
    absmax2: Optional[torch.Tensor] = None  # fp32 [ceil(blocks/256)]: scale of each block of absmax codes
    code2: Optional[torch.Tensor] = None  # fp32 [256]: the dynamic map the absmax codes index
    offset: Optional[torch.Tensor] = None  # fp32 []: the mean absmax, subtracted before quantizing
    launch: Optional[tuple] = field(default=None, repr=False, compare=False)  # cached Triton launch arguments

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves quantized (absmax holds uint8 codes into code2)."""
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        """The number of weight values (the product of `shape`)."""
        return math.prod(self.shape)

    @property
    def blocks(self) -> int:
        """The number of quantization blocks, ceil(numel / block_size)."""
        return self.absmax.numel()

    def storage_bytes(self) -> int:
        """Bytes held: packed codes, block scales and, when double-quantized, absmax2, code2 and offset."""
        extra = [self.absmax2, self.code2, self.offset] if self.double_quant else []
        return sum(t.numel() * t.element_size() for t in [self.packed, self.absmax, *extra])

    def bits_per_weight(self) -> float:
        """Packed codes + block scales (+ second-level scales), per weight value; code2 (1 KB, shareable) excluded."""
        code2 = self.code2.numel() * 4 if self.double_quant else 0
        return 8 * (self.storage_bytes() - code2) / self.numel

    def block_scales(self) -> torch.Tensor:
        """fp32 [blocks]: each block's absmax (after the round trip through 8 bits when double-quantized)."""
        if not self.double_quant:
            return self.absmax.float()
        return dequantize_blockwise(self.absmax, self.absmax2, self.code2, ABSMAX_BLOCK) + self.offset


# --- the 8-bit blockwise quantizer (bitsandbytes' quantize_blockwise), used for the absmax values -----------
def quantize_blockwise(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x fp32 [n] → (codes uint8 [n], scales fp32 [ceil(n/block)], code fp32 [256])."""
    t = _tables(x.device)
    codes, scales = _scale_and_bucketize(x.float(), block, t["dyn_bounds"])
    return codes.to(torch.uint8), scales, t["dyn"].clone()


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, code: torch.Tensor, block: int) -> torch.Tensor:
    """The inverse of quantize_blockwise: codes uint8 [n], scales fp32 [ceil(n/block)], code fp32 [256] →
    fp32 [n], each value code[codes[i]] × its block's scale."""
    n = codes.numel()
    vals = code[codes.long()]
    vals = F.pad(vals, (0, scales.numel() * block - n)).view(-1, block) * scales[:, None]
    return vals.view(-1)[:n]


def _scale_and_bucketize(flat: torch.Tensor, block: int, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax scaling and nearest-code rounding, bit for bit as bitsandbytes does it: full blocks
    are multiplied by the reciprocal absmax, a trailing partial block is divided by its absmax."""
    n = flat.numel()
    full = n - n % block
    head = flat[:full].view(-1, block)
    absmax = head.abs().amax(dim=1)
    scaled = torch.clamp(head * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).view(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return _bucketize(scaled, bounds), absmax


def _bucketize(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """torch.bucketize(x, bounds) (the number of bounds < x); for NF4's 15 bounds, 15 vectorised comparisons are
    ~4x faster on a CPU than bucketize's per-element binary search. Same result: the bounds are exact fp32."""
    if bounds.numel() > 15:
        return torch.bucketize(x, bounds, out_int32=True)
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for b in bounds.tolist():
        idx += x > b
    return idx


# --- NF4 -------------------------------------------------------------------------------------------------
def check_block_size(block_size: int) -> None:
    """Raise ConfigError unless block_size is one of bitsandbytes' NF4 block sizes (BLOCK_SIZES)."""
    if block_size not in BLOCK_SIZES:
        raise ConfigError(f"NF4 block_size must be one of {BLOCK_SIZES} (as in bitsandbytes), got {block_size!r}")


@torch.no_grad()
def quantize_nf4(w: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = True) -> NF4Tensor:
    """Quantize a float tensor (any shape) to NF4, on its own device, in pure PyTorch."""
    check_block_size(block_size)
    if not w.is_floating_point() or w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"NF4 quantizes fp32/fp16/bf16 weights, got {w.dtype}")
    if w.numel() == 0:
        raise ConfigError("cannot quantize an empty tensor")
    if not torch.isfinite(w).all():
        raise ConfigError("cannot quantize a weight that holds NaN or inf values")
    t = _tables(w.device)
    idx, absmax = _scale_and_bucketize(w.detach().reshape(-1).float(), block_size, t["bounds"])
    idx = F.pad(idx, (0, idx.numel() % 2), value=ZERO_CODE).to(torch.uint8)  # odd count: pad with the code of 0.0
    packed = (idx[::2] << 4) | idx[1::2]
    q = NF4Tensor(packed, absmax, tuple(w.shape), block_size, w.dtype)
    if double_quant:
        offset = absmax.mean()
        q.absmax, q.absmax2, q.code2 = quantize_blockwise(absmax - offset, ABSMAX_BLOCK)
        q.offset = offset
    return q


def dequantize_nf4_reference(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference dequantization (pure PyTorch): code value × block absmax in fp32, then cast."""
    n = q.numel
    pairs = _tables(q.packed.device)["pairs"]  # [256, 2]: byte → (high value, low value)
    vals = F.embedding(q.packed.int(), pairs).view(-1)  # one lookup per byte (embedding: ~5x faster than indexing)
    scales = q.block_scales()
    vals = F.pad(vals, (0, scales.numel() * q.block_size - vals.numel())).view(-1, q.block_size) * scales[:, None]
    return vals.view(-1)[:n].view(q.shape).to(dtype)


CHUNK_BLOCKS = 4096  # blocks per chunk of dequantize_nf4_reference_into: a bounded fp32 temporary


def dequantize_nf4_reference_into(q: NF4Tensor, out: torch.Tensor) -> torch.Tensor:
    """The reference dequantization written into `out` (contiguous, q.shape) chunk by chunk, each chunk computed
    as in dequantize_nf4_reference (code value × block absmax in fp32, then cast): equal values, and no fp32
    temporary larger than CHUNK_BLOCKS blocks."""
    pairs = _tables(q.packed.device)["pairs"]
    scales = q.block_scales()
    flat, bs = out.view(-1), q.block_size
    step = CHUNK_BLOCKS * bs  # values per chunk; a multiple of the block size (even: whole bytes)
    for start in range(0, q.numel, step):
        stop = min(start + step, q.numel)
        vals = F.embedding(q.packed[start // 2:(stop + 1) // 2].int(), pairs).view(-1)
        blocks = scales[start // bs:(start // bs) + -(-(stop - start) // bs)]
        vals = F.pad(vals, (0, blocks.numel() * bs - vals.numel())).view(-1, bs) * blocks[:, None]
        flat[start:stop].copy_(vals.view(-1)[:stop - start])
    return out
