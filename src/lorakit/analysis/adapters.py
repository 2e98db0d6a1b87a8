"""The adapters to analyse, as {module path: (adapted layer, delta)}, whatever they come from:

- a model with the adapter attached (the Python API): base weights included;
- an adapter directory plus a base model (a local HF directory or an nn.Module): attached with
  lorakit.load_adapter, base weights read through `layer.base_weight()`;
- an adapter directory alone: its deltas on stand-in layers (skeleton.py), for the figures that need
  only ΔW (spectrum, φ between adapters, suggest-rank, truncate).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..core.adapted import AdaptedLayer
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..errors import AdapterFormatError, ConfigError
from ..core.files import PREFIX, adapter_state_dict, load_adapter, read_config, read_tensors
from ..core.api import adapted_layers, delete_adapter, get_config, list_adapters
from ..core.registry import delta_class
from ..loading.models import load_model, resolve_model
from . import skeleton
from .spectrum import Spectrum, spectrum_dense, spectrum_from_factors


@dataclass
class AdapterLayer:
    """One adapted layer of the adapter under analysis: its module path, the adapted layer and the delta."""

    path: str
    layer: AdaptedLayer
    delta: Delta

    @property
    def shape(self) -> tuple[int, int]:
        """(out, n): the canonical ΔW as a matrix, n = in·kernel."""
        ops = self.layer.ops
        return ops.out_features, ops.in_features * int(torch.Size(ops.kernel).numel())

    @torch.no_grad()
    def dense_delta(self) -> torch.Tensor:
        """ΔW [out, n] in fp32 through the Delta protocol (the fallback for variants without factors)."""
        ops = self.layer.ops
        return ops.from_layer_layout(self.delta.delta_weight(self.layer)).reshape(self.shape)

    @torch.no_grad()
    def base_weight(self) -> torch.Tensor:
        """W [out, n], canonical orientation (a quantized base is dequantized by its weight source)."""
        ops = self.layer.ops
        return ops.from_layer_layout(self.layer.base_weight()).reshape(self.shape)

    def spectrum(self, has_base: bool) -> Spectrum:
        """ΔW's SVD: from the delta's low-rank factors when it has them, else from the dense ΔW."""
        factors = self.delta.low_rank_factors()
        if factors is not None:
            return spectrum_from_factors(*factors)
        dw = self.dense_delta()
        if not bool(torch.isfinite(dw).all()):
            if not has_base:  # the stand-in base weight is NaN: this ΔW depends on W
                raise ConfigError(f"ΔW of {self.path} ({type(self.delta).__name__}) depends on the base weights; "
                                  "pass the base model (--base) to analyse this adapter")
            raise AdapterFormatError(f"ΔW of {self.path} holds NaN or inf values")
        return spectrum_dense(dw)

    def nominal_rank(self, config: AdapterConfig) -> Optional[int]:
        """The rank the config gives this layer, for variants that have one."""
        try:
            return int(config.rank_for(self.path))
        except (NotImplementedError, AttributeError, TypeError, ValueError):
            return None


@dataclass
class AdapterView:
    """One adapter to analyse, whatever it came from (a directory, a model in memory): its config and layers."""

    label: str  # shown in tables and plots
    config: AdapterConfig
    layers: dict[str, AdapterLayer]  # in model order (layer 2 before layer 10)
    has_base: bool
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save, biases (PEFT keys)
    source: Optional[str] = None  # the directory, if it came from one
    base_name: Optional[str] = None  # base_model_name_or_path, written into truncated adapters
    attached_to: Optional[tuple[nn.Module, str]] = None  # (model, name) that `attached` added it to
    base_label: Optional[str] = None  # the base model, as shown in reports (None: no base weights)

    @property
    def peft_type(self) -> str:
        """The adapter's PEFT type (adapter_config.json's peft_type)."""
        return self.config.peft_type

    @property
    def variant(self) -> str:
        """The registry name of the adapter's variant."""
        return self.config.variant


def _sorted(layers: dict[str, AdapterLayer]) -> dict[str, AdapterLayer]:
    return {p: layers[p] for p in sorted(layers, key=skeleton.natural_key)}


def _delta_keys(layers: dict[str, AdapterLayer]) -> set[str]:
    return {f"{PREFIX}{p}.{suffix}" for p, entry in layers.items() for suffix in entry.delta.peft_tensors()}


def _refuse_parameter_targets(config: AdapterConfig, what: str) -> None:
    if config.parameter_targets:
        raise ConfigError(f"{what} adapts parameters (target_parameters {config.parameter_targets}); the analysis "
                          "reads one ΔW matrix per layer, and an expert stack's ΔW is one matrix per expert")


def from_model(model: nn.Module, name: str, label: Optional[str] = None) -> AdapterView:
    """Adapter `name` of a model it is attached to."""
    config = get_config(model, name)
    _refuse_parameter_targets(config, f"adapter {name!r}")
    layers = _sorted({p: AdapterLayer(p, layer, layer.deltas[name]) for p, layer in adapted_layers(model)
                      if name in layer.deltas})
    if any(name in layer.merged for _, layer in adapted_layers(model)):
        raise ConfigError(f"adapter {name!r} is merged into the base weights; unmerge it before analysing "
                          "(W would include ΔW)")
    keys = _delta_keys(layers)
    extra = {k: v.detach() for k, v in adapter_state_dict(model, name).items() if k not in keys}
    hf_config = getattr(model, "config", None)
    base_name = config.base_model_name_or_path or getattr(hf_config, "_name_or_path", None)
    return AdapterView(label or name, config, layers, True, extra, None, base_name or None,
                       base_label=f"{type(model).__name__} (its own weights)")


def attached(model: nn.Module, directory: Union[str, os.PathLike], label: Optional[str] = None) -> AdapterView:
    """Load an adapter directory into `model` (under a fresh name) with lorakit.load_adapter."""
    taken = set(list_adapters(model))
    name = next(f"analysis{i}" for i in range(len(taken) + 1) if f"analysis{i}" not in taken)
    load_adapter(model, directory, name=name)
    view = from_model(model, name, label or Path(directory).name)
    view.source = str(directory)
    view.extra_tensors = {k: v for k, v in read_tensors(directory).items() if k not in _delta_keys(view.layers)}
    view.base_name = read_config(directory).base_model_name_or_path
    view.attached_to = (model, name)
    return view


def detach(view: AdapterView) -> None:
    """Remove an adapter that `attached` put into a caller's model."""
    if view.attached_to is not None:
        delete_adapter(*view.attached_to)
        view.attached_to = None


def from_directory(directory: Union[str, os.PathLike], label: Optional[str] = None) -> AdapterView:
    """An adapter directory without its base model: each delta on a stand-in layer (see skeleton.py)."""
    config = read_config(directory)
    _refuse_parameter_targets(config, str(directory))
    per_path, rest = skeleton.group_tensors(read_tensors(directory), config)
    if not per_path:
        raise AdapterFormatError(f"{directory} holds no {config.variant} tensors")
    layers, cache = {}, {}
    for path, tensors in per_path.items():
        shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        kind, out, n, kernel = skeleton.infer_layer(config, path, shapes, cache)
        layer = skeleton.standin_layer(kind, out, n, kernel)
        delta = delta_class(config)(layer.ops, config, path).eval()
        for key, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise AdapterFormatError(f"{path}.{key} holds NaN or inf values")
        delta.load_peft_tensors(tensors)
        delta.requires_grad_(False)
        layer.deltas["analysed"] = delta
        layers[path] = AdapterLayer(path, layer, delta)
    return AdapterView(label or Path(directory).name, config, _sorted(layers), False, rest, str(directory),
                       config.base_model_name_or_path)


# --- base models -------------------------------------------------------------------------------------------
def infer_num_labels(tensors: dict[str, torch.Tensor]) -> int:
    """Classes of a sequence-classification adapter: the smallest output size among the saved weights of its
    heads (the modules PEFT adds for SEQ_CLS: `classifier`, `score`); 2 if none is saved."""
    sizes = [t.shape[0] for k, t in tensors.items() if t.dim() == 2 and k.endswith("weight")
             and any(part in ("classifier", "score") for part in k.split("."))]
    return min(sizes) if sizes else 2


def load_base_model(base: str, directory: Union[str, os.PathLike], num_labels: int = 0,
                    device: str = "cpu") -> nn.Module:
    """The base model an adapter directory was trained on, in the class its task_type implies (through
    lorakit.loading: a model directory, a .gguf file, the bundled model or a hub name).

    Args:
        base: the base model's name or path.
        directory: the adapter directory (its task_type picks the class; a SEQ_CLS head's size is read from
            its saved classifier unless `num_labels` is given).
        num_labels: classes of a sequence-classification base (0: from the adapter).
        device: where the model is put.
    """
    config = read_config(directory)
    path = resolve_model(base, log=lambda _: None)
    if config.task_type == "SEQ_CLS":
        labels = num_labels or infer_num_labels(read_tensors(directory))
        return load_model(path, "classify", labels, device).eval()
    task = "causal" if config.task_type == "CAUSAL_LM" else "any"  # any: a causal LM if it is one, else AutoModel
    return load_model(path, task, device=device).eval()
