"""Which linears the fused path serves, asked per call: a layer's spec, or the reason it takes the reference path.

A spec is a plain tuple (cheap to build on every forward):
    (w, bias, terms, source, scaled)
    w       the dense base weight [out, in] (a live Parameter, or its transposed view for GPT-2's Conv1D); None
            when `source` is set
    bias    the base bias or None (trained or frozen: the fused backward gives its gradient)
    terms   [(A [r, in], B [out, r], s, p), ...] per active delta, p its dropout probability (0 outside training)
    source  a weight source that writes its dense weight into a buffer (a 4-bit base); None for a dense weight
    scaled  (m [out], norm [out]) of an output-scaled delta (Delta.scaled_linear_factors), else None
Everything is asked through the low-rank protocol (core/delta.py) and the weight-source accessor
(core/adapted.py): no variant is named here.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..core.adapted import AdaptedLayer, DenseWeight
from ..core.delta import Delta
from .scaled_kernels import row_norm
from .scratch import dense_from_source

Spec = tuple
FALLBACK_ATTR = "_lorakit_not_fused"  # the last reason a layer's fast path fell back at call time


def _delta_terms(layer: AdaptedLayer, d: dict, dtype, w, source) -> Union[tuple, str]:
    """(terms, scaled) of the layer's active deltas, or the reason they have no fused form. dtype None: any
    (under autocast everything is cast to one dtype)."""
    deltas = d["_modules"]["deltas"]._modules
    terms, scaled = [], None
    for name in d["active"]:
        delta = deltas.get(name)
        if delta is None:
            continue
        factors = delta.linear_factors()  # (A [r, in], B [out, r], s, dropout p), live Parameters
        if factors is None:
            if type(delta).scaled_linear_factors is Delta.scaled_linear_factors:  # the protocol's "no": skip W
                return f"adapter '{name}' ({type(delta).__name__}) has no fused form in this mode"
            full = w if w is not None else dense_from_source(source, d["_modules"]["base_layer"].weight.device)
            with torch.no_grad():
                got = delta.scaled_linear_factors(full, row_norm)  # the norm by one kernel where it runs
            if got is None:
                return f"adapter '{name}' ({type(delta).__name__}) has no fused form in this mode"
            factors, m, norm = got
            if dtype is not None and m.dtype != dtype:
                return f"adapter '{name}' magnitude is {m.dtype}, the base weight {dtype} (fused under autocast)"
            scaled = (m, norm)
        a, b, s, p = factors
        if dtype is not None and (a.dtype != dtype or b.dtype != dtype):
            return f"adapter '{name}' is {a.dtype}, the base weight {dtype} (fused under autocast)"
        terms.append((a, b, s, p if delta.__dict__["training"] else 0.0))
    if scaled is not None and len(terms) > 1:
        return "an output-scaled adapter (magnitude) is active together with other adapters"
    return terms, scaled


def spec_or_reason(layer: nn.Module, autocast: bool = False) -> Union[Spec, str]:
    """The layer's spec (module docstring), or a one-line reason why it takes the reference path. autocast:
    the call runs under autocast, which casts weights and factors to one dtype (their own dtypes may differ)."""
    d = layer.__dict__
    if type(layer) is nn.Linear:
        p = d["_parameters"]
        w = p["weight"]
        return (w, p["bias"], (), None, None) if not w.requires_grad else "the base weight is trained"
    if not isinstance(layer, AdaptedLayer):
        return f"{type(layer).__name__} is not a linear or adapted linear layer"
    if d["ops"].kind != "linear":
        return f"not a linear layer ({d['ops'].kind})"
    if d["disabled"]:
        return "adapters disabled"
    if d["merged"]:
        return "adapters merged into the base weight"
    if d.get("routing") is not None:
        return "routed per row (a mixed-adapter batch)"
    base_p = d["_modules"]["base_layer"]._parameters
    src = d["weight_source"]
    if type(src) is DenseWeight:
        w, source = base_p["weight"], None
        if w.requires_grad:  # a trained base weight needs dW: the reference path computes it
            return "the base weight is trained"
        w = w.t() if d["ops"].transposed else w
        dtype = w.dtype
    elif getattr(src, "write_dense", None) is not None:
        w, source, dtype = None, src, src.dense_dtype
    else:
        return f"its weight source ({type(src).__name__}) cannot dequantise into a buffer"
    got = _delta_terms(layer, d, None if autocast else dtype, w, source)
    if type(got) is str:
        return got
    return w, base_p.get("bias"), got[0], source, got[1]


def check_input(x: torch.Tensor, spec, cast) -> Optional[str]:
    """Why x cannot go through the fused call with this layer's spec, or None."""
    w, _, terms, source, _ = spec
    dtype, in_features = (w.dtype, w.shape[1]) if w is not None else (source.dense_dtype, source.dense_shape[1])
    if x.shape[-1] != in_features:
        return f"input width {x.shape[-1]}, the layer's {in_features}"
    if cast is None and x.dtype != dtype:
        return f"input is {x.dtype}, the base weight {dtype}"
    if cast is not None and source is not None and dtype != cast:
        return f"autocast to {cast} over a 4-bit base computing in {dtype}"
    device = w.device if w is not None else (terms[0][0].device if terms else x.device)
    if x.device != device:
        return f"input on {x.device}, the layer on {device}"
    return None


def layer_spec(layer: nn.Module):
    """The layer's spec, or None when it takes the reference path (spec_or_reason gives the reason)."""
    got = spec_or_reason(layer)
    return None if type(got) is str else got


def note_fallback(layer: nn.Module, reason: str) -> None:
    """Remember why the fast path of `layer` fell back at its last call (fusion_report reads it)."""
    layer.__dict__[FALLBACK_ATTR] = reason
