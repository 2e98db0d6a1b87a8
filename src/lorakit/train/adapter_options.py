"""The adapter config of a run, built from its options (`--adapter`, `--r`, `--lora-alpha`, ... and
`--adapter-options`), for every registered variant."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ..core.registry import CONFIGS, DELTAS
from ..errors import ConfigError


def adapter_variants() -> dict[str, tuple[type, dict[str, Any]]]:
    """Registered variants by CLI name → (config class, fields that select the variant).

    Every peft_type in the registry is a name ("lora", "loha", ...). A variant that is a flag of another
    config (DoRA is LoraConfig(use_dora=True)) is found through the config's `use_<variant>` field.
    """
    names: dict[str, tuple[type, dict[str, Any]]] = {pt.lower(): (cls, {}) for pt, cls in CONFIGS.items()}
    for variant in DELTAS:
        if variant.lower() in names:
            continue
        for cls in CONFIGS.values():
            flag = f"use_{variant.lower()}"
            if flag in {f.name for f in dataclasses.fields(cls)}:
                names[variant.lower()] = (cls, {flag: True})
                break
    return names


# Generic option → the names variants use for it (first that the config class has wins).
OPTION_FIELDS = {"r": ("r",), "lora_alpha": ("lora_alpha", "alpha"), "lora_dropout": ("lora_dropout",),
                 "target_modules": ("target_modules",)}


def build_adapter_config(options, task: str, given: Optional[set[str]] = None, steps: Optional[int] = None):
    """The adapter config of `options.adapter` with the generic options it has, then --adapter-options.
    `steps` (the run's optimizer steps) fills a schedule's `total_step` (AdaLoRA) unless the options set it."""
    variants = adapter_variants()
    name = options.adapter.lower()
    if name not in variants:
        raise ConfigError(f"unknown adapter {options.adapter!r}; registered: {sorted(variants)}")
    cls, selector = variants[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for option, candidates in OPTION_FIELDS.items():
        target = next((c for c in candidates if c in fields), None)
        value = getattr(options, option)
        if option == "target_modules" and value == ["all-linear"]:
            value = "all-linear"
        if target is not None:
            kwargs[target] = value
        elif given is not None and option in given:
            raise ConfigError(f"--{option.replace('_', '-')} does not apply to {name}; its options are "
                              f"{sorted(fields)} (pass them with --adapter-options)")
    if "init_r" in fields and given is not None and "r" in given:
        kwargs["init_r"] = options.r  # a variant whose rank is its starting rank (AdaLoRA: r itself is unused)
    if "total_step" in fields and steps is not None:
        kwargs["total_step"] = steps
    unknown = sorted(set(options.adapter_options) - fields)
    if unknown:
        raise ConfigError(f"{name} has no option(s) {unknown}; its options are {sorted(fields)}")
    kwargs.update(options.adapter_options)
    kwargs.update(selector)
    if task == "classify":
        kwargs.setdefault("task_type", "SEQ_CLS")  # trains the classifier head too (modules_to_save)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"invalid options for {name}: {e}") from None
