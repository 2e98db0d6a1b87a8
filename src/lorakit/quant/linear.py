"""NF4Linear: a frozen linear layer whose weight is stored in NF4 (what `lorakit.quantize` puts in place).

forward(x) = F.linear(x, dequantize(W), b) in the compute dtype, through an autograd function that saves
no dense weight: the backward pass dequantizes again (grad_x = grad_y · W), so a step never holds more than
one layer's dense weight at a time. On CUDA the dequantization is a Triton kernel, then cuBLAS multiplies.

The layer is deliberately not an nn.Linear subclass: nn.Linear promises a dense float `weight`, and code that
relies on that (weight init, fused kernels, `F.linear(x, m.weight)`) must not be handed packed bytes. lorakit
adapts it through its own LayerOps (quant/weight.py), registered in `layers.EXTRA_LAYER_OPS`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .dequant import dequantize_nf4
from .nf4 import DEFAULT_BLOCK_SIZE, NF4Tensor, quantize_nf4


class PackedNF4(nn.Parameter):
    """The packed codes (uint8, two weights a byte): a frozen Parameter so that parameter counts see it;
    `lorakit_numel_factor` makes lorakit.trainable_report count it per weight, as PEFT counts Params4bit."""

    lorakit_numel_factor = 2


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 → its int32 bit pattern, so that model.to(bf16) / .half() leave the scales alone (only device moves apply)."""
    return t.detach().float().reshape(-1).contiguous().view(torch.int32)


class _NF4LinearFn(torch.autograd.Function):
    """y = x · Wᵀ + b with W dequantized in forward and again in backward: nothing of W's size is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: Optional[torch.Tensor], layer: "NF4Linear") -> torch.Tensor:
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(x, layer.dense_weight(), bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ ctx.layer.dense_weight()  # [..., out] · [out, in] → [..., in]
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_b, None


class NF4Linear(nn.Module):
    """A linear layer y = x·Wᵀ + b with W [out, in] in NF4 (frozen), computed in `compute_dtype`."""

    def __init__(self, q: NF4Tensor, bias: Optional[torch.Tensor] = None, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {q.shape}")
        self.out_features, self.in_features = q.shape
        self.block_size = q.block_size
        self.double_quant = q.double_quant
        self.compute_dtype = compute_dtype
        self.source_dtype = q.dtype  # the dtype the weight had before quantization
        self.weight = PackedNF4(q.packed, requires_grad=False)  # uint8 [ceil(out·in / 2)]
        self._store(q)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    def _store(self, q: NF4Tensor) -> None:
        """Block scales as buffers: uint8 codes (double quant) or fp32 kept as bit patterns (see _bits)."""
        self.register_buffer("absmax", q.absmax if q.double_quant else _bits(q.absmax))
        self.register_buffer("absmax2", _bits(q.absmax2) if q.double_quant else None)
        self.register_buffer("code2", _bits(q.code2) if q.double_quant else None)
        self.register_buffer("offset", _bits(q.offset) if q.double_quant else None)
        self._view = None  # the NF4Tensor view of these buffers, built on first use

    @classmethod
    def from_linear(cls, layer: nn.Module, block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16, device=None) -> "NF4Linear":
        """An NF4Linear holding NF4(layer.weight) [out, in] (quantized on `device`, default: where the weight is)
        and layer's bias in compute_dtype; `layer` is any module with .weight [out, in] and .bias."""
        w = layer.weight.detach().to(device)
        bias = None if layer.bias is None else layer.bias.detach().to(device)
        return cls(quantize_nf4(w, block_size, double_quant), bias, compute_dtype)

    def nf4(self) -> NF4Tensor:
        """The stored weight as an NF4Tensor (views of the buffers, no copy; cached, as it is built per forward)."""
        if self._view is None:  # reset whenever the buffers are replaced (_store, _apply, copies)
            self._view = self._make_view()
        return self._view

    def _make_view(self) -> NF4Tensor:
        fp = lambda t: t.view(torch.float32)  # noqa: E731
        q = NF4Tensor(self.weight.data, self.absmax if self.double_quant else fp(self.absmax),
                      (self.out_features, self.in_features), self.block_size, self.source_dtype)
        if self.double_quant:
            q.absmax2, q.code2, q.offset = fp(self.absmax2), fp(self.code2), fp(self.offset).reshape(())
        return q

    def dense_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dequantized weight [out, in] in `dtype` (default: the compute dtype)."""
        return dequantize_nf4(self.nf4(), dtype or self.compute_dtype)

    @torch.no_grad()
    def requantize(self, w: torch.Tensor) -> None:
        """Replace the stored weight by NF4(w), with this layer's block size and double quantization (lossy)."""
        q = quantize_nf4(w.to(self.weight.device), self.block_size, self.double_quant)
        self.weight = PackedNF4(q.packed, requires_grad=False)
        self._store(q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] → x·Wᵀ + b [..., out], computed in compute_dtype and returned in x's dtype."""
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _NF4LinearFn.apply(x.to(self.compute_dtype), bias, self)
        return y.to(x.dtype)

    def __getstate__(self):  # deepcopy / pickle: the copy builds its own view of its own buffers
        return {**self.__dict__, "_view": None}

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._view = None  # the buffers may be new tensors (.to(device), to_empty)
        if not isinstance(self.weight, PackedNF4):  # to_empty() and some loaders re-create plain Parameters
            self.weight = PackedNF4(self.weight.data, requires_grad=False)
        return self

    def extra_repr(self) -> str:
        """Sizes, bias, NF4 block size, double quantization and compute dtype, for print(model)."""
        dq = ", double_quant" if self.double_quant else ""
        bias = self.bias is not None
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, nf4 block={self.block_size}"
                f"{dq}, compute_dtype={str(self.compute_dtype).replace('torch.', '')}")
