"""What vLLM's and SGLang's LoRA loaders accept, checked against an adapter directory, and the conversion of
what they refuse (`lorakit export ADAPTER --for vllm|sglang --output DIR`, `lorakit info`).

The rules, from the engines' source:

vLLM (vllm/lora/peft_helper.py, PEFTHelper._validate_features and validate_legal; vllm/lora/utils.py
parse_fine_tuned_lora_name; vllm/config/lora.py LoRAConfig.max_lora_rank):
  - "vLLM does not yet support DoRA.": use_dora must be false (and no lora_magnitude_vector tensors);
  - "vLLM only supports modules_to_save being None.";
  - "LoRA rank {r} is greater than max_lora_rank {max}.": max(r, rank_pattern values) ≤ --max-lora-rank,
    whose default is 16;
  - "Adapter bias is not supported.": bias must be "none";
  - tensor keys are PEFT's lora_A / lora_B (parse_fine_tuned_lora_name splits `<module>.lora_A.weight`), and the
    scale is lora_alpha / r (or / sqrt(r) with use_rslora) for the whole adapter: older releases ignore
    rank_pattern / alpha_pattern, so the converted adapter has one rank and no patterns.
SGLang (python/sglang/srt/lora/utils.py get_normalized_target_modules; lora_config.py LoRAConfig):
  - "Only 'all' or 'all-linear' can be used as the string for target module": target_modules is a list of
    module names (normalised by their last component: q_proj/k_proj/v_proj → qkv_proj, gate_proj/up_proj →
    gate_up_proj) or exactly "all" / "all-linear"; a regex string is refused;
  - LoRAConfig reads use_dora, and the loader holds only lora_A / lora_B weights: DoRA is not served;
  - --max-lora-rank, when the server is given one, bounds r (default: the largest rank among loaded adapters).

Conversion keeps the adapter's own tensors where they pass (only adapter_config.json changes: leaf-name
target_modules, no patterns). Otherwise each layer's ΔW is refitted as a plain LoRA by SVD (analysis/truncate:
the Eckart–Young best rank-k fit; DoRA's ΔW is read with its base model, since it depends on W) and the
relative error ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F of every layer is reported. modules_to_save (whole trained copies of
layers) and bias tensors have no LoRA form: they are refused with what to do, or dropped on request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..analysis.adapters import AdapterView, attached, from_directory, load_base_model
from ..analysis.results import LayerAnalysis
from ..analysis.truncate import layer_tensors, relative_distance
from ..core.files import PREFIX, read_config, read_tensors
from ..core.registry import config_from_peft_dict, factored_variant
from ..core.writing import write_adapter_files
from ..errors import ConfigError
from .merged import base_model_name

ENGINES = ("vllm", "sglang")
DEFAULT_MAX_RANK = {"vllm": 16, "sglang": 0}  # vLLM's --max-lora-rank default; SGLang: none (0)
SGLANG_TARGET_STRINGS = ("all", "all-linear")


def _ranks(config: dict) -> list[int]:
    """r and every rank_pattern rank (AdaLoRA writes a kept-rank mask per module: its count of kept ranks)."""
    patterns = (config.get("rank_pattern") or {}).values()
    return [int(config.get("r") or 0), *(sum(map(bool, v)) if isinstance(v, list) else int(v) for v in patterns)]


def engine_problems(config: dict, engine: str, max_rank: int = 0) -> list[str]:
    """Why `engine` would refuse an adapter (its adapter_config.json as a dict); [] if it loads.

    Args:
        config: the adapter_config.json contents.
        engine: "vllm" or "sglang".
        max_rank: the engine's --max-lora-rank (0: its default).
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; lorakit checks {list(ENGINES)}")
    problems = []
    try:
        variant = config_from_peft_dict(config).variant
    except ConfigError as e:
        variant = f"an adapter lorakit cannot read ({e})"
    if variant != factored_variant().name:  # a peft_type other than LoRA, or LoRA's DoRA form
        problems.append(f"{variant} is not served: only plain LoRA (lora_A / lora_B) is")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} must be empty")
    limit = max_rank or DEFAULT_MAX_RANK[engine]
    if limit and max(_ranks(config)) > limit:
        problems.append(f"rank {max(_ranks(config))} is above --max-lora-rank {limit}")
    targets = config.get("target_modules")
    if engine == "vllm":
        if (config.get("bias") or "none") != "none":
            problems.append(f"bias {config.get('bias')!r}: adapter bias is not supported")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            problems.append("rank_pattern / alpha_pattern: one scale per adapter (lora_alpha / r) in older releases")
    elif isinstance(targets, str) and targets not in SGLANG_TARGET_STRINGS:
        problems.append(f"target_modules {targets!r}: a string must be 'all' or 'all-linear'")
    return problems


def engine_support(directory: Path) -> dict[str, list[str]]:
    """{engine: reasons it refuses the directory ([] = loads as it is, with the engine's default limits)}."""
    config = json.loads((directory / "adapter_config.json").read_text())
    return {engine: engine_problems(config, engine) for engine in ENGINES}


@dataclass
class EngineReport:
    """What `lorakit export --for ENGINE` did."""

    engine: str
    output: Path
    rank: int
    refitted: bool
    changes: list[str] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)  # layer → relative error of the refit

    def describe(self) -> str:
        """The printed report: what changed, the refit errors, and the engine's flags."""
        lines = [f"converted for {self.engine}: {self.output} (plain LoRA, rank {self.rank})"]
        lines += [f"  - {c}" for c in self.changes] or ["  - nothing to change: the tensors are copied as they are"]
        if self.errors:
            worst = max(self.errors, key=self.errors.get)
            mean = sum(self.errors.values()) / len(self.errors)
            lines.append(f"  refit error ‖ΔW − ΔW'‖/‖ΔW‖ over {len(self.errors)} layers: mean {mean:.2e}, "
                         f"worst {self.errors[worst]:.2e} ({worst})")
        if self.engine == "vllm":
            lines.append(f"  serve with: vllm serve BASE --enable-lora --max-lora-rank {max(self.rank, 8)} "
                         f"--lora-modules name={self.output}")
        else:
            lines.append(f"  serve with: python -m sglang.launch_server --model-path BASE --lora-paths "
                         f"name={self.output} --max-lora-rank {self.rank}")
        return "\n".join(lines)


def _leaf_names(paths) -> list[str]:
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def _output_config(view: AdapterView, raw: dict, rank: int, refit: bool, paths) -> dict:
    """adapter_config.json of the converted adapter: leaf-name targets, no patterns, nothing saved whole."""
    common = dict(target_modules=_leaf_names(paths), modules_to_save=None, task_type=view.config.task_type,
                  base_model_name_or_path=raw.get("base_model_name_or_path"))
    variant = factored_variant()
    if refit:
        config = variant.factored_config(rank, None, **common).to_peft_dict()
    else:
        config = dict(raw, **common, rank_pattern={}, alpha_pattern={})
    config["inference_mode"] = True
    return config


def _refit_view(adapter: Path, view: AdapterView, model: Optional[str], log) -> AdapterView:
    """The adapter's layers with ΔW readable: `view` (the adapter alone) where every ΔW is its own factors, the
    adapter attached to its base model otherwise."""
    if all(entry.delta.low_rank_factors() is not None for entry in view.layers.values()):
        return view
    base = base_model_name(adapter, model)
    log(f"{view.variant}: ΔW depends on the base weights; loading {base} to read it")
    return attached(load_base_model(base, adapter), adapter)


def convert_for_engine(adapter: Path, engine: str, output: Path, max_rank: int = 0,
                       drop_modules_to_save: bool = False, model: Optional[str] = None,
                       log: Callable[[str], None] = print) -> EngineReport:
    """Write a copy of `adapter` at `output` that `engine` loads (see the module docstring); returns the report.

    Args:
        adapter: the adapter directory.
        engine: "vllm" or "sglang".
        output: the directory to write (replaced whole if it holds an adapter).
        max_rank: the engine's --max-lora-rank (0: its default; SGLang has none).
        drop_modules_to_save: leave modules_to_save copies out instead of refusing.
        model: the base model, needed only for adapters whose ΔW depends on W (DoRA).
        log: progress lines.
    """
    raw = json.loads((adapter / "adapter_config.json").read_text())
    config = read_config(adapter)
    view = from_directory(adapter)
    changes = _unservable_parts(adapter, raw, config.modules_to_save, view, engine, drop_modules_to_save)
    rank, refit = _plan(raw, config.variant, engine, max_rank, changes)
    report = EngineReport(engine, output, rank, refit, changes)
    if refit:
        view = _refit_view(adapter, view, model, log)
        out_tensors = _refit_tensors(view, rank, report)
    else:
        out_tensors = {k: t for k, t in read_tensors(adapter).items() if k not in view.extra_tensors}
    data = _output_config(view, raw, rank, refit, view.layers)
    if data.get("target_modules") != raw.get("target_modules"):
        before = raw.get("target_modules")
        shown = before if not isinstance(before, list) or len(before) <= 4 else f"{len(before)} module paths"
        changes.append(f"target_modules {shown} → leaf names {data['target_modules']}")
    problems = engine_problems(data, engine, max_rank)
    if problems:  # a converter bug, never a user error: nothing is written
        raise ConfigError(f"the converted adapter would still be refused by {engine}: {'; '.join(problems)}")
    write_adapter_files(output, out_tensors, data)
    return report


def _unservable_parts(adapter: Path, raw: dict, modules_to_save, view: AdapterView, engine: str,
                      drop: bool) -> list[str]:
    """Refuse bias tensors, and modules_to_save unless `drop` (then say so); returns the changes so far."""
    source = adapter / "adapter_config.json"
    if (raw.get("bias") or "none") != "none":
        raise ConfigError(f"{source}: field bias is {raw['bias']!r}; trained bias tensors have no LoRA form and "
                          f"{engine} refuses them: merge the adapter instead (lorakit merge / --format gguf)")
    if not (modules_to_save or view.extra_tensors):
        return []
    what = modules_to_save or sorted({k[len(PREFIX):].rsplit(".", 1)[0] for k in view.extra_tensors})
    if not drop:
        raise ConfigError(f"{source}: field modules_to_save {what} holds whole trained copies of layers, which "
                          f"{engine} refuses and LoRA cannot express. Merge instead (lorakit merge / lorakit export "
                          "--format gguf), or pass --drop-modules-to-save to serve the adapter without them "
                          "(those layers then stay as in the base model)")
    return [f"modules_to_save {what} dropped: those layers stay as in the base model"]


def _plan(raw: dict, variant: str, engine: str, max_rank: int, changes: list[str]) -> tuple[int, bool]:
    """(the output rank, whether the layers are refitted), the reason appended to `changes`."""
    limit = max_rank or DEFAULT_MAX_RANK[engine]
    top = max(_ranks(raw))
    rank = min(top, limit) if limit else top
    plain = variant == factored_variant().name
    refit = not plain or top > rank or bool(raw.get("rank_pattern") or raw.get("alpha_pattern"))
    if not plain:
        changes.append(f"{variant} refitted as a plain LoRA of rank {rank} by SVD of each layer's ΔW")
    elif top > rank:
        changes.append(f"rank {top} truncated to {rank} (--max-lora-rank) by SVD: the best rank-{rank} fit")
    elif refit:
        changes.append(f"rank_pattern / alpha_pattern folded into one rank {rank}, scale 1 (lora_alpha = r)")
    return rank, refit


def _refit_tensors(view: AdapterView, rank: int, report: EngineReport) -> dict:
    """Each layer's best rank-`rank` LoRA factors (PEFT keys), its relative error recorded in the report."""
    variant = factored_variant()
    config = variant.factored_config(rank, None, target_modules=_leaf_names(view.layers))
    tensors = {}
    for path, entry in view.layers.items():
        spectrum = entry.spectrum(view.has_base)
        la = LayerAnalysis(path, entry.shape, None, spectrum)
        new = layer_tensors(view, la, config, rank)
        tensors.update(new)
        fitted = _spectrum_of(new, config, entry, path)
        report.errors[path] = relative_distance(spectrum, fitted)
    return tensors


def _spectrum_of(tensors: dict, config, entry, path: str):
    """ΔW's spectrum of freshly written factors (read back through the protocol, as a loader would)."""
    from ..core.registry import delta_class
    from ..analysis.spectrum import spectrum_from_factors

    delta = delta_class(config)(entry.layer.ops, config, path)
    delta.load_peft_tensors({k[len(PREFIX) + len(path) + 1:]: t for k, t in tensors.items()})
    b, a, s = delta.low_rank_factors()
    return spectrum_from_factors(b, a, s)
