"""The functional, in-place API on any nn.Module: add, activate, disable, merge, unload, delete.

Adding an adapter is two steps: `plan_adapter` builds the new deltas next to the model without touching
it (so io can validate loaded tensors against them first), and `attach` puts them in.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, Union

from torch import nn

from .adapted import AdaptedLayer
from .patching import pack_parameters
from .config import AdapterConfig, shown
from .delta import Delta
from ..errors import AdapterNameError, ConfigError, TargetError
from .layers import LayerOps, ops_for
from .originals import restore_originals
from .registry import TRAINING_HOOKS, as_config, delta_class
from .saved import SavedModule
from .targeting import (adapted_layer_at, candidate_modules, find_parameter_targets, find_targets, resolve_targets,
                        wrapped_parameters)

_STATE_ATTR = "lorakit_state"


@dataclass
class AdapterState:
    """Per-model bookkeeping, stored on the model itself (no wrapper object)."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    requires_grad_before: dict[str, bool] = field(default_factory=dict)  # restored by unload
    # [base parameter, its value before, names of the loaded adapters that wrote it] (a loaded bias)
    overwritten: list = field(default_factory=list)


def state(model: nn.Module) -> AdapterState:
    """The model's adapter bookkeeping (configs, active set); an empty one for a model without adapters."""
    st = model.__dict__.get(_STATE_ATTR)
    return st if st is not None else AdapterState()


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """Every (module path, AdaptedLayer) of the model, in module order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLayer))


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    """Every (module path, SavedModule) holding modules_to_save copies, in module order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, SavedModule))


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    return list(state(model).configs)


def get_config(model: nn.Module, name: str) -> AdapterConfig:
    """The config of adapter `name`; raises AdapterNameError if the model has no such adapter."""
    require_adapters(model, [name])
    return state(model).configs[name]


# --- adding ------------------------------------------------------------------------------------------
@dataclass
class AdapterPlan:
    """An adapter built next to a model but not yet in it (see plan_adapter and attach)."""

    name: str
    config: AdapterConfig
    deltas: dict[str, Delta]  # module path → new delta (not yet in the model)
    saved: list[str]  # module paths that get a modules_to_save copy
    # where a new wrapper goes when that is not the delta's own path: a parameter target's module (its wrappers
    # nest there, innermost first, in the order of `deltas`)
    wrap_at: dict[str, str] = field(default_factory=dict)


# Adapters are held by name in torch ModuleDicts, so a name that is one of its attributes cannot be a key.
RESERVED_NAMES = frozenset(dir(nn.ModuleDict()))


def check_new_name(model: nn.Module, name: str) -> None:
    """AdapterNameError unless `name` is a valid adapter name not yet taken on `model`."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise AdapterNameError(f"adapter names are letters, digits, '_' and '-', got {shown(name)}")
    if name in RESERVED_NAMES:
        raise AdapterNameError(f"{name!r} cannot be an adapter name: it is an attribute of torch's ModuleDict, "
                               "which holds the adapters by name")
    if name in state(model).configs:
        raise AdapterNameError(f"an adapter named {name!r} already exists; delete it first or pick another name")


# A rank above both of a layer's dimensions adds nothing (ΔW's rank is at most min(in, out)). PEFT allows it and so
# does lorakit, unless the factors would hold more values than this: then it is a typo that would allocate gigabytes.
MAX_FACTOR_VALUES = 2**24


def check_rank(config: AdapterConfig, path: str, ops: LayerOps) -> None:
    """ConfigError for an absurd rank at `path`, before anything is allocated (see MAX_FACTOR_VALUES)."""
    r, fan_in, out = config.rank_for(path), ops.in_features * math.prod(ops.kernel), ops.out_features
    if r > max(fan_in, out) and r * (fan_in + out) > MAX_FACTOR_VALUES:
        raise ConfigError(f"{type(config).__name__} field {config.rank_field!r} (or its rank_pattern entry) gives "
                          f"{path} rank {r}, "
                          f"far above the layer's {out}×{fan_in} (ΔW's rank is at most {min(fan_in, out)}); "
                          f"its factors would hold {r * (fan_in + out):,} values")


def plan_adapter(model: nn.Module, config: Any, name: str) -> AdapterPlan:
    """Build the adapter's deltas for this model without changing the model. `config` is a lorakit config or a
    PEFT config object (registry.as_config); target_modules None takes PEFT's defaults for the model's type."""
    check_new_name(model, name)
    # The model keeps its own copy, checked again (a field may have been set since construction).
    config = resolve_targets(model, as_config(config).with_updates())
    modules = dict(candidate_modules(model))
    cls = delta_class(config)
    targets = {path: ops_for(modules[path]) for path in find_targets(model, config)}
    wrapped = [p for p in targets if wrapped_parameters(model.get_submodule(p))]
    if wrapped:
        raise TargetError(f"target_modules match {wrapped[:3]}, whose parameters another adapter adapts as "
                          "target_parameters; adapt a module one way only")
    parameters = find_parameter_targets(model, config, list(targets))
    for key, ops in [*targets.items(), *((t.key, t.ops) for t in parameters)]:
        check_rank(config, key, ops)
    deltas = {path: cls(ops, config, path) for path, ops in targets.items()}
    deltas.update({t.path: cls(t.ops, config, t.key) for t in parameters})
    saved = [path for path, m in model.named_modules() if path and _is_saved_target(config, path, m, model)]
    return AdapterPlan(name, config, deltas, saved, {t.path: t.module_path for t in parameters})


def _is_saved_target(config: AdapterConfig, path: str, module: nn.Module, model: nn.Module) -> bool:
    if not config.modules_to_save or isinstance(module, AdaptedLayer):
        return False
    if any(path.startswith(p + ".") for p, _ in saved_modules(model)):
        return False  # a module inside an existing copy
    return isinstance(module, SavedModule) or any(path == m or path.endswith("." + m) for m in config.modules_to_save)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def attach(model: nn.Module, plan: AdapterPlan, fresh: bool = True) -> None:
    """Put a planned adapter into the model (in place). fresh: run data-dependent inits (PiSSA, OLoRA).
    If anything raises midway, the wrappers, deltas, copies, flags and bookkeeping added so far are taken
    out again (base weights already rewritten by a completed data-dependent init are not restored)."""
    st = state(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        _attach(model, plan, fresh, st)
        _sync_hf(model)
    except BaseException:
        _remove_from_layers(model, plan.name)
        for p, flag in flags:
            p.requires_grad_(flag)
        st.configs.pop(plan.name, None)
        st.active = tuple(n for n in st.active if n != plan.name)
        if not st.configs:
            model.__dict__.pop(_STATE_ATTR, None)
        with contextlib.suppress(Exception):  # the bridge follows the rolled-back state; the first error is raised
            _sync_hf(model)
        raise


def _attach(model: nn.Module, plan: AdapterPlan, fresh: bool, st: AdapterState) -> None:
    if not st.configs:  # first adapter: freeze the base, remembering what was trainable
        st.requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        model.__dict__[_STATE_ATTR] = st
    for path, delta in plan.deltas.items():
        layer = adapted_layer_at(model, path, delta.ops)
        if layer is None:
            wrap_at = plan.wrap_at.get(path, path)
            layer = AdaptedLayer(model.get_submodule(wrap_at), delta.ops)
            layer.active = st.active
            _replace(model, wrap_at, layer)
        layer.deltas[plan.name] = delta
        layer.train(layer.base_layer.training)  # an eval-mode model gets eval-mode adapters (no live dropout)
        if fresh:
            delta.on_attach(layer)
    for path in plan.saved:
        holder = model.get_submodule(path)
        if not isinstance(holder, SavedModule):
            holder = SavedModule(holder)
            holder.active = st.active
            _replace(model, path, holder)
        holder.add_copy(plan.name)
        holder.train(holder.original_module.training)
    _train_biases(model, plan)
    st.configs[plan.name] = plan.config
    if not st.active:
        set_active(model, plan.name)


def _train_biases(model: nn.Module, plan: AdapterPlan) -> None:
    mode = plan.config.bias_mode
    if mode == "all":
        for n, p in model.named_parameters():
            if n.endswith("bias") and ".deltas." not in n:
                p.requires_grad_(True)
    elif mode == "adapted":
        for path in plan.deltas:
            bias = getattr(model.get_submodule(path).base_layer, "bias", None)
            if bias is not None:
                bias.requires_grad_(True)


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default") -> nn.Module:
    """Adapt `model` in place and freeze its base. The first adapter becomes active; later ones are
    added inactive (as in PEFT): call set_active to use them. Returns the same model object.

    `config` may also be a PEFT config object of any registered variant, converted field by field;
    target_modules None means PEFT's defaults for `model.config.model_type`."""
    attach(model, plan_adapter(model, config, name))
    return model


# --- activating, disabling, merging --------------------------------------------------------------------
def require_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """AdapterNameError naming the model's adapters unless every name in `names` is one of them."""
    known = state(model).configs
    for n in names:
        if not isinstance(n, str) or n not in known:
            raise AdapterNameError(f"no adapter named {shown(n)}; this model has {sorted(known)}")


def adapter_names(names: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """`names` as a tuple: a string is one name, a list (or other iterable) its distinct names. AdapterNameError for
    a name listed twice (it would apply twice) or anything else."""
    if isinstance(names, str):
        return (names,)
    if not isinstance(names, Iterable) or isinstance(names, (bytes, dict)):
        raise AdapterNameError(f"expected an adapter name or a list of names, got {shown(names)}")
    names = tuple(names)
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise AdapterNameError(f"adapter {shown(twice)} is listed twice; each adapter is used (or merged) once")
    return names


def set_active(model: nn.Module, names: Union[str, Sequence[str], None]) -> None:
    """Use one adapter, several (their outputs are summed), or none (None)."""
    wanted = () if names is None else adapter_names(names)
    require_adapters(model, wanted)
    if any(layer.merged for _, layer in adapted_layers(model)):
        warnings.warn("lorakit: unmerging adapters before switching the active set", stacklevel=2)
        unmerge(model)
    state(model).active = wanted
    for _, m in [*adapted_layers(model), *saved_modules(model)]:
        m.active = wanted


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the active adapters (their outputs are summed), in order; [] when none is."""
    return list(state(model).active)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Within the block the model behaves as its base (merged adapters are taken out and put back)."""
    was_merged = {n: list(layer.merged) for n, layer in adapted_layers(model)}
    unmerge(model)
    wrappers = [m for _, m in [*adapted_layers(model), *saved_modules(model)]]
    for m in wrappers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in wrappers:
            m.disabled = False
        for n, layer in adapted_layers(model):
            layer.merge(tuple(was_merged.get(n, ())))


def merge(model: nn.Module, names: Union[str, Sequence[str], None] = None) -> None:
    """Add the active (or named: one name or a list) adapters' ΔW into the base weights: no added latency
    afterwards."""
    names = state(model).active if names is None else adapter_names(names)
    require_adapters(model, names)
    for _, layer in adapted_layers(model):
        layer.merge(names)


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter's ΔW back out of the base weights (in reverse merge order)."""
    for _, layer in adapted_layers(model):
        layer.unmerge()


_merge = merge  # unload's `merge` flag shadows the function


# --- removing -----------------------------------------------------------------------------------------
def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from the model (unmerging first); the last one gone leaves the base model as it was,
    with its requires_grad flags restored (and base weights that optimize() gave spare columns packed back)."""
    require_adapters(model, [name])
    unmerge(model)
    st = state(model)
    _remove_from_layers(model, name)
    del st.configs[name]
    restore_originals(st, {name})
    set_active(model, tuple(n for n in st.active if n != name))
    if not st.configs:
        _forget(model, st)
    _sync_hf(model)


def _remove_from_layers(model: nn.Module, name: str) -> None:
    """Take adapter `name` out of every layer; a wrapper left with no adapter goes too (also one a failed attach
    left empty)."""
    for path, layer in reversed(list(adapted_layers(model))):  # nested wrappers (parameter targets) inner first
        if name in layer.deltas:
            del layer.deltas[name]
        if not len(layer.deltas):
            _replace(model, path, layer.base_layer)
    for path, holder in list(saved_modules(model)):
        if name in holder.copies:
            del holder.copies[name]
        if not len(holder.copies):
            _replace(model, path, holder.original_module)


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every lorakit module. merge=True first merges the active adapters (and keeps their
    modules_to_save copies); merge=False gives back the base model. Base weights that optimize() gave spare
    columns get contiguous storage again. Returns the same model object."""
    st = state(model)
    if merge:
        _merge(model)
        st.overwritten = []  # loaded biases are part of the merged model
    else:
        unmerge(model)
        restore_originals(st, set(st.configs))
    for path, layer in reversed(list(adapted_layers(model))):  # nested wrappers inner first
        _replace(model, path, layer.base_layer)
    for path, holder in list(saved_modules(model)):
        _replace(model, path, holder.current() if merge else holder.original_module)
    _forget(model, st)
    _sync_hf(model)
    return model


def _sync_hf(model: nn.Module) -> None:
    """A transformers model answers transformers' adapter API (save_pretrained, set_adapter, ...) while it has
    adapters, and no longer after (core/hf/model.py)."""
    from .hf.model import sync  # imported here: hf builds on this module

    sync(model)


def _forget(model: nn.Module, st: AdapterState) -> None:
    pack_parameters(model)  # base weights a fast path gave spare columns: a plain model again
    for n, p in model.named_parameters():
        p.requires_grad_(st.requires_grad_before.get(n, p.requires_grad))
    model.__dict__.pop(_STATE_ATTR, None)


# --- reporting ----------------------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all), counted as PEFT's get_nb_trainable_parameters does."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * getattr(p, "lorakit_numel_factor", 1)  # packed 4-bit weights count per value
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    """PEFT's print_trainable_parameters line: 'trainable: N || all params: M || trainable%: P'."""
    trainable, total = count_parameters(model)
    share = 100 * trainable / total if total else 0.0
    return f"trainable: {trainable:,} || all params: {total:,} || trainable%: {share:.3f}"


# --- training integration -------------------------------------------------------------------------------
def training_hooks(model: nn.Module) -> list:
    """Hooks of the active adapters' variants, for any training loop (lorakit's own calls them):
    add `hook.extra_loss()` to the loss, call `hook.after_step(step)` after each optimizer step."""
    st = state(model)
    hooks = []
    for name in st.active:
        factory = TRAINING_HOOKS.get(st.configs[name].variant)
        if factory is not None:
            hooks.append(factory(model, name, st.configs[name]))
    return hooks
