"""What a delta needs to know of the base layer it adapts, per layer type.

Every delta works in one canonical orientation: a weight matrix W_c of shape [out, in, *kernel] and
activations x [..., in] → y [..., out] (channels first for convolutions). `LayerOps` translates that
to each base layer type: nn.Linear, transformers' Conv1D (weight stored [in, out]), nn.Embedding
(weight [num, dim], so in = num, out = dim and x is token ids) and nn.Conv1d/2d/3d. `ParameterOps`
adapts one parameter of any module (PEFT's `target_parameters`, e.g. a MoE's fused expert weights).

`run` is how an adapted layer computes with its deltas: for these layer types the deltas transform the
base layer's output; a parameter target's deltas transform the parameter instead.
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TargetError


class LayerOps:
    """Canonical view of a linear-like layer (nn.Linear; Conv1D when transposed)."""

    kind = "linear"
    single_matrix = True  # ΔW is one matrix B·A (a stack of experts' matrices is not)
    output_side = True  # deltas transform the layer's output (per-row routing relies on it)
    weight_name = "weight"  # the base layer's attribute the weight source reads and merges write

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

    def run(self, layer: nn.Module, deltas: Sequence[nn.Module], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The adapted layer's output: y = base(x), then each delta in turn transforms y.

        Args:
            layer: the AdaptedLayer (its base_layer computes y).
            deltas: the deltas to apply, in order (active, unmerged).
            x, args, kwargs: the layer's own call arguments.
        Returns:
            The output with every delta applied."""
        y = layer.base_layer(x, *args, **kwargs)
        for delta in deltas:
            y = delta(x, y, layer)
        return y

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of a rank-r product's factors A [r, in, *k] and B [out, r, *1s] (PEFT's shapes)."""
        return (r, self.in_features, *self.kernel), (self.out_features, r, *(1,) * len(self.kernel))

    def factor_product(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """B·A of factors shaped as factor_shapes gives them: the canonical ΔW_c [out, in, *k] (unscaled)."""
        return (b.flatten(1) @ a.flatten(1)).view(self.out_features, self.in_features, *self.kernel)

    def adapter_input(self, x: torch.Tensor, dropout: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """What a low-rank delta's down projection reads: the dropped-out input in the adapter's dtype."""
        return dropout(x).to(dtype)

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

    def adapter_input(self, x: torch.Tensor, dropout: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """Token ids as they are (no dropout on ids, as in PEFT)."""
        return x

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


class ParameterOps(LayerOps):
    """One parameter of any module (PEFT's `target_parameters`): a 2-D weight [out, in], or E experts' weights
    fused in one 3-D parameter [E, out, in] ([E, in, out] where the module sets `is_transposed`, as some of
    transformers' MoE experts do). Canonical ΔW_c: [E, out, in] ([out, in] for a 2-D parameter).

    The deltas adapt the parameter, not the module's output: `run` computes W' = W + Σ ΔW (a delta's forward
    gets x = W and y = the parameter so far) and the module computes with W' in W's place, so any module that
    reads the parameter works, however it routes tokens to experts. As in PEFT, A is [E·r, in] and B [out, E·r]:
    expert e uses A's rows e·r … e·r+r−1 and B's columns j·E + e, and every expert's ΔW_e = B_e·A_e comes from
    one batched matmul (no loop over experts)."""

    kind = "parameter"
    output_side = False

    def __init__(self, layer: nn.Module, name: str):
        param = getattr(layer, name)
        shape = tuple(getattr(param, "ds_shape", param.shape))  # DeepSpeed ZeRO-3 keeps the full shape aside
        if len(shape) not in (2, 3) or not param.is_floating_point():
            raise TargetError(f"parameter {name!r} is {len(shape)}-D {str(param.dtype).replace('torch.', '')}; "
                              "only floating 2-D weights and 3-D expert stacks can be adapted (as in PEFT)")
        self.layer, self.weight_name, self.shape = layer, name, shape
        self.num_experts = shape[0] if len(shape) == 3 else 1
        self.single_matrix = len(shape) == 2
        self.transposed = len(shape) == 3 and bool(getattr(layer, "is_transposed", False))
        d1, d2 = shape[-2:]
        self.out_features, self.in_features = (d2, d1) if self.transposed else (d1, d2)
        self.kernel = ()

    @property
    def device(self) -> torch.device:
        """The parameter's device."""
        return getattr(self.layer, self.weight_name).device

    @property
    def dtype(self) -> torch.dtype:
        """The parameter's dtype."""
        return getattr(self.layer, self.weight_name).dtype

    def run(self, layer: nn.Module, deltas: Sequence[nn.Module], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The module's output computed with W' = W + Σ ΔW in place of the parameter (see the class docstring)."""
        if not deltas:
            return layer.base_layer(x, *args, **kwargs)
        w = layer.base_weight()
        with torch.autocast(w.device.type, enabled=False):  # W' keeps W's dtype, as the module expects
            adapted = w
            for delta in deltas:
                adapted = delta(w, adapted, layer)
        # An instance attribute shadows the registered Parameter for the call (state_dict, parameters() and
        # the Parameter itself are untouched); nested wrappers of one module each shadow their own parameter.
        self.layer.__dict__[self.weight_name] = adapted
        try:
            return layer.base_layer(x, *args, **kwargs)
        finally:
            self.layer.__dict__.pop(self.weight_name, None)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """A [E·r, in] and B [out, E·r], as PEFT stores them."""
        return (r * self.num_experts, self.in_features), (self.out_features, r * self.num_experts)

    def _per_expert_b(self, b: torch.Tensor) -> torch.Tensor:
        """B [out, E·r] → [E, out, r] (column j·E + e is expert e's j-th)."""
        return b.view(self.out_features, -1, self.num_experts).permute(2, 0, 1)

    def factor_product(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Each expert's B_e·A_e in one batched matmul: [E, out, in] ([out, in] for a 2-D parameter)."""
        w_c = torch.bmm(self._per_expert_b(b), self.down(None, a))
        return w_c[0] if self.single_matrix else w_c

    def adapter_input(self, x: torch.Tensor, dropout: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """Unused: a parameter's delta does not depend on the activations (no dropout, as PEFT refuses it)."""
        return x

    def down(self, x: Optional[torch.Tensor], a: torch.Tensor) -> torch.Tensor:
        """A [E·r, in] per expert, [E, r, in]: a parameter's delta is the same for every input (x is unused)."""
        return a.view(self.num_experts, -1, self.in_features)

    def up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """h [E, r, in] → B_e·h_e, [E, out, in]."""
        return torch.bmm(self._per_expert_b(b), h)

    def add_up(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """y + B_e·h_e per expert, in the parameter's own layout, as one baddbmm (h: [E, r, in])."""
        y3 = y.view(self.num_experts, *y.shape[-2:])
        b_e = self._per_expert_b(b)
        if self.transposed:  # y [E, in, out]
            return torch.baddbmm(y3, h.transpose(1, 2), b_e.transpose(1, 2)).view(y.shape)
        return torch.baddbmm(y3, b_e, h).view(y.shape)

    def to_layer_layout(self, w_c: torch.Tensor) -> torch.Tensor:
        """Canonical [E, out, in] → the parameter's layout."""
        return w_c.transpose(-1, -2) if self.transposed else w_c

    def from_layer_layout(self, w: torch.Tensor) -> torch.Tensor:
        """The parameter's layout → canonical [E, out, in]."""
        return w.transpose(-1, -2) if self.transposed else w


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
