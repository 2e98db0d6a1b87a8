"""`--truncate k`: a smaller adapter keeping the top-k directions of each ΔW (Eckart–Young: the best rank-k fit
in Frobenius norm), written as a LoRA adapter in PEFT's layout.

The output is the registry's factored variant (LoRA, `core.registry.factored_variant`) whatever the input
variant: ΔW_k = U_k Σ_k V_kᵀ is a rank-k product, and LoRA is the format every tool reads. An input of that
variant keeps its scale settings (lora_alpha / use_rslora / alpha_pattern: the scale of each layer follows
the new rank as PEFT computes it); other variants get s = 1 (lora_alpha = k). Each layer gets rank
min(k, ΔW's numerical rank), so k ≥ r is lossless. The factors are balanced, written through
`Delta.set_low_rank_factors`:
    B = U_k · diag(sqrt(σ/s)),  A = diag(sqrt(σ/s)) · V_kᵀ,  s = the new layer's scale
modules_to_save and bias tensors are copied unchanged. The written adapter is read back and its error
‖ΔW − ΔW'‖_F / ‖ΔW‖_F measured against the original, next to the Eckart–Young prediction.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..core.config import AdapterConfig
from ..core.files import PREFIX, write_adapter_files
from ..core.registry import delta_class, factored_variant
from .adapters import AdapterView, from_directory
from .results import LayerAnalysis
from .spectrum import Spectrum


def truncated_config(view: AdapterView, k: int, ranks: dict[str, int]) -> AdapterConfig:
    """The output config: rank k, smaller ranks in rank_pattern; the input's own config when it is already
    of the factored variant, else its common fields (see the module docstring)."""
    smaller = {path: r for path, r in ranks.items() if r != k}
    variant, old = factored_variant(), view.config
    if old.variant == variant.name:
        return variant.factored_config(k, old, rank_pattern=smaller)
    return variant.factored_config(k, old, target_modules=sorted(ranks), rank_pattern=smaller,
                                   modules_to_save=old.modules_to_save, task_type=old.task_type,
                                   base_model_name_or_path=old.base_model_name_or_path, revision=old.revision)


@torch.no_grad()
def layer_tensors(view: AdapterView, layer: LayerAnalysis, config: AdapterConfig,
                  rank: int) -> dict[str, torch.Tensor]:
    """The layer's top-`rank` factors as the output delta's tensors {file key: tensor}, in the input's dtype
    (a delta of `config`'s rank larger than `rank` gets zero-padded factors).

    Args:
        view: the adapter the layer belongs to.
        layer: the layer's analysis (its path and ΔW's spectrum).
        config: the output adapter's config (a variant whose deltas hold arbitrary factors).
        rank: how many singular directions to keep."""
    entry = view.layers[layer.path]
    delta = delta_class(config)(entry.layer.ops, config, layer.path)
    assert delta.factors_writable, "truncated adapters hold a plain low-rank product"
    u, s, v = layer.spectrum.top(rank)
    scale = delta.low_rank_factors()[2]
    root = (s / abs(scale)).sqrt()  # [rank]
    b = u * root  # [out, rank]
    a = math.copysign(1.0, scale) * root[:, None] * v.t()  # [rank, n]
    delta.set_low_rank_factors(b, a)
    dtype = next(iter(entry.delta.peft_tensors().values())).dtype  # the original adapter's storage dtype
    return {f"{PREFIX}{layer.path}.{key}": t.detach().to("cpu", dtype).contiguous()
            for key, t in delta.peft_tensors().items()}


def write_truncated(view: AdapterView, layers: list[LayerAnalysis], k: int, directory: Path) -> Path:
    """Write the rank-k adapter to `directory` (as a whole: see core/atomic.py)."""
    ranks = {la.path: min(k, max(1, la.spectrum.rank)) for la in layers}
    config = truncated_config(view, k, ranks)
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in view.extra_tensors.items()}
    for la in layers:
        tensors.update(layer_tensors(view, la, config, ranks[la.path]))
    data = config.to_peft_dict()
    data["inference_mode"] = True
    data["base_model_name_or_path"] = view.base_name
    return write_adapter_files(directory, tensors, data)


def relative_distance(x: Spectrum, y: Spectrum) -> float:
    """‖X − Y‖_F / ‖X‖_F from the two SVDs, without forming X or Y:
    ⟨X, Y⟩ = Σ_ij (U_xᵀU_y)_ij · σx_i · σy_j · (V_xᵀV_y)_ij and ‖X − Y‖² = ‖X‖² + ‖Y‖² − 2⟨X, Y⟩."""
    inner = ((x.u.t() @ y.u) * (x.s[:, None] * y.s[None, :]) * (x.v.t() @ y.v)).sum()
    sq = x.fro_norm ** 2 + y.fro_norm ** 2 - 2 * float(inner)
    return math.sqrt(max(sq, 0.0)) / x.fro_norm if x.fro_norm > 0 else math.sqrt(max(sq, 0.0))


def truncate(view: AdapterView, layers: list[LayerAnalysis], k: int, directory: Path) -> Path:
    """Write the truncated adapter, read it back, and fill each layer's `truncation` figures."""
    directory = write_truncated(view, layers, k, directory)
    written = from_directory(directory)
    for la in layers:
        new = written.layers[la.path].spectrum(has_base=False)
        rank = len(new.s)
        la.truncation = {"k": rank, "expected_error": la.spectrum.truncation_error(rank),
                         "measured_error": relative_distance(la.spectrum, new),
                         "params_before": _numel(view, la.path), "params_after": _numel(written, la.path)}
    return directory


def _numel(view: AdapterView, path: str) -> int:
    return sum(t.numel() for t in view.layers[path].delta.peft_tensors().values())
