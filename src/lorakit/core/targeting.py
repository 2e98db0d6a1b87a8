"""Which modules and parameters a config adapts: PEFT's matching rules, with helpful errors when nothing matches."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterator, Optional

from torch import nn

from ..errors import ConfigError, TargetError
from .adapted import AdaptedLayer
from .config import AdapterConfig, layers_pattern_regex
from .default_targets import PEFT_MOE_CONVERTED_TYPES
from .layers import LayerOps, ParameterOps, is_linear, ops_for
from .saved import SavedModule

SEQ_CLS_HEAD_NAMES = ("classifier", "score")


def _matches_names(names, key: str) -> bool:
    """PEFT's rule: a string is a regex fullmatch; a list matches the full name or a `.`-suffix."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{n}") for n in names)


def _layer_index_ok(config: AdapterConfig, key: str) -> bool:
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)  # the first numbered segment
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(layers_pattern_regex(pattern), key)
            if match:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def _in_modules_to_save(config: AdapterConfig, key: str) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in config.modules_to_save or [])


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module, lorakit's own internals skipped; an adapted layer counts as its base."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, AdaptedLayer):
            skip.append(f"{name}.")
            while isinstance(module, AdaptedLayer):  # wrappers of several parameters of one module nest
                module = module.base_layer
            yield name, module
        elif isinstance(module, SavedModule):
            skip.append(f"{name}.")
        elif name:
            yield name, module


def expand_all_linear(model: nn.Module, config: AdapterConfig) -> list[str]:
    """PEFT's "all-linear": every Linear/Conv1D except the output head (and the classifier for SEQ_CLS)."""
    excluded = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None and config.task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)), None)
    if head is None and not callable(get_out):
        head = getattr(model, "lm_head", None)  # plain modules: the usual name of an output head
    for name, module in model.named_modules():
        if head is not None and (module is head or getattr(module, "base_layer", None) is head):
            excluded.add(name)
    return sorted(name for name, m in candidate_modules(model) if is_linear(m) and name not in excluded)


def resolve_targets(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
    """`config`, or when its target_modules is None a copy with PEFT's defaults for the model's type
    (`model.config.model_type`, e.g. q_proj and v_proj for Llama). Next to target_parameters, none where PEFT has no
    default or converts the model type's config for fused experts (PEFT_MOE_CONVERTED_TYPES). ConfigError when
    there is no default and no target_parameters."""
    if config.target_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults = type(config).default_target_modules.get(model_type) if isinstance(model_type, str) else None
    if config.parameter_targets and (defaults is None or model_type in PEFT_MOE_CONVERTED_TYPES):
        return config.with_updates(target_modules=[])  # parameters only, as PEFT does here
    if defaults is None:
        of = f"model type {model_type!r}" if model_type else f"a {type(model).__name__} (no config.model_type)"
        raise ConfigError(f"{type(config).__name__} field 'target_modules' is not set and PEFT has no default for "
                          f"{of}: give the module names, a regex, or 'all-linear'")
    return config.with_updates(target_modules=list(defaults) if isinstance(defaults, list) else defaults)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules this config adapts. Raises TargetError if none, or if one cannot be adapted."""
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = expand_all_linear(model, config)
    found, unsupported = [], []
    for name, module in candidate_modules(model):
        if config.exclude_modules and _matches_names(config.exclude_modules, name):
            continue
        if _in_modules_to_save(config, name):
            continue
        if not _matches_names(targets, name) or not _layer_index_ok(config, name):
            continue
        try:
            supported = ops_for(module) is not None
        except TargetError as e:
            raise TargetError(f"cannot adapt {name}: {e}") from None
        (found if supported else unsupported).append(name)
    if unsupported:
        kinds = sorted({type(dict(candidate_modules(model))[n]).__name__ for n in unsupported})
        raise TargetError(
            f"target_modules match modules lorakit cannot adapt ({', '.join(kinds)}): {unsupported[:5]}; "
            "supported are Linear, Embedding, Conv1d/2d/3d and transformers' Conv1D"
        )
    if not found and config.parameter_targets and not config.target_modules:
        return found  # parameters only
    if not found:
        raise TargetError(f"target_modules {config.target_modules!r} match no module of {type(model).__name__}; "
                          f"{_closest_names(model, config.target_modules)}")
    return found


def _closest_names(model: nn.Module, targets) -> str:
    names = [n for n, m in candidate_modules(model) if ops_for_safe(m)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    close = sorted({c for w in wanted for c in difflib.get_close_matches(str(w), leaves + names, n=3, cutoff=0.5)})
    hint = f"closest module names: {close}" if close else "no similar names"
    return f"{hint}; adaptable leaf names in this model: {leaves[:20]}"


def ops_for_safe(module: nn.Module) -> bool:
    """LayerOps for the layer, or None for an unsupported type or one whose ops refuse it (e.g. a grouped conv)."""
    try:
        return ops_for(module) is not None
    except TargetError:
        return False


# --- parameter targets (PEFT's target_parameters) -----------------------------------------------------------
@dataclass
class ParameterTarget:
    """Where one adapted parameter's wrapper sits. Wrappers of several parameters of one module nest as in PEFT: the
    module's first parameter (in its own order) innermost, at `<module>.base_layer…`, its last at `<module>`."""

    path: str  # the wrapper's module path (and the prefix of its tensors in an adapter file)
    module_path: str  # the module holding the parameter: where a new wrapper goes
    key: str  # `<module path>.<parameter>`: what rank_pattern / alpha_pattern match, as in PEFT
    ops: ParameterOps


def _matches_parameter(wanted: list[str], key: str) -> bool:
    """PEFT's rule for target_parameters: the full name, or a `.`-suffix of it."""
    return key in wanted or any(key.endswith(f".{w}") for w in wanted)


def adapted_layer_at(model: nn.Module, path: str, ops: LayerOps) -> Optional[AdaptedLayer]:
    """The AdaptedLayer at `path` that adapts what `ops` does (the same parameter, for a parameter target), or None
    when there is none yet (the path may not exist yet: a nested parameter wrapper)."""
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        return None
    return layer if isinstance(layer, AdaptedLayer) and layer.ops.weight_name == ops.weight_name else None


def wrapped_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters already adapted on the module at a path (its nested wrappers), outermost first."""
    names = []
    while isinstance(module, AdaptedLayer) and isinstance(module.ops, ParameterOps):
        names.append(module.ops.weight_name)
        module = module.base_layer
    return names


def find_parameter_targets(model: nn.Module, config: AdapterConfig, module_targets: list[str]) -> list[ParameterTarget]:
    """The parameters `config.parameter_targets` names, innermost wrapper first. Raises TargetError if one cannot
    be adapted, none matches, a module is targeted both ways, or another adapter adapts another set of the module's
    parameters (the nesting, and so the tensor names, would differ: PEFT refuses it too)."""
    wanted = config.parameter_targets
    if not wanted:
        return []
    root = [n for n, _ in model.named_parameters(recurse=False) if _matches_parameter(wanted, n)]
    if root:
        raise TargetError(f"target_parameters match {root[:3]} on the top-level module, which cannot be wrapped")
    found: list[ParameterTarget] = []
    for path, module in candidate_modules(model):
        names = [n for n, _ in module.named_parameters(recurse=False) if _matches_parameter(wanted, f"{path}.{n}")]
        if names:
            found.extend(_nest(model, path, module, names, module_targets))
    if not found:
        raise TargetError(f"target_parameters {wanted!r} match no parameter of {type(model).__name__} (names are "
                          "matched in full or as a `.`-suffix, e.g. 'experts.gate_up_proj')")
    return found


def _nest(model: nn.Module, path: str, module: nn.Module, names: list[str], module_targets) -> list[ParameterTarget]:
    current = model.get_submodule(path)
    if path in module_targets or (isinstance(current, AdaptedLayer) and not wrapped_parameters(current)):
        raise TargetError(f"{path} is targeted as a module and its parameters {names} as parameters; "
                          "adapt it one way only")
    wrapped = wrapped_parameters(current)
    if wrapped and set(wrapped) != set(names):
        raise TargetError(f"{path}: another adapter adapts its parameters {sorted(wrapped)}, this one {sorted(names)}; "
                          "adapters with target_parameters must adapt the same parameters (as in PEFT)")
    order = wrapped[::-1] if wrapped else names  # innermost first
    try:
        return [ParameterTarget(path + ".base_layer" * (len(order) - 1 - i), path, f"{path}.{name}",
                                ParameterOps(module, name)) for i, name in enumerate(order)]
    except TargetError as e:
        raise TargetError(f"cannot adapt {path}: {e}") from None
