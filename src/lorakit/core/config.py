"""Adapter configs with PEFT's field names, meanings and adapter_config.json layout.

Each variant's config is a dataclass subclass of `AdapterConfig`. `to_peft_dict` writes the JSON PEFT
writes (PEFT-only fields at PEFT's defaults, so PEFT loads the file); `from_peft_dict` reads PEFT's JSON
and refuses options lorakit does not implement instead of silently ignoring them.
"""

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from ..errors import ConfigError

PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose files lorakit writes and is tested against

# PEFT fields that every adapter_config.json has and lorakit keeps only for the round trip.
_COMMON_PEFT_FIELDS: dict[str, Any] = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "peft_version": PEFT_FORMAT_VERSION,
}


@dataclass
class AdapterConfig:
    """Fields that every weight-delta variant shares (PEFT's names and meanings)."""

    peft_type: ClassVar[str] = ""
    # PEFT fields lorakit does not implement: written at these defaults, refused when set otherwise.
    unsupported_peft_fields: ClassVar[dict[str, Any]] = {}
    # Generic run options (`lorakit train --r/--lora-alpha/...`) → this config's field of another name.
    run_option_fields: ClassVar[dict[str, str]] = {}
    # The field that takes the run's number of optimizer steps (a schedule's length), if the variant has one.
    total_steps_field: ClassVar[Optional[str]] = None

    target_modules: Optional[Union[list[str], str]] = None
    """Names matched as full module name or `.`-suffix; a string is a regex fullmatch; "all-linear"."""
    exclude_modules: Optional[Union[list[str], str]] = None
    """Same matching rules as target_modules; a match here is never adapted."""
    layers_to_transform: Optional[Union[list[int], int]] = None
    """Only adapt layers with these indices (the first number in the module path)."""
    layers_pattern: Optional[Union[list[str], str]] = None
    """Name of the layer list that holds layers_to_transform's indices (e.g. "layers")."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex matched against the module name's suffix: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, matched like rank_pattern."""
    modules_to_save: Optional[list[str]] = None
    """Modules trained in full next to the adapter (e.g. a classifier head); saved with it."""
    task_type: Optional[str] = None
    """PEFT's task type; "SEQ_CLS" adds the usual classifier heads to modules_to_save, as PEFT does."""
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if self.task_type == "SEQ_CLS":
            # PEFT's PeftModelForSequenceClassification adds these names itself.
            extra = [n for n in ("classifier", "score") if n not in (self.modules_to_save or [])]
            self.modules_to_save = (self.modules_to_save or []) + extra
        if self.target_modules is None:
            raise ConfigError(f"{type(self).__name__} needs target_modules (a list of names, a regex, or 'all-linear')")
        self.validate()

    def validate(self) -> None:
        """Subclasses check their own fields here and raise ConfigError."""

    @property
    def variant(self) -> str:
        """The registry key of the delta class this config builds (see registry.py)."""
        return self.peft_type

    @property
    def bias_mode(self) -> str:
        """Which base biases train and are saved with the adapter: "none", "all", or "adapted" (the biases of
        the layers this adapter adapts). Variants with PEFT's `bias` option map it here."""
        return "none"

    def rank_for(self, module_name: str) -> int:
        """The rank of the delta at `module_name` (rank_pattern overrides)."""
        raise NotImplementedError

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json contents PEFT writes for this config."""
        out = dict(_COMMON_PEFT_FIELDS)
        out.update(self.unsupported_peft_fields)
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
        out["peft_type"] = self.peft_type
        return dict(sorted(out.items()))

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Read PEFT's adapter_config.json fields; options lorakit does not implement are refused (ConfigError)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, refused = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in cls.unsupported_peft_fields and value not in (cls.unsupported_peft_fields[key], None, {}, [], False):
                refused.append(f"{key}={value!r}")
        if refused:
            raise ConfigError(f"this {cls.peft_type} adapter uses options lorakit does not support: {', '.join(refused)}")
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"invalid {cls.peft_type} config: {e}") from None

    def with_updates(self, **changes: Any) -> "AdapterConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def pattern_key(patterns: dict, module_name: str) -> Optional[str]:
    """PEFT's get_pattern_key: the first pattern that matches the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def pattern_value(patterns: dict, module_name: str, default):
    """The value of the first pattern (PEFT's rank_pattern / alpha_pattern rules) matching `module_name`, else
    `default`."""
    key = pattern_key(patterns, module_name)
    return patterns[key] if key is not None else default


def check_rank_pattern(rank_pattern: dict) -> None:
    """Every rank_pattern value is a positive integer (ConfigError otherwise)."""
    for name, r in rank_pattern.items():
        if not isinstance(r, int) or r <= 0:
            raise ConfigError(f"rank_pattern[{name!r}] must be a positive integer, got {r!r}")
