"""LoKr: ΔW = kron(w1, w2) · alpha/r, with PEFT's factorisation rules so shapes match PEFT's.

out = a·b and in = c·d are split by `factorization` (decompose_factor, or near √dim); w1 [a, c] is
lokr_w1, or lokr_w1_a [a, r] · lokr_w1_b [r, c] when decompose_both and r < max(a, c)/2; w2 [b, d(, *k)]
is lokr_w2, or lokr_w2_a [b, r] · lokr_w2_b [r, d·k] when r < max(b, d)/2 (CP form lokr_t2 with
use_effective_conv2d). Linear, Conv1d and Conv2d, as in PEFT.

PEFT materialises the [out, in] Kronecker product on every forward. For Linear layers lorakit applies
it to the activations instead: with X = x viewed as [c, d] per token, kron(w1, w2)·vec(X) = vec(w1·X·w2ᵀ),
which costs a·d·(c + b) per token instead of a·b·c·d. `delta_weight` is the reference math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import BOOLEAN, Check, integer, one_of
from ..core.layers import LayerOps
from .lycoris import LycorisConfig, LycorisDelta, check_lycoris_layer, kaiming_
from ..core.registry import Variant


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr: ΔW = kron(w1, w2) · alpha/r. Field names and defaults as in PEFT."""

    peft_type: ClassVar[str] = "LOKR"
    unsupported_peft_fields: ClassVar[dict[str, Any]] = {}
    field_checks: ClassVar[dict[str, Check]] = {
        "decompose_both": BOOLEAN,
        "decompose_factor": one_of(-1) | integer(1),
        "rank_dropout_scale": BOOLEAN,
        "init_weights": BOOLEAN | one_of("lycoris"),
    }

    decompose_both: bool = False
    """Also factor the left Kronecker matrix w1 into lokr_w1_a · lokr_w1_b (when r is small enough)."""
    decompose_factor: int = -1
    """Split each dimension as (factor, dim/factor) when it divides; -1: the split nearest √dim."""
    rank_dropout_scale: bool = False
    """Rescale the rows kept by rank_dropout to mean 1."""
    init_weights: Union[bool, str] = True
    """True: w1 zero (a no-op at step 0); "lycoris": w2 zero instead; False: all random (for tests)."""


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (and LyCORIS') split of `dimension` into m·n with m ≤ n: (factor, dim/factor) if factor
    divides it, else the divisor pair with the smallest sum whose smaller part is at most `factor`."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrDelta(LycorisDelta):
    """LoKr on one layer: ΔW = kron(w1, w2)·alpha/r, with PEFT's factor shapes."""

    def __init__(self, ops: LayerOps, config: LoKrConfig, module_name: str):
        check_lycoris_layer(ops, "LoKr")
        super().__init__(ops, config, module_name)
        self.rank_dropout_scale = bool(config.rank_dropout_scale)
        r, k = self.r, ops.kernel
        c, d = factorization(ops.in_features, config.decompose_factor)
        a, b = factorization(ops.out_features, config.decompose_factor)
        self.a, self.b, self.c, self.d = a, b, c, d  # out = a·b, in = c·d
        use_w1 = not (config.decompose_both and r < max(a, c) / 2)
        use_w2 = not (r < max(b, d) / 2)
        self.cp = (not use_w2) and bool(config.use_effective_conv2d) and ops.kind == "conv" and math.prod(k) > 1
        factory = {"device": ops.device, "dtype": ops.dtype}

        def param(*shape):
            return nn.Parameter(torch.empty(*shape, **factory))

        if use_w1:
            self.lokr_w1 = param(a, c)
        else:
            self.lokr_w1_a, self.lokr_w1_b = param(a, r), param(r, c)
        if use_w2:
            self.lokr_w2 = param(b, d, *k)
        elif self.cp:  # Conv1d kernels get a trailing 1 as in PEFT
            self.lokr_t2 = param(r, r, *(k if len(k) == 2 else (k[0], 1)))
            self.lokr_w2_a, self.lokr_w2_b = param(r, b), param(r, d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = param(b, r), param(r, d * math.prod(k))
        self._init(config.init_weights)
        # Linear layers run on activations when that is cheaper (nearly always); conv uses PEFT's way.
        on_activations = min(a * d * (c + b), b * c * (d + a)) < a * b * c * d  # per-token multiply-adds
        self.path = "activations" if ops.kind == "linear" and on_activations else "weight"

    @torch.no_grad()
    def _init(self, init_weights) -> None:
        names = [n for n, _ in self.named_parameters(recurse=False)]
        kaiming_(*(getattr(self, n) for n in names))
        if init_weights is True:  # PEFT: the left factor starts at zero
            nn.init.zeros_(self.lokr_w1 if "lokr_w1" in names else self.lokr_w1_a)
        elif init_weights == "lycoris":  # LyCORIS: the right factor starts at zero
            nn.init.zeros_(self.lokr_w2 if "lokr_w2" in names else self.lokr_w2_b)

    def w1(self) -> torch.Tensor:
        """[a, c]."""
        return self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b

    def w2(self) -> torch.Tensor:
        """[b, d] for Linear; [b, d·k] or [b, d, *k] for convolutions (PEFT's layouts)."""
        if hasattr(self, "lokr_w2"):
            return self.lokr_w2
        if self.cp:  # PEFT's make_weight_cp → [b, d, kh, kw]
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
            # einsum may give a size-1 dim an odd stride, which torch.kron's internal view rejects
            # (PEFT crashes there for Conv1d); a fresh standard layout avoids it.
            return w2.clone(memory_format=torch.contiguous_format)
        return self.lokr_w2_a @ self.lokr_w2_b

    def weight_c(self) -> torch.Tensor:
        w1, w2 = self.w1(), self.w2()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # torch.kron and then a plain reshape, exactly as PEFT's make_kron (for a 3-d Conv1d w2 this is
        # PEFT's own element order, which lorakit keeps so that files mean the same in both).
        w = torch.kron(w1, w2.contiguous()) * self.scaling
        return w.reshape(self.ops.out_features, self.ops.in_features, *self.ops.kernel)

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer) -> torch.Tensor:
        if self.skipped():
            return y
        w1 = self.w1()
        drop = self.row_drop(y.device, w1.dtype)
        if self.path == "weight":
            return y + self.weight_forward(x, drop).to(y.dtype)
        out = self.kron_apply(x.to(w1.dtype), w1, self.w2() * self.scaling)
        out = out.reshape(*y.shape[:-1], self.a * self.b)
        if drop is not None:
            out = out * drop
        return y + out.to(y.dtype)

    def kron_apply(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """kron(w1, w2)·x per token as w1·X·w2ᵀ with X = x as [c, d]: two plain GEMMs over all tokens
        (the token axis is moved next to the free axis, so no batched small matmuls). → [N, a, b]."""
        a, b, c, d = self.a, self.b, self.c, self.d
        xs = x.reshape(-1, c, d)  # [N, c, d]
        n = xs.shape[0]
        if a * d * (c + b) <= b * c * (d + a):  # (w1·X)·w2ᵀ
            p = w1 @ xs.transpose(0, 1).reshape(c, n * d)  # [a, N·d]
            out = F.linear(p.view(a * n, d), w2).view(a, n, b)
        else:  # w1·(X·w2ᵀ)
            z = F.linear(xs.reshape(n * c, d), w2).view(n, c, b)
            out = (w1 @ z.transpose(0, 1).reshape(c, n * b)).view(a, n, b)
        return out.transpose(0, 1)  # [N, a, b]

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters(recurse=False)}

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.named_parameters(recurse=False))
        return f"r={self.r}, scaling={self.scaling:g}, path={self.path}, {shapes}"


VARIANT = Variant("LOKR", LoKrConfig, LoKrDelta)
