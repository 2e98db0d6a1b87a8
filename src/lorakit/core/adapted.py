"""The adapted layer: a frozen base layer plus named deltas in parallel.

It never branches on the variant: it asks each active delta to transform the output. The base weight
is reached through one accessor (`base_weight` / `set_base_weight`), so a quantized base is a different
weight source, not a different layer class. The model's state_dict keeps the base layer's original
keys (`q.weight`, not `q.base_layer.weight`), so its base entries load into a plain model as they are.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerOps, ops_for

_HOOKS = nn.modules.module  # its global hook dicts: a hook anywhere must see the base layer's call


class DenseWeight:
    """The default weight source: the base layer's own weight parameter (or the parameter `name`), updated in
    place."""

    def __init__(self, layer: nn.Module, name: str = "weight"):
        self.layer = layer
        self.name = name

    def get(self) -> torch.Tensor:
        """The base layer's weight parameter itself."""
        return getattr(self.layer, self.name)

    @torch.no_grad()
    def set(self, w: torch.Tensor) -> None:
        """Copy `w` into the weight in place (the parameter keeps its identity)."""
        getattr(self.layer, self.name).copy_(w)


# (predicate, factory) pairs tried in order; a quantized base registers its own source here. A source whose
# weight is not a dense parameter may also offer `dense_shape` ((out, in)), `dense_dtype` and
# `write_dense(out) -> out`: the dense weight written into a caller's buffer of that shape and dtype, so a
# fused path can reuse one scratch buffer for every layer instead of a new dense copy per call.
WEIGHT_SOURCES: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], DenseWeight]]] = []


def weight_source_for(layer: nn.Module, name: str = "weight"):
    """The weight source of `layer`: the first registered one that claims it, else its dense weight. `name`: another
    parameter of the layer (a parameter target), always a dense one."""
    if name != "weight":
        return DenseWeight(layer, name)
    for matches, factory in WEIGHT_SOURCES:
        if matches(layer):
            return factory(layer)
    return DenseWeight(layer)


class KeepsBaseKeys(nn.Module):
    """Shows the wrapped child's parameters under the wrapper's own prefix in state_dict, and back."""

    inner_name = "base_layer"

    def __init__(self) -> None:
        super().__init__()
        self.register_state_dict_post_hook(KeepsBaseKeys._hide_inner)
        self.register_load_state_dict_pre_hook(KeepsBaseKeys._restore_inner)

    @staticmethod
    def _hide_inner(module, state_dict, prefix, local_metadata) -> None:
        inner = prefix + module.inner_name + "."
        child = module._modules.get(module.inner_name)
        # A wrapper nested in this one (two parameters of one module adapted) keeps its own modules under base_layer.
        nested = {n + "." for n in child._modules if n != child.inner_name} if isinstance(child, KeepsBaseKeys) else ()
        for key in [k for k in state_dict if k.startswith(inner)]:
            if not key[len(inner):].startswith(tuple(nested)):
                state_dict[prefix + key[len(inner):]] = state_dict.pop(key)

    @staticmethod
    def _restore_inner(module, state_dict, prefix, *args) -> None:
        own = {n for n in module._modules if n != module.inner_name}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            head = key[len(prefix):].split(".", 1)[0]
            if head not in own and head != module.inner_name:
                state_dict[prefix + module.inner_name + "." + key[len(prefix):]] = state_dict.pop(key)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == self.inner_name or self.inner_name not in modules:
                raise
            return getattr(modules[self.inner_name], name)  # e.g. .weight, .in_features, .padding_idx


class AdaptedLayer(KeepsBaseKeys):
    """A frozen base layer plus named deltas in parallel: y = base(x), then each active unmerged delta transforms y."""

    def __init__(self, base_layer: nn.Module, ops: Optional[LayerOps] = None):
        super().__init__()
        self.base_layer = base_layer
        self.ops = ops or ops_for(base_layer)
        # ops.layer: the base layer, or for a parameter target the module holding it (base_layer may then be
        # the wrapper of another of its parameters)
        self.weight_source = weight_source_for(self.ops.layer, self.ops.weight_name)
        self.deltas = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []  # names merged into the base weight, in merge order
        self.disabled = False
        # Extension slots, each a callable (layer, x, *args, **kwargs) -> y, kept outside this file:
        self.routing = None  # per-row adapters for a mixed batch (set inside lorakit.per_row)
        self.fast_path = None  # a fused implementation (set by lorakit.optimize); must equal reference_forward

    def base_weight(self) -> torch.Tensor:
        """The dense base weight in the layer's own layout (the one accessor deltas use)."""
        return self.weight_source.get()

    def set_base_weight(self, w: torch.Tensor) -> None:
        """Write the base weight through the weight source (merging, PiSSA's residual)."""
        self.weight_source.set(w)

    def base_output(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output on x. A plain nn.Linear (no hooks, no instance forward: accelerate's offload hooks
        and lorakit's patches replace `forward`) is computed directly: its module call costs more host time than
        the GEMM at small batches, and a mixed-batch forward makes one per adapted layer."""
        base = self._modules["base_layer"]
        params = base._parameters  # FSDP1 sets its unsharded views as plain attributes: those take the module call
        if (type(base) is nn.Linear and not args and not kwargs and "forward" not in base.__dict__
                and "weight" in params and "bias" in params
                and not base._forward_hooks and not base._forward_pre_hooks and not base._backward_hooks
                and not base._backward_pre_hooks and not _HOOKS._global_forward_hooks
                and not _HOOKS._global_forward_pre_hooks and not _HOOKS._global_backward_hooks
                and not _HOOKS._global_backward_pre_hooks):
            return F.linear(x, params["weight"], params["bias"])
        return base(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Per-row routing if a mixed batch is running, else the fast path if one is installed, else the reference."""
        if self.routing is not None:
            return self.routing(self, x, *args, **kwargs)
        if self.fast_path is not None and not self.disabled:
            return self.fast_path(self, x, *args, **kwargs)
        return self.reference_forward(x, *args, **kwargs)

    def reference_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The reference math every fast path is tested against."""
        live = () if self.disabled else [self.deltas[name] for name in self.active
                                         if name in self.deltas and name not in self.merged]  # need not target every layer
        return self.ops.run(self, live, x, *args, **kwargs)

    def merge(self, names: tuple[str, ...]) -> None:
        """Add the named adapters' ΔW into the base weight (each once; in order)."""
        for name in names:
            if name in self.deltas and name not in self.merged:
                self.deltas[name].merge(self)
                self.merged.append(name)

    def unmerge(self) -> None:
        """Take the merged adapters out again, last merged first."""
        while self.merged:
            self.deltas[self.merged.pop()].unmerge(self)

    def extra_repr(self) -> str:
        """Adapters, active set and merged names, for print(model)."""
        return f"adapters={list(self.deltas)}, active={list(self.active)}, merged={self.merged}"
