"""The adapter config of a run, built from its options (`--adapter`, `--r`, `--lora-alpha`, ... and
`--adapter-options`), for every registered variant.

A config class may declare how the run's generic options reach it (each variant's module sets them):
    run_option_fields: ClassVar[dict[str, str]]   generic option → its field of another name
    total_steps_field: ClassVar[Optional[str]]    the field that takes the run's optimizer steps (a schedule's length)
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

from ..core.registry import VARIANTS
from ..errors import ConfigError

# The run options every variant may take, under these names unless its config renames them.
RUN_OPTIONS = ("r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters")


def adapter_variants() -> dict[str, tuple[type, dict[str, Any]]]:
    """Registered variants by CLI name → (config class, fields that select the variant).

    Every registered variant is a name ("lora", "dora", "loha", ...); a variant that is a flag of another
    config (DoRA is a LoRA config with its selector set) carries its registry `selector`. A config's
    peft_type is a name as well when it differs from its variant's.
    """
    names: dict[str, tuple[type, dict[str, Any]]] = {}
    for variant in VARIANTS.values():
        names.setdefault(variant.name.lower(), (variant.config, dict(variant.selector)))
        if not variant.selector:
            names.setdefault(variant.config.peft_type.lower(), (variant.config, {}))
    return names


def _option_values(options, cls: type, fields: set[str], name: str, given: Optional[set[str]]) -> dict[str, Any]:
    """The generic run options as `cls`'s fields. An option reaches the field of its own name and the field
    `cls.run_option_fields` names for it; next to a field of its own name (a starting rank beside the rank)
    the renamed one takes only a value the run set explicitly (`given`). Raises ConfigError when an option the
    run set has no field here."""
    renames = cls.run_option_fields
    kwargs: dict[str, Any] = {}
    for option in RUN_OPTIONS:
        value = getattr(options, option)
        if option == "target_modules" and value == ["all-linear"]:
            value = "all-linear"
        if option == "target_modules" and options.target_parameters and given is not None and option not in given:
            value = []  # parameters alone (PEFT: target_modules=[])
        if option == "target_parameters" and not value:
            continue  # not set: the config's own default (None)
        explicit = given is not None and option in given
        own = option in fields
        alias = renames.get(option)
        if own:
            kwargs[option] = value
        if alias in fields and (not own or explicit):
            kwargs[alias] = value
        if not own and alias not in fields and explicit:
            raise ConfigError(f"--{option.replace('_', '-')} does not apply to {name}; its options are "
                              f"{sorted(fields)} (pass them with --adapter-options)")
    return kwargs


_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _typed_booleans(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """--adapter-options as typed text (a boolean adapter option given as false, no or yes): a true/false word
    given to a field that takes a bool becomes that bool. The configs themselves refuse strings for bools (a "false" that reads as true)."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        tp = hints.get(key)
        takes_bool = tp is bool or bool in typing.get_args(tp)
        if takes_bool and isinstance(value, str) and value.strip().lower() in _WORDS:
            out[key] = _WORDS[value.strip().lower()]
    return out


def build_adapter_config(options, task: str, given: Optional[set[str]] = None, steps: Optional[int] = None):
    """The adapter config of `options.adapter` with the generic options it has, then --adapter-options.

    Args:
        options: the run's options (adapter, r, lora_alpha, lora_dropout, target_modules, adapter_options).
        task: "classify" also trains the classifier head (task_type SEQ_CLS).
        given: the options the user set explicitly (None: unknown).
        steps: the run's optimizer steps; fill the config's `total_steps_field` unless the options set it.
    Returns:
        The config. Raises ConfigError for an unknown adapter or option."""
    variants = adapter_variants()
    name = options.adapter.lower()
    if name not in variants:
        raise ConfigError(f"unknown adapter {options.adapter!r}; registered: {sorted(variants)}")
    cls, selector = variants[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = _option_values(options, cls, fields, name, given)
    steps_field = cls.total_steps_field
    if steps_field in fields and steps is not None:
        kwargs[steps_field] = steps
    unknown = sorted(set(options.adapter_options) - fields)
    if unknown:
        raise ConfigError(f"{name} has no option(s) {unknown}; its options are {sorted(fields)}")
    kwargs.update(_typed_booleans(cls, options.adapter_options))
    kwargs.update(selector)
    if task == "classify":
        kwargs.setdefault("task_type", "SEQ_CLS")  # trains the classifier head too (modules_to_save)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"invalid options for {name}: {e}") from None
