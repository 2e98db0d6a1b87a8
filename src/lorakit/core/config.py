"""Adapter configs with PEFT's field names, meanings and adapter_config.json layout.

Each variant's config is a dataclass subclass of `AdapterConfig`. `to_peft_dict` writes the JSON PEFT
writes (PEFT-only fields at PEFT's defaults, so PEFT loads the file); `from_peft_dict` reads PEFT's JSON
and refuses options lorakit does not implement instead of silently ignoring them.
"""

import dataclasses
import enum
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Union

from ..errors import ConfigError
from .default_targets import PEFT_DEFAULT_TARGETS

PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose files lorakit writes and is tested against

# PEFT fields that every adapter_config.json has and lorakit keeps only for the round trip.
_COMMON_PEFT_FIELDS: dict[str, Any] = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "peft_version": PEFT_FORMAT_VERSION,
}

MAX_RANK = 2**16
"""The largest rank (r, a rank_pattern value, a variant's own rank field) any config takes: far above any layer's
size, and small enough that a typo is refused before it allocates (plan_adapter also weighs the rank against each
layer)."""

TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
"""PEFT's TaskType values."""


# --- field checks: each config declares its fields' types and ranges in `field_checks` -----------------------
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel = 2


def shown(value: Any) -> str:
    """A short repr for messages (long strings and deep or huge containers are cut)."""
    return _SHORT.repr(value)


CLASSIFIER_HEADS = ("classifier", "score")  # the heads PEFT's SEQ_CLS model adds to modules_to_save itself


class Check:
    """One field's type and range. `want` completes "must be ..."; `test(value)` says whether a value fits;
    `detail(value)` may add why it does not (a regex's error, the bad entry of a dict). `a | b` accepts either."""

    def __init__(self, want: str, test: Callable[[Any], bool], detail: Callable[[Any], str] = lambda v: ""):
        self.want, self.test, self.detail = want, test, detail

    def problem(self, value: Any) -> Optional[str]:
        """What is wrong with `value` ("must be ..., got ..."), or None when it fits."""
        if self.test(value):
            return None
        text = f"must be {self.want}, got {shown(value)}"
        if "true or false" in self.want and isinstance(value, str) and value.lower() in ("true", "false"):
            text += " (a string; write true or false without quotes)"
        return text + self.detail(value)

    def __or__(self, other: "Check") -> "Check":
        return Check(f"{self.want} or {other.want}", lambda v: self.test(v) or other.test(v),
                     lambda v: self.detail(v) or other.detail(v))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integer(low: int, high: Optional[int] = None) -> Check:
    """An int (a bool is not one) in [low, high]."""
    want = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Check(want, lambda v: _is_int(v) and v >= low and (high is None or v <= high))


def number(low: float = -math.inf, high: float = math.inf, open_low: bool = False, open_high: bool = False) -> Check:
    """A finite int or float (not a bool) between low and high (open_low/open_high: the bound itself excluded)."""
    bounds = "" if (low, high) == (-math.inf, math.inf) else (
        f" in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}")

    def test(v: Any) -> bool:
        if not (_is_int(v) or isinstance(v, float)):
            return False
        try:
            if not math.isfinite(float(v)):
                return False
        except OverflowError:  # an int beyond any float: every computation with it would overflow
            return False
        return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
    return Check(f"a finite number{bounds}", test)


BOOLEAN = Check("true or false", lambda v: isinstance(v, bool))
TEXT = Check("a string", lambda v: isinstance(v, str))
NULL = Check("null", lambda v: v is None)


def one_of(*choices: Any) -> Check:
    """Exactly one of these values (of the same type: True is not 1)."""
    want = "one of " + ", ".join(map(repr, choices))
    return Check(want, lambda v: any(type(v) is type(c) and v == c for c in choices))


def list_of(item: Check, what: str) -> Check:
    """A list (or tuple) whose every item passes `item`; `what` names the items in messages."""
    def bad_item(v: Any) -> str:
        wrong = next((x for x in v if not item.test(x)), None) if isinstance(v, (list, tuple)) else None
        return f" ({shown(wrong)} is not {item.want})" if wrong is not None else ""
    return Check(f"a list of {what}", lambda v: isinstance(v, (list, tuple)) and all(item.test(x) for x in v),
                 bad_item)


def regex(compiled: Callable[[str], str] = lambda p: p) -> Check:
    """A string that compiles as a regular expression (as `compiled(string)`: the form it is matched in)."""
    def error(v: Any) -> Optional[str]:
        try:
            re.compile(compiled(v))
        except re.error as e:
            return e.msg
        except (RecursionError, OverflowError) as e:  # a pathologically nested or huge pattern
            return type(e).__name__
        return None
    return Check("a regex string", lambda v: isinstance(v, str) and error(v) is None,
                 lambda v: f" ({error(v)})" if isinstance(v, str) and error(v) else "")


def mapping(value: Check, keys: Check = TEXT) -> Check:
    """A dict {key passing `keys`: value passing `value`}; the message names the first bad entry."""
    def bad(v: Any) -> Optional[str]:
        for k, x in v.items():
            for check, item, which in ((keys, k, "key"), (value, x, f"value of {shown(k)}")):
                if not check.test(item):
                    return f" (the {which} must be {check.want}, got {shown(item)}{check.detail(item)})"
        return None
    return Check("a dict", lambda v: isinstance(v, dict) and bad(v) is None,
                 lambda v: (bad(v) or "") if isinstance(v, dict) else "")


def optional(check: Check) -> Check:
    """None, or a value passing `check`."""
    return check | NULL


def pattern_regex(key: str) -> str:
    """The regex a rank_pattern / alpha_pattern key is matched as (PEFT's get_pattern_key)."""
    return rf"(.*\.)?({key})$"


def layers_pattern_regex(pattern: str) -> str:
    """The regex a layers_pattern entry is matched as: the layer index is the number after it."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


NAMES = regex() | list_of(TEXT, "module names")  # target_modules / exclude_modules: a regex, or names / suffixes


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
    # The field that states the adapter's rank (named in messages about an absurd rank).
    rank_field: ClassVar[str] = "r"

    # PEFT's per-model-type default target_modules (model.config.model_type → names), used when target_modules is
    # None; resolved when the config meets a model (core/targeting.resolve_targets).
    default_target_modules: ClassVar[dict[str, Union[list[str], str]]] = PEFT_DEFAULT_TARGETS
    # Each field's type and range (a subclass declares its own fields; `check_fields` runs every class's).
    field_checks: ClassVar[dict[str, Check]] = {
        "target_modules": optional(NAMES),
        "exclude_modules": optional(NAMES),
        "layers_to_transform": optional(integer(0) | list_of(integer(0), "layer indices")),
        "layers_pattern": optional(regex(layers_pattern_regex) | list_of(regex(layers_pattern_regex), "names")),
        "rank_pattern": optional(mapping(integer(1, MAX_RANK), keys=regex(pattern_regex))),
        "alpha_pattern": optional(mapping(number(), keys=regex(pattern_regex))),
        "modules_to_save": optional(list_of(TEXT, "module names")),
        "task_type": optional(one_of(*TASK_TYPES)),
        "base_model_name_or_path": optional(TEXT),
        "revision": optional(TEXT),
        "inference_mode": BOOLEAN,
    }

    target_modules: Optional[Union[list[str], str]] = None
    """Names matched as full module name or `.`-suffix; a string is a regex fullmatch; "all-linear"; None: PEFT's
    defaults for the model's type (e.g. q_proj, v_proj for Llama), taken when the adapter is added."""
    exclude_modules: Optional[Union[list[str], str]] = None
    """Same matching rules as target_modules; a match here is never adapted."""
    layers_to_transform: Optional[Union[list[int], int]] = None
    """Only adapt layers with these indices (the first number in the module path)."""
    layers_pattern: Optional[Union[list[str], str]] = None
    """Name of the layer list that holds layers_to_transform's indices (e.g. "layers")."""
    rank_pattern: Optional[dict[str, int]] = field(default_factory=dict)
    """Per-module rank overrides: {regex matched against the module name's suffix: r}."""
    alpha_pattern: Optional[dict[str, float]] = field(default_factory=dict)
    """Per-module alpha overrides, matched like rank_pattern."""
    modules_to_save: Optional[list[str]] = None
    """Modules trained in full next to the adapter (e.g. a classifier head); saved with it."""
    task_type: Optional[str] = None
    """PEFT's task type (one of TASK_TYPES); "SEQ_CLS" adds the usual classifier heads to modules_to_save, as PEFT
    does."""
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # PEFT's enums (TaskType.SEQ_CLS) as their plain values
            if isinstance(getattr(self, f.name), enum.Enum):
                setattr(self, f.name, getattr(self, f.name).value)
        for name in ("target_modules", "exclude_modules"):  # PEFT keeps name sets; lorakit sorted lists
            value = getattr(self, name)
            if isinstance(value, (set, frozenset, tuple)):
                setattr(self, name, sorted(value) if all(isinstance(v, str) for v in value) else list(value))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]  # one name
        elif isinstance(self.modules_to_save, (list, tuple, set)):
            self.modules_to_save = list(self.modules_to_save)
        self.check_fields()
        if self.task_type == "SEQ_CLS":
            # PEFT's PeftModelForSequenceClassification adds these names itself.
            extra = [n for n in CLASSIFIER_HEADS if n not in (self.modules_to_save or [])]
            self.modules_to_save = (self.modules_to_save or []) + extra
        self.validate()

    def check_fields(self) -> None:
        """Every field against its class's `field_checks` (all base classes'): ConfigError naming the first
        field whose value has the wrong type or is out of range."""
        checks: dict[str, Check] = {}
        for klass in reversed(type(self).__mro__):
            checks.update(vars(klass).get("field_checks", {}))
        for f in dataclasses.fields(self):
            check = checks.get(f.name)
            problem = check.problem(getattr(self, f.name)) if check is not None else None
            if problem:
                raise ConfigError(f"{type(self).__name__} field {f.name!r} {problem}")

    def validate(self) -> None:
        """Rules between fields (each field's own type and range is in `field_checks`); raise ConfigError."""

    @property
    def variant(self) -> str:
        """The registry key of the delta class this config builds (see registry.py)."""
        return self.peft_type

    @property
    def bias_mode(self) -> str:
        """Which base biases train and are saved with the adapter: "none", "all", or "adapted" (the biases of
        the layers this adapter adapts). Variants with PEFT's `bias` option map it here."""
        return "none"

    @property
    def parameter_targets(self) -> list[str]:
        """Names of parameters (not modules) this config adapts, PEFT's `target_parameters`; [] for a variant
        without that option."""
        return []

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
                refused.append(f"{key}={shown(value)}")
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
    for key in patterns or {}:
        if re.match(pattern_regex(key), module_name):
            return key
    return None


def pattern_value(patterns: dict, module_name: str, default):
    """The value of the first pattern (PEFT's rank_pattern / alpha_pattern rules) matching `module_name`, else
    `default`."""
    key = pattern_key(patterns, module_name)
    return patterns[key] if key is not None else default

