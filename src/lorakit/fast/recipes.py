"""Small hand-offs between fast paths, kept off the reference path.

- Norm recipe: an RMSNorm fast path tags its output n = x·rstd·w with (x, rstd, w). A fused linear that
  reads n then saves x and rstd (which the norm saves anyway) instead of n, so q/k/v and gate/up keep
  no copy of their input at all. Tags are plain Python attributes on the output tensor, checked by
  identity and version counter; under torch.compile no tags are made (the input is then saved as is).
- Wide outputs: the norm's output may be the first columns of a wider buffer, and the recipe carries that buffer
  and the norm's request holder, so the fused linears can put their rank-r term beside it (fast/wide.py).
- Precomputed outputs: a module whose children read one input (attention's q/k/v) computes them in one
  fused call and parks each child's output on the child until the child is called with that input.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

_NORM_ATTR = "_lorakit_norm"
_PRE_ATTR = "_lorakit_precomputed"


class NormRecipe(NamedTuple):
    """How a norm made its output: enough for a fused linear to recompute it from x and rstd."""

    x: torch.Tensor  # the norm's input [..., d] (saved by the norm itself)
    rstd: torch.Tensor  # 1/rms per row, float32 [...]
    weight: torch.Tensor  # the norm's weight [d]; the effective scale is weight + offset
    offset: float  # 0 (Llama), 1 (Gemma: x·rstd·(1 + w))
    version: int  # the output's version counter when tagged: an in-place change voids the recipe
    wide: Optional[torch.Tensor] = None  # [N, d + E]: the output's rows with E spare columns behind (fast/wide.py)
    want: Optional[list] = None  # [E, used]: spare columns the norm gives (readers raise E and set used)


def compiling() -> bool:
    return torch.compiler.is_compiling()


def tag_norm_output(out: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                    offset: float, wide: Optional[torch.Tensor] = None, want: Optional[list] = None) -> None:
    """Tag a norm's output `out` = x·rstd·(weight + offset) with what a following fused linear needs; `wide`
    is the buffer whose first columns `out` is, `want` the norm's holder of spare columns to give."""
    if not compiling() and not out.is_inference():  # an inference tensor has no version (and no backward)
        setattr(out, _NORM_ATTR, NormRecipe(x, rstd, weight, offset, out._version, wide, want))


def norm_recipe(t: torch.Tensor) -> Optional[NormRecipe]:
    """The NormRecipe tagged on `t`, or None when untagged or changed in place since."""
    if compiling():
        return None
    recipe = t.__dict__.get(_NORM_ATTR) if hasattr(t, "__dict__") else None
    if recipe is None or recipe.version != t._version:
        return None
    return recipe


def park(layers, x: torch.Tensor, outs) -> None:
    """Leave each layer's precomputed output on it, for its next call with input `x`."""
    for layer, out in zip(layers, outs):
        layer.__dict__[_PRE_ATTR] = (x, out)


def take_precomputed(layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The output parked on `layer` for input `x` (removed as it is taken), or None."""
    entry = layer.__dict__.get(_PRE_ATTR)
    if entry is None or entry[0] is not x:
        return None
    del layer.__dict__[_PRE_ATTR]
    return entry[1]


def unpark(layers) -> bool:
    """Drop what was not taken; True when every parked output was used."""
    all_taken = True
    for layer in layers:
        if layer.__dict__.pop(_PRE_ATTR, None) is not None:
            all_taken = False
    return all_taken
