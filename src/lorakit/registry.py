"""Type → factory registries (minLoRA style): peft_type → config class, variant → delta class.

Variants register themselves when their module is imported (lorakit/__init__ imports them all), so
injection and io look things up here and never branch on the variant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import AdapterConfig
    from .delta import Delta

CONFIGS: dict[str, type["AdapterConfig"]] = {}
DELTAS: dict[str, type["Delta"]] = {}
# variant → factory(model, adapter_name, config) of a training hook: an object with
#   extra_loss() -> Tensor | None   (added to the loss before backward)
#   after_step(step: int) -> None   (after optimizer.step(), before zero_grad; e.g. AdaLoRA's allocator)
#   on_save() -> None               (before the adapter is written, e.g. to drop pruned ranks)
TRAINING_HOOKS: dict[str, Callable] = {}


def register(variant: str, config_cls: type["AdapterConfig"], delta_cls: type["Delta"]) -> None:
    CONFIGS.setdefault(config_cls.peft_type, config_cls)
    DELTAS[variant] = delta_cls


def delta_class(config: "AdapterConfig") -> type["Delta"]:
    try:
        return DELTAS[config.variant]
    except KeyError:
        raise ConfigError(f"no lorakit implementation of {config.variant}; available: {sorted(DELTAS)}") from None


def config_from_peft_dict(data: dict[str, Any]) -> "AdapterConfig":
    peft_type = data.get("peft_type")
    if peft_type not in CONFIGS:
        raise ConfigError(f"unknown peft_type {peft_type!r}; lorakit reads {sorted(CONFIGS)}")
    return CONFIGS[peft_type].from_peft_dict({k: v for k, v in data.items() if k != "peft_type"})
