"""The weight-delta protocol: what every registered variant (variants/<name>.py) implements.

A `Delta` is one adapter's change to one base layer. The adapted layer only ever calls the methods
below, so a variant is one file that subclasses Delta and registers itself (see registry.py).
The base weight reaches a delta only through `layer.base_weight()` / `layer.set_base_weight()`.

Low-rank deltas also answer the low-rank protocol: `linear_factors` (their live factors, for the fused
linear of lorakit.fast and the stacked mixed-batch paths of lorakit.multi), `scaled_linear_factors` (the same
factors plus a per-output magnitude over a row norm, for the fused linear), `low_rank_factors` (detached
factors of ΔW), and `factors_writable` / `set_low_rank_factors` (hot-swap, combine, truncate write any
s·B·A into them). A new low-rank variant gets all of those paths by implementing these, nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Optional

import torch
from torch import nn
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook

from .config import AdapterConfig
from .layers import LayerOps

if TYPE_CHECKING:
    from .adapted import AdaptedLayer

# (A [r, in], B [out, r], s, dropout p) of a delta whose linear forward is y + s·(drop_p(x)·Aᵀ)·Bᵀ.
LinearFactors = tuple[nn.Parameter, nn.Parameter, float, float]


# Counts what can change a delta's factors without moving their version counters: assignments to any delta's
# attributes, parameters, buffers and submodules, and conversions (`_apply`: .to() / .double() / .cuda() write
# `param.data`). Caches of the factors (the mixed-batch stacks) re-check every delta when it moved, otherwise only
# their version counters. Writes through `param.data` (`p.data = new`, `p.data.copy_(...)`) move neither, nor do
# optimizers that write by raw pointer outside torch.optim's step hooks (some 8-bit or CUDA-graph-replayed steps):
# call lorakit.multi.routing.clear_stacks after them.
STATE_EPOCH = [0]


def _count() -> None:
    STATE_EPOCH[0] += 1


def _fused_steps_move_versions(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any optimizer's step: a fused step (`fused=True`) writes its parameters in place without moving their
    version counters (the for-loop and foreach steps move them); move them, so caches keyed on versions see it."""
    for group in optimizer.param_groups:
        if group.get("fused"):
            for p in group["params"]:
                if p.grad is not None:  # what the step updated
                    increment_version(p)


register_optimizer_step_post_hook(_fused_steps_move_versions)


class Delta(nn.Module):
    """One adapter's change to one base layer; every variant subclasses it (see the module docstring)."""

    # Each counts after the change, so a cache checked in between never records the new count with the old state.
    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        _count()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        _count()

    def register_parameter(self, name: str, param) -> None:
        super().register_parameter(name, param)
        _count()

    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        _count()

    def add_module(self, name: str, module) -> None:
        super().add_module(name, module)
        _count()

    def _apply(self, fn, recurse: bool = True):
        try:
            return super()._apply(fn, recurse)
        finally:
            _count()

    def __init__(self, ops: LayerOps, config: AdapterConfig, module_name: str):
        super().__init__()
        self.ops = ops
        self.module_name = module_name

    # --- the math -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor, layer: "AdaptedLayer") -> torch.Tensor:
        """x: the layer's input; y: the output so far. Returns y with this adapter applied. On a parameter target
        (`ParameterOps`) the adapted quantity is the parameter itself: x is the base parameter W, y the parameter so
        far, and the result is what the module computes with (y + ΔW for an additive delta)."""
        raise NotImplementedError

    def delta_weight(self, layer: "AdaptedLayer") -> torch.Tensor:
        """ΔW in the base weight's layout, in float32 (merging in bf16 adds it in fp32 first)."""
        raise NotImplementedError

    # --- merging: W' = W + ΔW by default; variants with a non-additive form override both ----------
    @torch.no_grad()
    def merge(self, layer: "AdaptedLayer") -> None:
        """W ← W + ΔW, computed in fp32 and stored in the base weight's dtype."""
        w = layer.base_weight()
        layer.set_base_weight((w.float() + self.delta_weight(layer)).to(w.dtype))

    @torch.no_grad()
    def unmerge(self, layer: "AdaptedLayer") -> None:
        """W ← W − ΔW, the inverse of merge."""
        w = layer.base_weight()
        layer.set_base_weight((w.float() - self.delta_weight(layer)).to(w.dtype))

    # --- state in PEFT's names --------------------------------------------------------------------
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """{PEFT key suffix (the name PEFT gives the tensor): parameter}; the suffix follows the module path."""
        raise NotImplementedError

    def peft_tensors_for_save(self) -> dict[str, torch.Tensor]:
        """What save_adapter writes; the same as peft_tensors() unless the variant drops state at save
        time (e.g. ranks pruned away during training, left out as PEFT does)."""
        return self.peft_tensors()

    @torch.no_grad()
    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy already-validated tensors (same keys and shapes as peft_tensors()) into this delta."""
        for key, param in self.peft_tensors().items():
            param.copy_(tensors[key])

    # --- the low-rank protocol: what fused, stacked, hot-swap, combine and truncate paths ask --------
    factors_writable: ClassVar[bool] = False
    """True when `set_low_rank_factors` can store any s·B·A up to this delta's rank (this delta is then a
    plain low-rank product whose `low_rank_factors` never returns None)."""

    def low_rank_factors(self) -> Optional[tuple[torch.Tensor, torch.Tensor, float]]:
        """(B [out, r], A [r, in·k], s) with canonical ΔW_c = s·B·A (flattened to [out, in·k]), when ΔW
        is exactly that product; None otherwise. Detached: lets analysis take ΔW's SVD from the factors."""
        return None

    def linear_factors(self) -> Optional[LinearFactors]:
        """(A [r, in], B [out, r], s, p): this delta's own live Parameters (gradients reach them), when its
        forward on a linear layer is exactly y + s·(drop_p(x)·Aᵀ)·Bᵀ, drop_p being nn.Dropout(p) in training
        (p = 0: no dropout); None otherwise (another form, another layer kind). Called on every forward of
        the fused and mixed-batch paths: keep it cheap (no new Parameters, no nn.Module.__getattr__). The answer
        may change only in the ways STATE_EPOCH counts (assignment to the delta, conversion) or by in-place
        writes to A and B through the parameters (their version counters and storage; fused optimizer steps
        are made to move the counters too): the mixed-batch stacks rely on it."""
        return None

    def scaled_linear_factors(self, w: torch.Tensor, row_norm=None) -> Optional[tuple[LinearFactors, nn.Parameter,
                                                                                  torch.Tensor]]:
        """((A, B, s, p), m [out], norm [out]) when this delta's forward on a linear layer is an output-scaled
        low-rank term, y' = (m / norm) ⊙ (y − b + s·(drop_p(x)·Aᵀ)·Bᵀ) + b with norm not differentiated (a
        magnitude over a row norm, as in weight-decomposed adapters); None otherwise. `w` is the base weight
        [out, in] as the caller holds it (the norm is computed from it, never from another dequantised copy);
        m is the delta's live Parameter, norm a detached float32 tensor. Asked by the fused linear, which may offer
        `row_norm(w, A, B, s)`: ‖W + s·B·A‖ per row (float32 [out]) by its own kernel, or None where it has none;
        a delta whose norm is that row norm may use it instead of computing its own."""
        return None

    @torch.no_grad()
    def set_low_rank_factors(self, b: torch.Tensor, a: torch.Tensor) -> None:
        """Make ΔW_c = s·b·a with this delta's own scale s (that of `low_rank_factors`): b [out, k],
        a [k, in·k], k ≤ the delta's rank (the rest is zero-padded). Writes in place (copy_): parameter
        identity, shape, dtype and device never change. Only deltas with `factors_writable` implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot hold arbitrary low-rank factors")

    def regularizer(self) -> Optional[torch.Tensor]:
        """An extra training loss term for this delta (e.g. an orthogonality regulariser), or None."""
        return None

    def on_attach(self, layer: "AdaptedLayer") -> None:
        """Called once when a freshly initialised delta joins its layer (data-dependent inits use it)."""
