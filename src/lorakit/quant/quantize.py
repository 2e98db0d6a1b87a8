"""The public QLoRA API: quantize a model's linear layers to NF4, dequantize back, merge into 4 bits on request.

    lorakit.quantize(model)                        # every nn.Linear but the output head / classifier → NF4Linear
    lorakit.add_adapter(model, LoraConfig(...))    # any variant trains on top, unchanged
    ...train, lorakit.save_adapter(model, dir)...  # PEFT layout, as for any model
    lorakit.dequantize(model); lorakit.unload(model, merge=True)   # → dense model in its own dtype, adapter merged
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from ..core.adapted import AdaptedLayer, weight_source_for
from ..errors import ConfigError, TargetError
from ..core.layers import ops_for
from ..core.api import adapted_layers, adapter_names, require_adapters, state, unload
from ..core.targeting import SEQ_CLS_HEAD_NAMES, candidate_modules
from .bnb import is_bnb_linear4bit
from .linear import NF4Linear
from .nf4 import DEFAULT_BLOCK_SIZE, check_block_size
from .weight import QuantizedWeight, Requantization

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- choosing layers ----------------------------------------------------------------------------------------
def _heads(model: nn.Module) -> set[int]:
    """ids of the output head and of sequence-classification heads: they stay in their dtype unless asked."""
    get_out = getattr(model, "get_output_embeddings", None)
    heads = [get_out() if callable(get_out) else None, getattr(model, "lm_head", None)]
    heads += [getattr(model, n, None) for n in SEQ_CLS_HEAD_NAMES]
    return {id(h) for h in heads if isinstance(h, nn.Module)}


def _named(name: str, patterns: Iterable[str]) -> bool:
    """A pattern names a module or any module under it: it equals a run of whole dotted components."""
    dotted = f".{name}."
    return any(f".{p.strip('.')}." in dotted for p in patterns)


def _to_quantize(model: nn.Module, skip: Iterable[str], targets: Optional[Iterable[str]]) -> list[str]:
    heads, skip = _heads(model), list(skip or [])
    chosen = []
    for name, module in candidate_modules(model):  # an adapted layer counts as its base
        if type(module) is not nn.Linear or _named(name, skip):
            continue
        wanted = _named(name, targets) if targets is not None else id(module) not in heads
        if wanted:
            chosen.append(name)
    return chosen


def _check_options(bits, quant_type, block_size, compute_dtype) -> None:
    if bits != 4:
        raise ConfigError(f"lorakit quantizes to 4 bits (NF4) only, got bits={bits!r}")
    if quant_type != "nf4":
        raise ConfigError(f"lorakit's 4-bit format is NF4, got quant_type={quant_type!r}")
    check_block_size(block_size)
    if compute_dtype not in FLOAT_DTYPES:
        raise ConfigError(f"compute_dtype must be one of {FLOAT_DTYPES}, got {compute_dtype!r}")


# --- swapping a base layer (bare, or inside an adapted layer) ------------------------------------------------
def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` where the base layer at `path` is; an adapted layer keeps its deltas and gets new ops/source."""
    current = model.get_submodule(path)
    if isinstance(current, AdaptedLayer):
        current.base_layer = new
        current.weight_source = weight_source_for(new)
        current.ops = ops_for(new)
        for delta in current.deltas.values():
            delta.ops = current.ops  # every delta reaches its base layer through .ops (delta.py)
        return
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _base(model: nn.Module, path: str) -> nn.Module:
    m = model.get_submodule(path)
    return m.base_layer if isinstance(m, AdaptedLayer) else m


def _check_not_merged(model: nn.Module, paths: list[str], doing: str) -> None:
    for path in paths:
        m = model.get_submodule(path)
        if isinstance(m, AdaptedLayer) and m.merged:
            raise ConfigError(f"{path} has merged adapters {m.merged}; lorakit.unmerge(model) before you {doing}")


# --- the API ---------------------------------------------------------------------------------------------------
def quantize(model: nn.Module, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
             block_size: int = DEFAULT_BLOCK_SIZE, compute_dtype: torch.dtype = torch.bfloat16,
             skip: Optional[Iterable[str]] = None, targets: Optional[Iterable[str]] = None, device=None) -> nn.Module:
    """Replace linear layers by NF4Linear (in place; returns the same model).

    By default every nn.Linear except the output head and a classifier/score head; `skip` leaves named modules
    (or whole subtrees, e.g. "vision_tower") dense; `targets` picks modules by name instead (a head included,
    if named). Embeddings and norms are never touched. `device`: where to quantize and keep the NF4 layers
    (e.g. "cuda" for a model loaded on the CPU: the dense weights never need to be on the GPU all at once).
    Works before or after add_adapter (after: the adapters stay and now sit on the 4-bit base)."""
    _check_options(bits, quant_type, block_size, compute_dtype)
    names = _to_quantize(model, skip, targets)
    if not names:
        raise TargetError("no nn.Linear to quantize (heads are kept unless named in targets; transformers' Conv1D "
                          "is not supported)")
    _check_not_merged(model, names, "quantize")
    if device is not None and state(model).configs:
        raise ConfigError("quantize(device=...) moves layers; on a model with adapters, move the model instead")
    for name in names:
        layer = _base(model, name)
        if layer.weight.is_meta:
            raise ConfigError(f"{name}.weight is on the meta device: load or initialise it before quantizing")
        _set_module(model, name, NF4Linear.from_linear(layer, block_size, double_quant, compute_dtype, device))
        del layer
    return model


def _quantized_bases(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in candidate_modules(model) if isinstance(m, NF4Linear) or is_bnb_linear4bit(m)]


@torch.no_grad()
def dequantize(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every NF4Linear and bitsandbytes Linear4bit by an nn.Linear holding the dequantized weight, in
    `dtype` (default: the dtype of the rest of the model, so that the layers fit in). Where that is the compute
    dtype (a bf16 model quantized with compute bf16: the usual QLoRA set-up) the model computes exactly the same
    function, since the dense weight is the one the 4-bit layer multiplied by; adapters stay, and merge /
    unload(merge=True) then work as on any dense model."""
    layers = _quantized_bases(model)
    if not layers:
        raise TargetError("the model has no 4-bit layer to dequantize")
    dtype = dtype or _prevailing_dtype(model)
    for name, layer in layers:
        dense = weight_source_for(layer).get()
        out_dtype = dtype or getattr(layer, "compute_dtype", None) or dense.dtype
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=dense.device,
                           dtype=out_dtype)
        linear.weight.copy_(dense)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        linear.requires_grad_(False)
        _set_module(model, name, linear)
    return model


def _prevailing_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The float dtype holding most of the model's dense (not quantized, not adapter) parameters, if any."""
    sizes: dict[torch.dtype, int] = {}
    for name, p in model.named_parameters():
        if p.is_floating_point() and ".deltas." not in name and ".copies." not in name:
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get) if sizes else None


def merge_requantized(model: nn.Module, names=None) -> dict[str, Requantization]:
    """Merge the active (or named) adapters into 4-bit bases by requantizing, then remove every adapter (as
    unload(merge=True) does). Lossy: returns, per 4-bit layer, the rounding error against the adapter's own
    change, and warns with the worst layer. Prefer dequantize() + unload(merge=True) unless 4 bits are a must."""
    names = state(model).active if names is None else adapter_names(names)
    require_adapters(model, names)
    report = {}
    for path, layer in adapted_layers(model):
        source = layer.weight_source
        if not isinstance(source, QuantizedWeight) or not any(n in layer.deltas for n in names):
            continue
        before = source.get().float()
        source.allow_requantize = True
        try:
            layer.merge(names)
        finally:
            source.allow_requantize = False
        report[path] = _requantization(before, source.last_written, source.get().float())
        source.last_written = None
    if not report:
        raise TargetError(f"no adapter of {list(names)} sits on a 4-bit layer; use lorakit.unload(model, merge=True)")
    unload(model, merge=True)  # the dense layers merge exactly; 4-bit ones are merged already
    worst_path, worst = max(report.items(), key=lambda kv: kv[1].ratio)
    warnings.warn(f"lorakit: requantizing after the merge rounded away part of the adapter; worst layer {worst_path}: "
                  f"rounding error {worst.ratio:.2f}× the adapter's change ({100 * worst.rounding / worst.weight:.1f}% "
                  f"of the weight), {100 * worst.kept:.0f}% of the change kept", stacklevel=2)
    return report


def _requantization(before: torch.Tensor, target: torch.Tensor, after: torch.Tensor) -> Requantization:
    change = target - before
    adapter = change.norm().item()
    kept = ((after - before) * change).sum().item() / adapter**2 if adapter else 1.0
    return Requantization(adapter=adapter, rounding=(after - target).norm().item(), kept=kept, weight=target.norm().item())
