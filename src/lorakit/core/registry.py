"""Type → factory registry (minLoRA style): variant name → its `Variant` (config class, delta class, hooks).

`lorakit.variants` registers every built-in variant from one explicit list; a plugin calls `register` with
its own `Variant`. Injection, files, training and the CLI look variants up here and never branch on one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import ConfigError
from .config import AdapterConfig, shown

if TYPE_CHECKING:
    from .delta import Delta


@dataclass(frozen=True)
class Variant:
    """One weight-delta variant, as its module declares it.

    name: the registry key (`config.variant`), e.g. "LORA" or "DORA".
    config: its config dataclass (PEFT's fields; `config.peft_type` names the adapter_config.json type).
    delta: its `Delta` subclass.
    selector: config fields that pick this variant inside a shared config class (e.g. {"<flag>": True}).
    training_hook: factory(model, adapter_name, config) of an object with
        extra_loss() -> Tensor | None   (added to the loss before backward)
        after_step(step: int) -> None   (after optimizer.step(), before zero_grad; e.g. a rank allocator)
        on_save() -> None               (before the adapter is written)
    factored_config: for a variant whose deltas hold any rank-r product s·B·A (`Delta.factors_writable`),
        factory(r, source=None, **common) of its config at rank r: `source`, a config of this same
        variant, is kept with only r and `common` changed (its scale rule stays); otherwise a fresh config
        with s = 1 and `common`'s AdapterConfig fields (target_modules, rank_pattern, modules_to_save, ...),
        taking from another variant's `source` what this variant can keep. combine and truncate write
        their results through it (see `factored_variant`).
    """

    name: str
    config: type["AdapterConfig"]
    delta: type["Delta"]
    selector: dict[str, Any] = field(default_factory=dict)
    training_hook: Optional[Callable] = None
    factored_config: Optional[Callable[..., "AdapterConfig"]] = None


VARIANTS: dict[str, Variant] = {}
# Views of VARIANTS kept for direct lookups: peft_type → config class, name → delta class, name → hook factory.
CONFIGS: dict[str, type["AdapterConfig"]] = {}
DELTAS: dict[str, type["Delta"]] = {}
TRAINING_HOOKS: dict[str, Callable] = {}


def register(variant: Variant) -> None:
    """Make `variant` available to add_adapter, load_adapter, training and `lorakit train --adapter`."""
    VARIANTS[variant.name] = variant
    CONFIGS.setdefault(variant.config.peft_type, variant.config)
    DELTAS[variant.name] = variant.delta
    if variant.training_hook is not None:
        TRAINING_HOOKS[variant.name] = variant.training_hook


def delta_class(config: "AdapterConfig") -> type["Delta"]:
    """The Delta subclass that implements `config`'s variant."""
    try:
        return DELTAS[config.variant]
    except KeyError:
        raise ConfigError(f"no lorakit implementation of {config.variant}; available: {sorted(DELTAS)}") from None


def config_from_peft_dict(data: dict[str, Any]) -> "AdapterConfig":
    """The config an adapter_config.json dict describes (its peft_type picks the class)."""
    peft_type = data.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in CONFIGS:
        raise ConfigError(f"unknown peft_type {shown(peft_type)}; lorakit reads {sorted(CONFIGS)}")
    return CONFIGS[peft_type].from_peft_dict({k: v for k, v in data.items() if k != "peft_type"})


def as_config(config: Any) -> "AdapterConfig":
    """A lorakit config as is; a PEFT config object (anything with `peft_type` and `to_dict()`, for each variant
    the registry knows) converted through its fields, without importing peft.
    ConfigError for anything else, or for a PEFT option lorakit does not implement."""
    if isinstance(config, AdapterConfig):
        return config
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict) or getattr(config, "peft_type", None) is None:
        raise ConfigError("config must be a lorakit adapter config (an AdapterConfig subclass instance) or a PEFT "
                          f"config, got {type(config).__name__}")
    data = {k: _plain(v) for k, v in to_dict().items()}
    data["peft_type"] = _plain(config.peft_type)
    return config_from_peft_dict(data)


def _plain(value: Any) -> Any:
    """PEFT's in-memory values as they read from JSON: enums as their values, sets as sorted lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return value


def factored_variant() -> Variant:
    """The first registered variant that can hold an arbitrary rank-r factorisation (its `factored_config`
    is set): the output format of combine and truncate."""
    for variant in VARIANTS.values():
        if variant.factored_config is not None:
            return variant
    raise ConfigError(f"no registered variant can hold a low-rank factorisation; registered: {sorted(VARIANTS)}")
