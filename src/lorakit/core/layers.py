"""What a delta needs to know of the base layer it adapts, per layer type.

Every delta works in one canonical orientation: a weight matrix W_c of shape [out, in, *kernel] and
activations x [..., in] → y [..., out] (channels first for convolutions). `LayerOps` translates that
to each base layer type: nn.Linear, transformers' Conv1D (weight stored [in, out]), nn.Embedding
(weight [num, dim], so in = num, out = dim and x is token ids) and nn.Conv1d/2d/3d.
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TargetError


class LayerOps:
    """Canonical view of a linear-like layer (nn.Linear; Conv1D when transposed)."""

    kind = "linear"

    def __init__(self, layer: nn.Module, transposed: bool = False):
        self.layer = layer
        self.transposed = transposed  # weight stored [in, out] (GPT-2 Conv1D, fan_in_fan_out)
        w = layer.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
        self.kernel: tuple[int, ...] = ()

    # Where an adapter's parameters live: the base weight's device and floating dtype.
    @property
    def device(self) -> torch.device:
        """The device adapter parameters are created on."""
        return self.layer.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype adapter parameters are created in (the default dtype for an integer base)."""
        dtype = self.layer.weight.dtype
        return dtype if dtype.is_floating_point else torch.get_default_dtype()

    def down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x [..., in] · a [r, in]ᵀ → [..., r]."""
        return F.linear(x, a)

    def up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """h [..., r] · b [out, r]ᵀ → [..., out]."""
        return F.linear(h, b)

    def add_up(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """y + up(h, b) as one GEMM with a beta=1 epilogue (no separate elementwise pass over y)."""
        rows = math.prod(y.shape[:-1])  # explicit: h may have rank 0 (a layer whose ranks were all pruned away)
        out = torch.addmm(y.reshape(rows, y.shape[-1]), h.reshape(rows, h.shape[-1]), b.t())
        return out.view(y.shape)

    def to_layer_layout(self, w_c: torch.Tensor) -> torch.Tensor:
        """A canonical [out, in] matrix in the base weight's own layout."""
        return w_c.t() if self.transposed else w_c

    def from_layer_layout(self, w: torch.Tensor) -> torch.Tensor:
        """The base weight's own layout → canonical [out, in]."""
        return w.t() if self.transposed else w


class EmbeddingOps(LayerOps):
    """nn.Embedding: weight [num, dim]; canonical W_c = weightᵀ [dim, num]; x holds token ids."""

    kind = "embedding"

    def __init__(self, layer: nn.Embedding):
        super().__init__(layer, transposed=True)

    def down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """ids [...] and a [r, num] → [..., r]: a lookup of aᵀ with the base layer's own options."""
        emb = self.layer
        return F.embedding(x, a.t(), emb.padding_idx, emb.max_norm, emb.norm_type, emb.scale_grad_by_freq, emb.sparse)


class ConvOps(LayerOps):
    """nn.ConvNd: weight [out, in, *k]. down is a conv with the base's kernel, stride and padding; up a 1×1 conv."""

    kind = "conv"

    def __init__(self, layer: nn.modules.conv._ConvNd):
        if layer.groups != 1:
            raise TargetError(f"grouped convolutions (groups={layer.groups}) are not supported")
        self.layer = layer
        self.transposed = False
        self.out_features, self.in_features = layer.out_channels, layer.in_channels
        self.kernel = tuple(layer.kernel_size)
        self._conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(self.kernel)]

    def down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x [B, in, *S] conv a [r, in, *k] → [B, r, *S'], with the base's stride, padding and dilation."""
        return self.layer._conv_forward(x, a, None)  # honours padding_mode as well

    def up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """h [B, r, *S'] 1×1-conv b [out, r, *1] → [B, out, *S']."""
        return self._conv(h, b)

    def add_up(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """y + up(h, b)."""
        return y + self._conv(h, b)


def _conv1d_type() -> Optional[type]:
    """transformers' GPT-2 Conv1D, if transformers is already imported (lorakit never imports it for this)."""
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old or stripped transformers
        return None
    return Conv1D


# Layer types defined outside this file (a quantized linear, bitsandbytes' Linear4bit): (predicate, LayerOps
# factory) pairs, tried in order before the built-in types. A factory whose LayerOps has kind "linear" makes
# its type part of "all-linear".
EXTRA_LAYER_OPS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], LayerOps]]] = []


def _extra_ops_factory(layer: nn.Module) -> Optional[Callable[[nn.Module], LayerOps]]:
    return next((factory for matches, factory in EXTRA_LAYER_OPS if matches(layer)), None)


def ops_for(layer: nn.Module) -> Optional[LayerOps]:
    """LayerOps for a supported layer, else None."""
    extra = _extra_ops_factory(layer)
    if extra is not None:
        return extra(layer)
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(layer, conv1d):
        return LayerOps(layer, transposed=True)
    if isinstance(layer, nn.Linear):
        return LayerOps(layer)
    if isinstance(layer, nn.Embedding):
        return EmbeddingOps(layer)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return ConvOps(layer)
    return None


def is_linear(layer: nn.Module) -> bool:
    """What "all-linear" selects: nn.Linear, Conv1D and registered linear-like types."""
    extra = _extra_ops_factory(layer)
    if extra is not None:
        return extra(layer).kind == "linear"
    conv1d = _conv1d_type()
    return isinstance(layer, nn.Linear) or (conv1d is not None and isinstance(layer, conv1d))
